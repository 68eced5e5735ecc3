"""`python -m vzstream bench session`: resident vs streamed forward and generate.

Rows: for each preset, a resident baseline and vzstream at each prefetch depth — prefill
forward time, greedy tokens/s, stall %, host RSS, whether tokens match. Then the per-unit
overhead of hooks + scheduler on a model whose compute is negligible (many tiny blocks):
(streamed pass time - resident pass time) / units per pass; and, in that same run, what of it
the profiler ranges cost with no profiler running, and the timing behind `s.stats()`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import psutil
import torch
from torch import nn

import vzstream

from .. import ranges
from ..timing import Timing
from .common import greedy, median_time, report, sync
from .models import build_model, prompt

COLUMNS = ["model", "mode", "prefill_ms", "tokens_per_s", "stall_pct", "host_rss_mib", "ratio", "tokens_equal"]


def _bench_preset(name: str, args, device: str) -> list[dict]:
    model = build_model(name, layers=args.layers)
    ids = prompt(model, batch=1, length=args.prompt_len).to(device)
    long_ids = prompt(model, batch=1, length=args.prefill_len, seed=1).to(device)
    rss = psutil.Process().memory_info().rss / 2**20
    model.to(device)
    with torch.no_grad():
        ref = greedy(model.generate, ids, args.tokens)
        prefill = median_time(lambda: model(long_ids), args.repeat, device)
        gen = median_time(lambda: greedy(model.generate, ids, args.tokens), args.repeat, device)
    rows = [dict(model=name, mode="resident", prefill_ms=1e3 * prefill, tokens_per_s=args.tokens / gen,
                 stall_pct=0.0, host_rss_mib=rss, ratio=1.0, tokens_equal=True)]
    model.to("cpu")
    for k in args.prefetch:
        gc.collect()
        with vzstream.session(model, device=device, prefetch=k) as s:
            rss = psutil.Process().memory_info().rss / 2**20
            out = greedy(s.generate, ids, args.tokens)            # warm-up: learns the trace
            prefill = median_time(lambda: s(long_ids), args.repeat, device)
            before = s.stats()
            gen = median_time(lambda: greedy(s.generate, ids, args.tokens), args.repeat, device, warmup=0)
            st = s.stats()
            stall = (st.stall_s - before.stall_s) / max(st.wall_s - before.wall_s, 1e-9)
            rows.append(dict(model=name, mode=f"vzstream prefetch={k}", prefill_ms=1e3 * prefill,
                             tokens_per_s=args.tokens / gen, stall_pct=100 * stall, host_rss_mib=rss,
                             ratio=st.ratio, tokens_equal=bool(torch.equal(out, ref))))
    return rows


class _Tiny(nn.Module):
    """Many blocks with negligible compute: what remains is the per-unit overhead."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(num_blocks))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _bench_overhead(args, device: str) -> dict:
    torch.manual_seed(0)
    model = _Tiny(args.overhead_blocks).to(torch.bfloat16).eval()
    resident = copy.deepcopy(model).to(device)
    x = torch.randn(1, 8, dtype=torch.bfloat16, device=device)
    with vzstream.session(model, device=device, prefetch=2) as s, torch.no_grad():
        # Resident and streamed passes alternate, one each per round, and each side's median
        # is taken: on a shared VM the host's speed drifts within seconds, which separate
        # series would read as overhead (or hide).
        times = [[], []]
        for i in range(2 * (2 + args.repeat * 25)):
            t = median_time(lambda: (s if i % 2 else resident)(x), 1, device, warmup=0)
            if i >= 4:                                   # two rounds of warm-up
                times[i % 2].append(t)
        t_res, t_str = statistics.median(times[0]), statistics.median(times[1])
        pass_spans = _last_pass_spans(s.member.runtime.timing)
    per_unit_us = 1e6 * (t_str - t_res) / args.overhead_blocks
    # The target is a ratio measured in this run: the cost a unit adds to the forward thread
    # against one resident block (machines differ ~4x in torch dispatch cost).
    block_us = 1e6 * t_res / args.overhead_blocks
    ranges_us, timing_us = _ranges_us(), _timing_us(pass_spans, args.overhead_blocks)
    return dict(model=f"{args.overhead_blocks} x Linear(8,8)", mode="overhead per unit (us)",
                prefill_ms=1e3 * t_str, tokens_per_s="", stall_pct="", host_rss_mib="", ratio="",
                tokens_equal=f"{per_unit_us:.1f} us/unit/pass = {per_unit_us / block_us:.1f}x one resident block "
                             f"(resident pass {1e3 * t_res:.2f} ms); of it, profiler ranges with no profiler "
                             f"{ranges_us:.2f} us = {ranges_us / block_us:.3f}x, timing {timing_us:.2f} us = "
                             f"{timing_us / block_us:.3f}x",
                overhead_us_per_unit=per_unit_us, overhead_per_resident_block=per_unit_us / block_us,
                ranges_us_per_unit=ranges_us, ranges_per_resident_block=ranges_us / block_us,
                timing_us_per_unit=timing_us, timing_per_resident_block=timing_us / block_us)


def _loop_us(body, n: int = 200_000) -> float:
    """Microseconds one `body()` takes, less the loop's own cost (best of 5)."""
    def run(fn):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0
    best = min(run(body) - run(_nothing) for _ in range(5))
    return max(0.0, 1e6 * best / n)


def _nothing() -> None:
    pass


def _ranges_us() -> float:
    """What a streamed unit's profiler ranges cost the forward thread with no profiler running:
    the guard at its bind and at its release (a wait's runs only when it blocks)."""
    on = ranges.on

    def per_unit():
        if on():
            pass
        if on():
            pass
    return _loop_us(per_unit)


def _timing_us(pass_spans: list, units: int) -> float:
    """What timing costs the forward thread per unit: the clock read at its bind, the one at its
    release with the compute span, and its share of summing a pass's spans (`pass_spans`, a
    pass of the model just measured)."""
    timing, clock = Timing(), time.perf_counter

    def per_unit():
        bound_at = clock()
        timing.span("compute", "compute", "blocks.1", bound_at, clock())
    t0 = time.perf_counter()
    for _ in range(20):
        timing.close((0, 0.0, 1.0, pass_spans))
    close_us = 1e6 * (time.perf_counter() - t0) / 20
    return _loop_us(per_unit, 50_000) + close_us / units


def _last_pass_spans(timing) -> list:
    """The spans of the last closed pass, from the ring."""
    _, t0, t1, _ = timing.closed[-1]
    return [s for s in list(timing.spans) if s[3] >= t0 and s[4] <= t1]     # list(): workers may append


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vzstream bench session")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--presets", nargs="+", default=["small", "tinyllama-1.1b"])
    ap.add_argument("--prefetch", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=None, help="override the presets' layer count")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--overhead-blocks", type=int, default=200)
    ap.add_argument("--out", default=None, help="also write session.md / session.json here")
    args = ap.parse_args(argv)
    rows = []
    for name in args.presets:
        rows += _bench_preset(name, args, args.device)
    rows.append(_bench_overhead(args, args.device))
    sync(args.device)
    report("session", rows, COLUMNS, vars(args), args.out)
    return 0
