"""Summarise a `bench gpu` Chrome trace (`trace_prefetch1.json.gz`): what each stage took.

    python docs/probes/read_trace.py OUT/trace_prefetch1.json.gz

Per stage (`vzstream.decode`, `upload`, `bind`, `release`: the ranges the library records), the
count and the median / p90 / total wall time, and how many threads ran it. For `upload` also the
time inside the profiled torch ops (slices included: those keep the GIL) against the time between
them: on a host where the GIL is contended the gaps are where the uploader waited to get it back.
Then the host→device copies the GPU ran (count, bytes, busy time, GB/s) and the time span of the
trace. Reads only the JSON; no torch.
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
from collections import defaultdict


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def stage_of(name: str) -> str | None:
    """"vzstream.upload:model.layers.3" -> "upload"; None for anything else."""
    if not name.startswith("vzstream."):
        return None
    return name[len("vzstream."):].split(":", 1)[0]


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarise_stages(events: list[dict]) -> dict[str, dict]:
    spans = [e for e in events if e.get("ph") == "X" and stage_of(e.get("name", ""))]
    by_stage: dict[str, list[dict]] = defaultdict(list)
    for e in spans:
        by_stage[stage_of(e["name"])].append(e)
    out = {}
    for stage, items in sorted(by_stage.items()):
        durs = [e["dur"] / 1e3 for e in items]          # us -> ms
        out[stage] = dict(count=len(items), median_ms=statistics.median(durs), p90_ms=quantile(durs, 0.9),
                          total_ms=sum(durs), threads=len({e.get("tid") for e in items}))
    uploads = by_stage.get("upload", [])
    if uploads:
        out["upload"].update(_inside_torch_calls(events, uploads))
    return out


def _inside_torch_calls(events: list[dict], uploads: list[dict]) -> dict:
    """Of each upload range, the time covered by the CPU ops directly inside it (same thread)."""
    ops = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            ops[e.get("tid")].append(e)
    inside, calls = [], []
    for u in uploads:
        start, end = u["ts"], u["ts"] + u["dur"]
        mine = [e for e in ops[u.get("tid")] if start <= e["ts"] and e["ts"] + e["dur"] <= end]
        top = [e for e in mine if not any(o is not e and o["ts"] <= e["ts"] and e["ts"] + e["dur"] <= o["ts"] + o["dur"]
                                          for o in mine)]
        inside.append(sum(e["dur"] for e in top) / 1e3)
        calls.append(len(top))
    return dict(in_ops_median_ms=statistics.median(inside), ops_median=statistics.median(calls))


def summarise_copies(events: list[dict]) -> dict | None:
    copies = [e for e in events if e.get("ph") == "X" and "HtoD" in e.get("name", "")]
    if not copies:
        return None
    busy_ms = sum(e["dur"] for e in copies) / 1e3
    nbytes = sum(int(e.get("args", {}).get("bytes", 0)) for e in copies)
    return dict(count=len(copies), gbytes=nbytes / 1e9, busy_ms=busy_ms,
                gbps=nbytes / (busy_ms / 1e3) / 1e9 if busy_ms else 0.0)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    events = load(argv[0])
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e]
    span_ms = (max(e["ts"] + e["dur"] for e in timed) - min(e["ts"] for e in timed)) / 1e3 if timed else 0.0
    print(f"trace span {span_ms:.1f} ms, {len(events)} events")
    print(f"{'stage':<10}{'count':>7}{'median ms':>11}{'p90 ms':>9}{'total ms':>10}{'threads':>9}")
    stages = summarise_stages(events)
    for stage, s in stages.items():
        print(f"{stage:<10}{s['count']:>7}{s['median_ms']:>11.3f}{s['p90_ms']:>9.3f}{s['total_ms']:>10.1f}{s['threads']:>9}")
    if "upload" in stages:
        u = stages["upload"]
        print(f"upload: median {u['in_ops_median_ms']:.3f} ms inside {u['ops_median']:.0f} torch ops, "
              f"{u['median_ms'] - u['in_ops_median_ms']:.3f} ms between them (Python, and waits for the GIL)")
    copies = summarise_copies(events)
    if copies:
        print(f"host->device copies: {copies['count']}, {copies['gbytes']:.2f} GB in {copies['busy_ms']:.1f} ms busy "
              f"({copies['gbps']:.1f} GB/s while busy)")
    print(json.dumps(dict(span_ms=span_ms, stages=stages, copies=copies)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
