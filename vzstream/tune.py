"""`prefetch="auto"` and `workers="auto"`: tried on the passes after the trace.

The slots are sized for the deepest depth tried (`AUTO_DEPTHS[-1]`), and the decode threads
for the most tried, so every trial stays within the plan and the outputs do not depend on it.
Each value runs one pass to settle (the fetches in flight were requested before it; on CUDA a
pass's figures arrive one pass late) and one measured pass. The smallest value whose stall is
at most `STALL_OK` of its pass wins; if none is, the one that stalled least. The depth is
tuned first, then the threads at that depth. Under a budget the pool then plans again with the
chosen depth's slots, so what the deeper ones would have held goes back to resident units.
"""

from __future__ import annotations

AUTO_DEPTHS = (1, 2, 3, 4)
STALL_OK = 0.02          # of a pass's wall time
SETTLE = 1               # passes at a new value before one is measured


def auto_workers(cores: int) -> tuple[int, ...]:
    """The decode thread counts `workers="auto"` tries: powers of two up to the cores (at least
    two: a decode releases the GIL while it waits on memory)."""
    top = max(2, cores)
    return tuple(n for n in (1, 2, 4, 8, 16) if n < top) + (top,)


class Tuner:
    """Tries `choices` of the option `name` in order; `value` is the one to run now."""

    def __init__(self, name: str, choices: tuple[int, ...]) -> None:
        self.name, self.choices = name, choices
        self.index, self.seen = 0, 0
        self.stalls: dict[int, float] = {}     # value -> stall fraction of its measured pass
        self.chosen: int | None = None
        self.why = f"trying {name} values after the traced pass"

    @property
    def value(self) -> int:
        return self.chosen if self.chosen is not None else self.choices[self.index]

    def observe(self, stall_fraction: float) -> bool:
        """A pass closed with `stall_fraction`; True when the value changes (or is chosen)."""
        if self.chosen is not None:
            return False
        self.seen += 1
        if self.seen <= SETTLE:
            return False
        value = self.choices[self.index]
        self.stalls[value] = stall_fraction
        if stall_fraction <= STALL_OK:
            self._choose(value, f"the smallest value tried whose stall was at most {STALL_OK:.0%} of the pass")
        elif self.index == len(self.choices) - 1:
            best = min(self.stalls, key=self.stalls.get)
            self._choose(best, f"none stalled under {STALL_OK:.0%} of the pass; it stalled least")
        else:
            self.index, self.seen = self.index + 1, 0
        return True

    def _choose(self, value: int, why: str) -> None:
        tried = ", ".join(f"{v}: {s:.0%}" for v, s in self.stalls.items())
        self.chosen, self.why = value, f"{self.name}={value}: {why} (stall by value {tried})"
