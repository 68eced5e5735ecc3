"""`prefetch="auto"`: which depth to fetch ahead at, tried on the passes after the trace.

The slots are sized for the deepest depth tried (`AUTO_DEPTHS[-1]`), so every trial stays
within the plan and the outputs do not depend on it. Each depth runs one pass to settle (the
fetches in flight were requested at the old depth; on CUDA a pass's figures arrive one pass
late) and one measured pass. The smallest depth whose stall is at most `STALL_OK` of its pass
wins; if none is, the one that stalled least. Under a budget the pool then plans again with
that depth's slots, so what the deeper ones would have held goes back to resident units.
"""

from __future__ import annotations

AUTO_DEPTHS = (1, 2, 3, 4)
STALL_OK = 0.02          # of a pass's wall time
SETTLE = 1               # passes at a new depth before one is measured


class DepthTuner:
    """Tries `AUTO_DEPTHS` in order; `depth` is the one to run now, `chosen` once decided."""

    def __init__(self) -> None:
        self.index, self.seen = 0, 0
        self.stalls: dict[int, float] = {}     # depth -> stall fraction of its measured pass
        self.chosen: int | None = None
        self.why = "trying depths after the traced pass"

    @property
    def depth(self) -> int:
        return self.chosen if self.chosen is not None else AUTO_DEPTHS[self.index]

    def observe(self, stall_fraction: float) -> bool:
        """A pass closed with `stall_fraction`; True when the depth changes (or is chosen)."""
        if self.chosen is not None:
            return False
        self.seen += 1
        if self.seen <= SETTLE:
            return False
        depth = AUTO_DEPTHS[self.index]
        self.stalls[depth] = stall_fraction
        if stall_fraction <= STALL_OK:
            self._choose(depth, f"the smallest depth tried whose stall was at most {STALL_OK:.0%} of the pass")
        elif self.index == len(AUTO_DEPTHS) - 1:
            best = min(self.stalls, key=self.stalls.get)
            self._choose(best, f"none stalled under {STALL_OK:.0%} of the pass; it stalled least")
        else:
            self.index, self.seen = self.index + 1, 0
        return True

    def _choose(self, depth: int, why: str) -> None:
        tried = ", ".join(f"{d}: {s:.0%}" for d, s in self.stalls.items())
        self.chosen, self.why = depth, f"prefetch={depth}: {why} (stall by depth {tried})"
