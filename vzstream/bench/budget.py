"""`python -m vzstream bench budget`: sweep `vram_budget` from full streaming to all resident.

For each budget: units resident, MB streamed per pass, peak device bytes (as the backend
counts them), tokens/s of greedy decoding, and whether the tokens equal the resident run.
The smallest budget is the planner's own minimum (read from its ConfigError).
"""

from __future__ import annotations

import argparse
import re

import torch

import vzstream
from vzstream.headroom import kv_growth_nbytes

from .common import greedy, median_time, report
from .models import build_model, model_nbytes, prompt

COLUMNS = ["budget_mib", "units_resident", "streamed_mib_per_pass", "peak_device_mib", "tokens_per_s", "tokens_equal"]


def minimum_budget(model, device: str, prefetch: int, **options) -> int:
    """The smallest budget the planner accepts (with session `options`), from the number its
    ConfigError names."""
    try:
        with vzstream.session(model, device=device, prefetch=prefetch, vram_budget=1, **options):
            pass
    except vzstream.ConfigError as exc:
        return int(re.search(r"Raise the budget to (\d+)", str(exc)).group(1))
    return 1


def sweep(model, ids, ref, device: str, budgets: list[int], prefetch: int, tokens: int, repeat: int,
          on_row=None) -> list[dict]:
    """One row per budget; on CUDA also the allocator's own peak, to cross-check the accounting.
    `on_row(row)` sees each row as soon as it is measured."""
    rows, mib, cuda = [], 2**20, torch.device(device).type == "cuda"
    for budget in budgets:
        with vzstream.session(model, device=device, prefetch=prefetch, vram_budget=budget) as s:
            out = greedy(s.generate, ids, tokens)                 # warm-up: learns the trace
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = median_time(lambda: greedy(s.generate, ids, tokens), repeat, device, warmup=0)
            st = s.stats()
        row = dict(budget_mib=budget / mib, units_resident=st.units_resident,
                   streamed_mib_per_pass=st.streamed_nbytes_per_pass / mib,
                   peak_device_mib=st.peak_device_nbytes / mib, tokens_per_s=tokens / t,
                   tokens_equal=bool(torch.equal(out.cpu(), ref.cpu())))
        if cuda:
            row["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / mib
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def budget_points(model, device: str, prefetch: int, points: int, cache_nbytes: int = 0) -> list[int]:
    """`points` budgets from the planner's minimum to all resident (+1 MiB: slot alignment),
    each with room for `cache_nbytes` of KV cache (what `s.generate` reserves on CUDA); just
    the latter when streaming cannot fit in less (a ring of the largest unit)."""
    lo = minimum_budget(model, device, prefetch) + cache_nbytes
    hi = model_nbytes(model) + (1 << 20) + cache_nbytes
    if lo >= hi:
        return [hi]
    return [lo + (hi - lo) * i // (points - 1) for i in range(points)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vzstream bench budget")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--points", type=int, default=5, help="budgets from the minimum to the model size")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    model = build_model(args.preset, layers=args.layers)
    ids = prompt(model).to(args.device)
    with torch.no_grad():
        model.to(args.device)
        ref = greedy(model.generate, ids, args.tokens)
        t_res = median_time(lambda: greedy(model.generate, ids, args.tokens), args.repeat, args.device)
        model.to("cpu")
    rows = [dict(budget_mib="resident (no session)", units_resident="all", streamed_mib_per_pass=0,
                 peak_device_mib=model_nbytes(model) / 2**20, tokens_per_s=args.tokens / t_res, tokens_equal=True)]
    cache = kv_growth_nbytes(model, ids, {"max_new_tokens": args.tokens})
    budgets = budget_points(model, args.device, args.prefetch, args.points, cache)
    rows += sweep(model, ids, ref, args.device, budgets, args.prefetch, args.tokens, args.repeat)
    columns = COLUMNS + (["cuda_peak_allocated_mib"] if torch.device(args.device).type == "cuda" else [])
    report("budget", rows, columns, vars(args), args.out)
    return 0
