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

from .common import median_time, report
from .models import build_model, model_nbytes, prompt

COLUMNS = ["budget_mib", "units_resident", "streamed_mib_per_pass", "peak_device_mib", "tokens_per_s", "tokens_equal"]


def _generate(fn, ids, tokens):
    return fn(ids, max_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)


def minimum_budget(model, device: str, prefetch: int) -> int:
    """The smallest budget the planner accepts, from the number its ConfigError names."""
    try:
        with vzstream.session(model, device=device, prefetch=prefetch, vram_budget=1):
            pass
    except vzstream.ConfigError as exc:
        return int(re.search(r"Raise the budget to (\d+)", str(exc)).group(1))
    return 1


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
        ref = _generate(model.generate, ids, args.tokens)
        t_res = median_time(lambda: _generate(model.generate, ids, args.tokens), args.repeat, args.device)
        model.to("cpu")
    lo, hi = minimum_budget(model, args.device, args.prefetch), model_nbytes(model) + (1 << 20)
    budgets = [lo + (hi - lo) * i // (args.points - 1) for i in range(args.points)]
    mib = 2**20
    rows = [dict(budget_mib="resident (no session)", units_resident="all", streamed_mib_per_pass=0,
                 peak_device_mib=model_nbytes(model) / mib, tokens_per_s=args.tokens / t_res, tokens_equal=True)]
    for budget in budgets:
        with vzstream.session(model, device=args.device, prefetch=args.prefetch, vram_budget=budget) as s:
            out = _generate(s.generate, ids, args.tokens)           # warm-up: learns the trace
            t = median_time(lambda: _generate(s.generate, ids, args.tokens), args.repeat, args.device, warmup=0)
            st = s.stats()
        rows.append(dict(budget_mib=budget / mib, units_resident=st.units_resident,
                         streamed_mib_per_pass=st.streamed_nbytes_per_pass / mib,
                         peak_device_mib=st.peak_device_nbytes / mib, tokens_per_s=args.tokens / t,
                         tokens_equal=bool(torch.equal(out, ref))))
    report("budget", rows, COLUMNS, vars(args), args.out)
    return 0
