"""Command line: `python -m vzstream demo | inspect | bench {codec,session,budget,gpu}`.

`demo` is the main job: build a Llama-architecture model, generate greedily resident and
streamed, and show what streaming cost and saved.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

BENCHES = ("codec", "session", "budget", "gpu", "soak")


def _demo_args(argv):
    ap = argparse.ArgumentParser(prog="python -m vzstream demo", description=(
        "Greedy generation with a Llama-architecture model, resident and streamed; "
        "prints sizes, host RAM, tokens/s, stall % and whether the tokens match."))
    ap.add_argument("model", nargs="?", help="a local Hugging Face model directory (instead of --preset)")
    ap.add_argument("--preset", default="small", help="small (default), tinyllama-1.1b, llama-3-8b")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens to generate")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--units", default="blocks", help="blocks or leaves")
    ap.add_argument("--codec", default="auto", help="auto (nibble on CUDA, zstd on CPU), zstd (host threads decode) "
                                                   "or nibble (the GPU expands 4-bit codes)")
    return ap.parse_args(argv)


def _timed_generate(gen, ids, tokens):
    import torch

    t0 = time.perf_counter()
    out = gen(ids, max_new_tokens=tokens, do_sample=False,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def demo(argv) -> int:
    args = _demo_args(argv)
    import psutil
    import torch

    import vzstream
    from vzstream.bench.models import build_model, model_nbytes, prompt

    mib = 1 << 20
    proc = psutil.Process()
    name = args.model or args.preset
    print(f"building {name} (bf16, seed 0) ...", flush=True)
    model = build_model(name)
    ids = prompt(model, length=args.prompt_len)
    rss_model = proc.memory_info().rss
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
          f"{model_nbytes(model) / mib:.1f} MiB in bf16; host RSS {rss_model / mib:.0f} MiB")

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    resident = model.to(device)
    with torch.no_grad():
        _timed_generate(resident.generate, ids.to(device), 2)             # warm-up
        ref, t_res = _timed_generate(resident.generate, ids.to(device), args.tokens)
    model = resident.to("cpu")
    print(f"resident ({device}): {args.tokens / t_res:.1f} tokens/s", flush=True)

    with vzstream.session(model, device=device, prefetch=args.prefetch, units=args.units, codec=args.codec) as s:
        rss_packed = proc.memory_info().rss
        _timed_generate(s.generate, ids.to(device), 2)                     # first pass learns the trace
        before = s.stats()
        out, t_str = _timed_generate(s.generate, ids.to(device), args.tokens)
        st = s.stats()
    stall = (st.stall_s - before.stall_s) / max(st.wall_s - before.wall_s, 1e-9)
    same = torch.equal(out.cpu(), ref.cpu())
    print(f"streamed ({device}, prefetch={args.prefetch}, units={args.units}, codec={s.config.codec}): "
          f"{args.tokens / t_str:.1f} tokens/s, "
          f"stall {100 * stall:.1f}% of forward time")
    slots = st.peak_device_nbytes - st.resident_nbytes
    on_cpu = " (on the CPU backend the device is host RAM too)" if device == "cpu" else ""
    print(f"weights in host RAM: {st.packed_nbytes / mib:.1f} MiB packed ({st.ratio:.3f}x smaller than "
          f"{st.raw_nbytes / mib:.1f} MiB of streamed bf16); on the device: {st.resident_nbytes / mib:.1f} MiB "
          f"resident + {slots / mib:.1f} MiB of slots{on_cpu}")
    print(f"host RSS: {rss_model / mib:.0f} MiB with the model resident in host RAM, "
          f"{rss_packed / mib:.0f} MiB with the session open")
    print(f"tokens identical to the resident run: {'yes' if same else 'NO'}")
    return 0 if same else 1


def inspect(argv) -> int:
    """What a session would do with a model: units, resident/streamed and why, packed sizes."""
    ap = argparse.ArgumentParser(prog="python -m vzstream inspect", description=inspect.__doc__)
    ap.add_argument("model", nargs="?", help="a local Hugging Face model directory (instead of --preset)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--units", default="blocks")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--vram-budget", default=None, help="e.g. 6GiB: plan as under this budget")
    ap.add_argument("--codec", default="zstd", help="zstd or nibble: the packed sizes of either")
    args = ap.parse_args(argv)
    import vzstream
    from vzstream.bench.models import build_model

    model = build_model(args.model or args.preset)
    with vzstream.session(model, device="cpu", units=args.units, prefetch=args.prefetch,
                          vram_budget=args.vram_budget, codec=args.codec) as s:
        print(s.plan)
        st = s.stats()
    print(f"packed {st.packed_nbytes / 2**20:.1f} MiB of {st.raw_nbytes / 2**20:.1f} MiB streamed "
          f"(ratio {st.ratio:.3f}, codec {args.codec}); planned on the CPU backend (slot alignment, and "
          f"on CUDA the landing buffers a budget must hold, differ)")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    usage = ("usage: python -m vzstream {demo | inspect | bench " + "|".join(BENCHES) + "} [options]"
             "   (-h after a command for its options)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        return demo(rest)
    if cmd == "inspect":
        return inspect(rest)
    if cmd == "bench" and rest and rest[0] in BENCHES:
        return importlib.import_module(f"vzstream.bench.{rest[0]}").main(rest[1:]) or 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
