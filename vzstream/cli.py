"""Command line: `python -m vzstream [--version] demo | inspect | pack | bench NAME`, the `vzstream` script.

`demo` is the main job: build or load a Llama-architecture model, generate greedily resident and
streamed, and show what streaming cost and saved. `inspect` prints the plan a session would make,
or what a packed file holds (`--verify`: checks every checksum). `pack` packs a Hugging Face
checkpoint into a packed file, tensor by tensor (`packhf.py`).

A user error (a bad option, no such directory, no GPU) prints one line, `vzstream: error: ...`, on
stderr and exits with 2; `--verbose` anywhere shows its traceback instead. Every option is checked
(the `SessionConfig` is built, the backend made) before a model is built, so a typo costs nothing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
import time
from pathlib import Path

import torch

from . import __version__
from . import packfile as pf
from .backends import make_backend
from .bench.common import PeakRss, rss
from .bench.models import build_model, check_model_name, prompt
from .config import SessionConfig
from .errors import ConfigError, VzstreamError
from .packhf import pack_checkpoint
from .packread import open_packed
from .session import session

BENCHES = ("codec", "session", "budget", "gpu", "soak", "file")
USAGE = ("usage: python -m vzstream [--version] {demo | inspect | pack | bench " + "|".join(BENCHES) + "} [options] "
         "[--verbose]   (-h after a command for its options; --verbose shows an error's traceback)")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MIB = 1 << 20


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return _dispatch(argv)
    except VzstreamError as exc:
        if verbose:
            raise
        print(f"vzstream: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["--version"]:
        print(f"vzstream {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        return demo(rest)
    if cmd == "inspect":
        return inspect(rest)
    if cmd == "pack":
        return pack(rest)
    if cmd == "bench" and rest and rest[0] in BENCHES:
        return importlib.import_module(f"vzstream.bench.{rest[0]}").main(rest[1:]) or 0
    print(USAGE, file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one `ConfigError` line (`main` prints it) instead of the usage block."""

    def __init__(self, **kwargs) -> None:
        super().__init__(epilog="--verbose (anywhere): show an error's traceback instead of one line", **kwargs)

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}. See `{self.prog} -h`.")


def _model_args(ap: argparse.ArgumentParser, codec: str, codec_help: str) -> None:
    """The options `demo` and `inspect` share: which model, and how a session streams it."""
    ap.add_argument("model", nargs="?", metavar="MODEL", help="a local Hugging Face model directory (instead of --preset)")
    ap.add_argument("--preset", default="small", help="small (default), tinyllama-1.1b, llama-3-8b")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="cast the weights: a preset is built in bf16 and a directory keeps its checkpoint's dtype unless set")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--units", default="blocks", help="blocks or leaves")
    ap.add_argument("--codec", default=codec, help=codec_help)


def _load(args):
    """The model `args` name, in `--dtype` if given (after every option was checked)."""
    name = args.model or args.preset
    if args.model:
        print(f"loading {name} ({DTYPES[args.dtype] if args.dtype else 'in its checkpoint dtype'}) ...", flush=True)
    else:
        print(f"building {name} (random init, seed 0, {DTYPES.get(args.dtype, 'bfloat16')}) ...", flush=True)
    return build_model(name, dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None)


# -- demo ---------------------------------------------------------------------------------------

def _demo_args(argv):
    ap = _Parser(prog="python -m vzstream demo", description=(
        "Greedy generation with a Llama-architecture model, resident and streamed; prints sizes, host RAM, "
        "tokens/s, stall % and whether the tokens match. With a MODEL directory that has a tokenizer, "
        "generates from --prompt and prints the text."))
    _model_args(ap, "auto", "auto (nibble on CUDA, zstd on CPU), zstd (host threads decode) "
                            "or nibble (the GPU expands 4-bit codes)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens to generate")
    ap.add_argument("--prompt", default="Once upon a time", help="the text prompt, when MODEL has a tokenizer")
    ap.add_argument("--prompt-len", type=int, default=16, help="random prompt ids, when there is no tokenizer")
    ap.add_argument("--timeline", metavar="PNG", default=None,
                    help="also draw the streamed run's last passes into this image (needs matplotlib)")
    return ap.parse_args(argv)


def demo(argv) -> int:
    args = _demo_args(argv)
    options = dict(device=args.device, prefetch=args.prefetch, units=args.units, codec=args.codec)
    SessionConfig(**options)                    # a bad option fails here, before seconds of model building
    check_model_name(args.model or args.preset)
    backend = make_backend(options.pop("device"))   # no GPU for --device cuda: BackendUnavailableError, now
    model = _load(args)
    tokenizer = _tokenizer(args.model)
    ids = _prompt_ids(model, tokenizer, args)
    rss_model = rss()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
          f"{_nbytes(model) / MIB:.1f} MiB in {dtype}; host RSS {rss_model / MIB:.0f} MiB")

    device = backend.device
    pad = _pad_id(tokenizer)
    resident = model.to(device)
    with torch.no_grad():
        _timed_generate(resident.generate, ids.to(device), 2, pad)             # warm-up
        ref, t_res = _timed_generate(resident.generate, ids.to(device), args.tokens, pad)
    model = resident.to("cpu")
    print(f"resident ({device}): {_new_tokens(ref, ids) / t_res:.1f} tokens/s", flush=True)

    with session(model, backend=backend, **options) as s:
        _timed_generate(s.generate, ids.to(s.device), 2, pad)                # first pass learns the trace
        before = s.stats()
        with PeakRss() as peak:
            out, t_str = _timed_generate(s.generate, ids.to(s.device), args.tokens, pad)
        st, pinned = s.stats(), getattr(getattr(backend, "heap", None), "nbytes", None)
        if args.timeline:
            s.timeline(args.timeline, passes=3)
            print(f"timeline of the last 3 passes: {args.timeline}")
    stall = (st.stall_s - before.stall_s) / max(st.wall_s - before.wall_s, 1e-9)
    same = torch.equal(out.cpu(), ref.cpu())
    print(f"streamed ({device}, prefetch={args.prefetch}, units={args.units}, codec={s.config.codec.value}): "
          f"{_new_tokens(out, ids) / t_str:.1f} tokens/s, stall {100 * stall:.1f}% of forward time")
    _print_memory(st, dtype, device, rss_model, peak.peak, pinned)
    if tokenizer is not None:
        print(f"text: {tokenizer.decode(out[0].cpu(), skip_special_tokens=True)!r}")
    print(f"tokens identical to the resident run: {'yes' if same else 'NO'}")
    return 0 if same else 1


def _print_memory(st, dtype: str, device, rss_model: int, rss_peak: int, pinned: int | None) -> None:
    """What lives where: the packed weights and slots vzstream holds, and the process's RSS."""
    slots = st.peak_device_nbytes - st.resident_nbytes
    print(f"weights: {st.packed_nbytes / MIB:.1f} MiB packed in host RAM ({st.ratio:.3f}x smaller than "
          f"{st.raw_nbytes / MIB:.1f} MiB of streamed {dtype}); on the device: {st.resident_nbytes / MIB:.1f} MiB "
          f"resident + {slots / MIB:.1f} MiB of slots")
    if device.type == "cpu":        # the CPU backend's "device" is host RAM: its slots count in RSS
        held = f"{(st.packed_nbytes + slots) / MIB:.1f} MiB (packed stores + slots, in host RAM on the CPU backend)"
    else:                           # CUDA: packed stores and the staging ring are pinned host memory
        held = f"{(pinned or st.packed_nbytes) / MIB:.1f} MiB of pinned host memory (packed stores + staging)"
    print(f"host RAM: vzstream holds {held}; process RSS {rss_model / MIB:.0f} MiB with the model resident, "
          f"peak {rss_peak / MIB:.0f} MiB during the streamed run")


def _tokenizer(model_dir: str | None):
    """The directory's tokenizer, or None (a preset, or a directory without one)."""
    if model_dir is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError):   # what transformers raises when none is there
        return None


def _prompt_ids(model, tokenizer, args):
    """`[1, S]` ids: the text prompt through the tokenizer, else seeded random ids."""
    if tokenizer is None:
        return prompt(model, length=args.prompt_len)
    return tokenizer(args.prompt, return_tensors="pt").input_ids


def _pad_id(tokenizer) -> int:
    # generate() warns and guesses without one; a random-weights model has no real pad token.
    if tokenizer is None:
        return 0
    return next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)


def _timed_generate(gen, ids, tokens: int, pad: int):
    t0 = time.perf_counter()
    out = gen(ids, max_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=pad)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _new_tokens(out, ids) -> int:
    return max(out.shape[1] - ids.shape[1], 1)     # fewer than --tokens when the model emits EOS


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# -- inspect ------------------------------------------------------------------------------------

def inspect(argv) -> int:
    """What a session would do with a model: units, resident/streamed and why, packed sizes."""
    target = next((a for a in argv if not a.startswith("-")), None)
    if target is not None and _is_packed(target):
        return inspect_file(argv)
    ap = _Parser(prog="python -m vzstream inspect", description=inspect.__doc__)
    _model_args(ap, "zstd", "zstd or nibble: the packed sizes of either")
    ap.add_argument("--vram-budget", default=None, help="e.g. 6GiB: plan as under this budget")
    args = ap.parse_args(argv)
    options = dict(device="cpu", units=args.units, prefetch=args.prefetch, vram_budget=args.vram_budget,
                   codec=args.codec)
    SessionConfig(**options)                    # a bad option fails here, before the model is built
    check_model_name(args.model or args.preset)
    model = _load(args)
    with session(model, **options) as s:
        print(s.plan)
        st = s.stats()
    print(f"packed {st.packed_nbytes / MIB:.1f} MiB of {st.raw_nbytes / MIB:.1f} MiB streamed "
          f"(ratio {st.ratio:.3f}, codec {args.codec}); planned on the CPU backend (slot alignment, and "
          f"on CUDA the landing buffers a budget must hold, differ)")
    return 0


def _is_packed(path: str) -> bool:
    """Whether `path` names a packed model (a directory holding a save, its index or a shard)
    rather than a Hugging Face directory or a preset."""
    p = Path(path)
    if p.is_dir():
        return (p / pf.INDEX_NAME).is_file() or any(p.glob("vzstream-*.safetensors"))
    return p.is_file() and (p.name == pf.INDEX_NAME or p.suffix == ".safetensors")


def inspect_file(argv) -> int:
    """What a packed file holds: per unit its parameters, raw and packed MiB, ratio and codec;
    resident parameters and buffers (stored raw); totals and the format version."""
    ap = _Parser(prog="python -m vzstream inspect", description=inspect_file.__doc__)
    ap.add_argument("path", metavar="FILE_OR_PACKED_DIR", help="a directory `vzstream.save`/`pack` wrote, its index or a shard")
    ap.add_argument("--verify", action="store_true", help="decode every tensor and check every checksum")
    args = ap.parse_args(argv)
    packed = open_packed(args.path)
    rows = [_row(u.fqn, u.tensors, u.nbytes, u.coding or "raw") for u in packed.units]
    for what, names in (("(resident parameters)", packed.resident), ("(buffers)", packed.buffers)):
        if names:
            records = [packed.raw[n] for n in names]
            rows.append(_row(what, records, sum(t.nbytes for t in records), "raw"))
    rows.append(_row("total", [], sum(r["packed"] for r in rows), "", sum(r["numel"] for r in rows),
                     sum(r["raw"] for r in rows)))
    disk = sum(f.stat().st_size for f in packed.files)
    config = packed.config or {}
    arch = (config.get("architectures") or [config.get("model_type") or "a model without a Hugging Face config"])[0]
    print(f"{args.path}: vzstream format version {pf.VERSION}, {len(packed.files)} shard(s), {disk / MIB:.1f} MiB on "
          f"disk; {arch}, codec {packed.codec}, units {packed.units_spec}")
    print(_text_table(rows))
    if args.verify:
        num_tensors = len(packed.tensors())      # reads and decodes all; a mismatch is a FormatError
        print(f"verify: OK: metadata, every arena and all {num_tensors} tensors match their checksums")
    return 0


def _row(name: str, tensors, packed_nbytes: int, codec: str, numel: int | None = None, raw: int | None = None) -> dict:
    numel = sum(math.prod(t.shape) for t in tensors) if numel is None else numel
    raw = sum(t.nbytes for t in tensors) if raw is None else raw
    return dict(name=name, numel=numel, raw=raw, packed=packed_nbytes, codec=codec)


def _text_table(rows: list[dict]) -> str:
    cells = [["unit", "params", "raw MiB", "packed MiB", "ratio", "codec"]]
    cells += [[r["name"], f"{r['numel'] / 1e6:.2f}M", f"{r['raw'] / MIB:.2f}", f"{r['packed'] / MIB:.2f}",
               f"{r['raw'] / r['packed']:.3f}" if r["packed"] else "-", r["codec"]] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     .rstrip() for row in cells)


# -- pack ---------------------------------------------------------------------------------------

def pack(argv) -> int:
    """Pack a local Hugging Face model directory (config.json, *.safetensors, sharded or not)
    into a packed file, tensor by tensor: the model is never whole in host RAM."""
    ap = _Parser(prog="python -m vzstream pack", description=pack.__doc__)
    ap.add_argument("src", metavar="SRC_DIR", help="a local Hugging Face model directory")
    ap.add_argument("out", metavar="OUT", help="the directory to write (shards and vzstream.index.json)")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="cast the floating weights (default: the dtype from_pretrained loads, config.json's)")
    ap.add_argument("--codec", default="zstd", help="zstd (default: stores the least) or nibble (fastest on a GPU)")
    ap.add_argument("--units", default="blocks", help="blocks (default) or leaves: as the sessions will stream it")
    ap.add_argument("--shard-size", default="1GiB", help="largest shard file (default 1GiB)")
    args = ap.parse_args(argv)
    bar, t0 = _ProgressLine(sys.stderr), time.perf_counter()
    try:
        index = pack_checkpoint(args.src, args.out, dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
                                codec=args.codec, units=args.units, max_shard_nbytes=args.shard_size, progress=bar)
    finally:
        bar.close()
    packed = open_packed(index)
    raw = sum(t.nbytes for u in packed.units for t in u.tensors)
    stored = sum(u.nbytes for u in packed.units)
    print(f"packed {args.src} into {index.parent}: {len(packed.units)} units, {raw / MIB:.1f} MiB -> {stored / MIB:.1f} "
          f"MiB ({raw / max(stored, 1):.3f}x, codec {packed.codec}) + {len(packed.raw)} tensors stored raw, in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


class _ProgressLine:
    """`progress` for `pack_checkpoint`: one line on `stream`, rewritten in place, on a TTY only
    (piped output stays clean)."""

    def __init__(self, stream) -> None:
        self.stream, self.on = stream, stream.isatty()
        self.t0, self.shown, self.drawn = time.perf_counter(), float("-inf"), False

    def __call__(self, done_nbytes: int, total_nbytes: int, units_done: int, num_units: int) -> None:
        now = time.perf_counter()
        if not done_nbytes:                     # the first call: reading starts now
            self.t0 = now
        if not self.on or (now - self.shown < 0.2 and done_nbytes < total_nbytes):
            return
        self.shown, self.drawn = now, True
        rate = done_nbytes / max(now - self.t0, 1e-9)
        eta = f"{(total_nbytes - done_nbytes) / rate:.0f} s" if rate else "?"
        self.stream.write(f"\rpacking: {units_done}/{num_units} units, {done_nbytes / MIB:.0f}/{total_nbytes / MIB:.0f} "
                          f"MiB, {rate / MIB:.0f} MiB/s, ETA {eta}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
