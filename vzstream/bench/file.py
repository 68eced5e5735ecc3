"""`python -m vzstream bench file`: a model through a packed file (issue 16).

Pack: `pack_checkpoint` on a Hugging Face safetensors directory, its peak RSS above this
process's baseline as a share of the model's bf16 size (target: under 0.5x), and its time.
The directory is a preset built from its config with seeded random bf16 weights and written
with `save_pretrained` by a child process, so this process never held the model; the baseline
is taken after torch and transformers are imported and a tiny warm-up pack has run. Or pass a
directory (`--model`).

Load (once `vzstream.session` accepts `weights=`): a meta model opened from the file and its
first token, peak RSS against the file's size (target: at most 1.1x), and time to first token
against the directory path (`from_pretrained`, then a session that packs at open).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import vzstream
from vzstream.packhf import Checkpoint, build_meta_model, pack_checkpoint
from vzstream.store import return_freed_memory

from .common import PeakRss, greedy, report, rss
from .models import PRESETS

COLUMNS = ["model", "step", "seconds", "peak_above_baseline_mib", "of_mib", "peak_ratio", "target", "device_mib",
           "stores_ratio", "note"]
MIB = 1 << 20


def _write_checkpoint(preset: str, directory: Path) -> Path:
    """The preset saved with `save_pretrained`, by a child process (its RAM is not ours)."""
    code = ("import sys; from vzstream.bench.models import build_model; "
            "build_model(sys.argv[1]).save_pretrained(sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, preset, str(directory)], check=True)
    return directory


def _warm_up(directory: Path) -> None:
    """Import and run everything a pack uses once, on a tiny Llama: what that costs is baseline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory / "src")
    pack_checkpoint(directory / "src", directory / "packed")


def _baseline() -> int:
    gc.collect()
    return_freed_memory()
    return rss()


def _bench_pack(src: Path, out: Path, args) -> dict:
    base = _baseline()
    t0 = time.perf_counter()
    with PeakRss() as peak:
        pack_checkpoint(src, out, codec=args.codec, units=args.units, max_shard_nbytes=args.shard_size)
    seconds = time.perf_counter() - t0
    packed = vzstream.open_packed(out)
    numel = sum(t.nbytes // t.dtype.itemsize for u in packed.units for t in u.tensors)
    numel += sum(packed.raw[n].nbytes // packed.raw[n].dtype.itemsize for n in packed.resident)
    bf16 = 2 * numel
    above = peak.peak - base
    size = sum(f.stat().st_size for f in packed.files)
    return dict(step="pack (safetensors dir -> file)", seconds=seconds, peak_above_baseline_mib=round(above / MIB),
                of_mib=round(bf16 / MIB), peak_ratio=above / bf16, target="< 0.5x the bf16 model",
                note=f"file {size / MIB:.0f} MiB, {bf16 / MIB / seconds:.0f} MiB/s of bf16")


# -- the load half: runs once `vzstream.session(meta_model, weights=path)` exists ------------------

def _bench_load(src: Path, packed_dir: Path, args) -> list[dict]:
    """Open a meta model from the packed file and generate the first token: peak RSS against
    the file's size, and time to first token; then the same from the directory (load it whole,
    then a session packs it at open)."""
    if "weights" not in vzstream.SessionConfig.__dataclass_fields__:
        return [dict(step="load file + first token", note="skipped: session(weights=) not built yet")]
    packed = vzstream.open_packed(packed_dir)
    size = sum(f.stat().st_size for f in packed.files)
    arenas = sum(u.nbytes for u in packed.units)
    ids = torch.randint(0, 256, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for step, open_session in (("load file + first token", lambda: _from_file(src, packed_dir, args.device)),
                               ("from_pretrained + pack at open + first token", lambda: _from_dir(src, args.device))):
        base = _baseline()
        t0 = time.perf_counter()
        try:
            with PeakRss() as peak, open_session() as s:
                greedy(s.generate, ids.to(s.device), 1)
                device = s.stats().peak_device_nbytes
        except Exception as exc:        # a half-built load path: the pack row still prints
            rows.append(dict(step=step, note=f"failed: {type(exc).__name__}: {str(exc)[:120]}"))
            continue
        seconds, above = time.perf_counter() - t0, peak.peak - base
        # On the CPU backend the "device" is host RAM too: its slots and resident units are in
        # RSS. What the stores take is the rest, against the arenas' bytes in the file.
        stores = above - device if s.backend.name == "cpu" else above
        rows.append(dict(step=step, seconds=seconds, peak_above_baseline_mib=round(above / MIB), of_mib=round(size / MIB),
                         peak_ratio=above / size, target="<= 1.1x the file" if "file" in step else "",
                         device_mib=round(device / MIB), stores_ratio=stores / arenas,
                         note="time to first token; RSS against the packed file's size; stores_ratio: RSS less the "
                              "device's bytes (host RAM on the CPU backend) against the packed units' bytes"))
    return rows


def _from_file(src: Path, packed_dir: Path, device: str):
    meta = build_meta_model(src, None, Checkpoint(src))
    return vzstream.session(meta, weights=packed_dir, device=device)


def _from_dir(src: Path, device: str):
    from transformers import AutoModelForCausalLM

    return vzstream.session(AutoModelForCausalLM.from_pretrained(src).eval(), device=device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vzstream bench file", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tinyllama-1.1b", help=f"{', '.join(PRESETS)} (bf16, random seeded weights)")
    ap.add_argument("--model", default=None, help="a local Hugging Face directory to pack instead of a preset")
    ap.add_argument("--codec", default="zstd")
    ap.add_argument("--units", default="blocks")
    ap.add_argument("--shard-size", default="1GiB")
    ap.add_argument("--device", default="cpu", help="for the load half")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="where the checkpoint and the file go (a temp dir in it, removed)")
    ap.add_argument("--out", default=None, help="also write file.md / file.json here")
    args = ap.parse_args(argv)
    name = args.model or args.preset
    with tempfile.TemporaryDirectory(prefix="vzstream-bench-file-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        src = Path(args.model) if args.model else _write_checkpoint(args.preset, tmp / "checkpoint")
        _warm_up(tmp / "warm-up")
        rows = [_bench_pack(src, tmp / "packed", args)]
        rows += _bench_load(src, tmp / "packed", args)
    for row in rows:
        row["model"] = os.path.basename(os.path.normpath(name))
    report("file", rows, COLUMNS, vars(args), args.out)
    return 0
