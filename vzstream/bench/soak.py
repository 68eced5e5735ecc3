"""`python -m vzstream bench soak`: many streamed passes with changing shapes and trace misses,
and what grew meanwhile: host RSS, the backend's device bytes, threads and file descriptors.

One session on a small stack of blocks with a skip: every `--miss-every`-th pass skips a block
(a trace miss, so the trace is learned again), and the batch and sequence sizes cycle. Every
output is compared with the resident model's, bit for bit. Growth is measured from after a
warm-up (the first `--warmup` passes: allocator and thread pools settle) to the end.
"""

from __future__ import annotations

import argparse
import gc
import threading

import psutil
import torch
from torch import nn

import vzstream

from .common import report

COLUMNS = ["passes", "misses", "outputs_equal", "rss_growth_pct", "device_nbytes_growth", "threads_growth", "fds_growth"]


class _Skippy(nn.Module):
    """Blocks of Linear + norm; `skip` leaves one out (the path changes: a trace miss)."""

    def __init__(self, num_blocks: int = 8, dim: int = 64) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim)) for _ in range(num_blocks))

    def forward(self, x, skip: int = -1):
        for i, block in enumerate(self.blocks):
            if i != skip:
                x = block(x)
        return x


def _sample() -> dict:
    gc.collect()
    proc = psutil.Process()
    return dict(rss=proc.memory_info().rss, threads=threading.active_count(), fds=proc.num_fds())


def _inputs(i: int, dim: int) -> torch.Tensor:
    batch, seq = 1 + i % 3, 4 + (i * 7) % 29               # changing shapes
    return torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(i), dtype=torch.bfloat16)


def soak(args, reference: nn.Module) -> dict:
    """Stream `--passes` passes through one session; `reference` holds the same weights resident."""
    torch.manual_seed(0)
    model = _Skippy().to(torch.bfloat16).eval()             # same seed: the same weights as `reference`
    equal, start = True, None
    with vzstream.session(model, device=args.device, prefetch=args.prefetch) as s:
        device = s.backend.device
        for i in range(args.passes):
            x, skip = _inputs(i, 64).to(device), (i % 8 if i % args.miss_every == 0 else -1)
            out = s(x, skip=skip)
            if i % args.check_every == 0:
                equal &= torch.equal(out, reference(x, skip=skip))
            if i + 1 == args.warmup:
                start = dict(_sample(), device=s.backend.device_nbytes)
        end = dict(_sample(), device=s.backend.device_nbytes)
        misses = s.stats().trace_misses
    return dict(passes=args.passes, misses=misses, outputs_equal=equal,
                rss_growth_pct=100 * (end["rss"] - start["rss"]) / start["rss"],
                device_nbytes_growth=end["device"] - start["device"], threads_growth=end["threads"] - start["threads"],
                fds_growth=end["fds"] - start["fds"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vzstream bench soak", description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--passes", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--miss-every", type=int, default=50, help="every N-th pass skips a block (a trace miss)")
    ap.add_argument("--check-every", type=int, default=10, help="compare every N-th output with the resident model")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not 0 < args.warmup < args.passes:
        ap.error(f"--warmup must be in (0, --passes); got {args.warmup}")
    torch.manual_seed(0)
    reference = _Skippy().to(torch.bfloat16).eval().to(args.device if args.device != "auto" else "cpu")
    with torch.no_grad():
        row = soak(args, reference)
    report("soak", [row], COLUMNS, vars(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
