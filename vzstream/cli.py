"""Command line: `python -m vzstream [--version] demo | inspect | bench NAME`, the `vzstream` script.

`demo` is the main job: build or load a Llama-architecture model, generate greedily resident and
streamed, and show what streaming cost and saved. `inspect` prints the plan a session would make.

A user error (a bad option, no such directory, no GPU) prints one line, `vzstream: error: ...`, on
stderr and exits with 2; `--verbose` anywhere shows its traceback instead. Every option is checked
(the `SessionConfig` is built, the backend made) before a model is built, so a typo costs nothing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import threading
import time

import psutil
import torch

from . import __version__
from .backends import make_backend
from .bench.models import build_model, check_model_name, prompt
from .config import SessionConfig
from .errors import ConfigError, VzstreamError
from .session import session

BENCHES = ("codec", "session", "budget", "gpu", "soak")
USAGE = ("usage: python -m vzstream [--version] {demo | inspect | bench " + "|".join(BENCHES) + "} [options] "
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
    rss_model = _rss()
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
        with _PeakRss() as rss:
            out, t_str = _timed_generate(s.generate, ids.to(s.device), args.tokens, pad)
        st, pinned = s.stats(), getattr(getattr(backend, "heap", None), "nbytes", None)
    stall = (st.stall_s - before.stall_s) / max(st.wall_s - before.wall_s, 1e-9)
    same = torch.equal(out.cpu(), ref.cpu())
    print(f"streamed ({device}, prefetch={args.prefetch}, units={args.units}, codec={s.config.codec.value}): "
          f"{_new_tokens(out, ids) / t_str:.1f} tokens/s, stall {100 * stall:.1f}% of forward time")
    _print_memory(st, dtype, device, rss_model, rss.peak, pinned)
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


def _rss() -> int:
    return psutil.Process().memory_info().rss


class _PeakRss:
    """The process's peak RSS over a `with` block, sampled every 5 ms on a thread: one reading
    after the run misses the slots and decode buffers that exist only while it runs."""

    def __enter__(self) -> "_PeakRss":
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


# -- inspect ------------------------------------------------------------------------------------

def inspect(argv) -> int:
    """What a session would do with a model: units, resident/streamed and why, packed sizes."""
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
