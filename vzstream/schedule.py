"""The fetch schedule over a learned trace: pure, so every decision is testable on CPU.

`make_schedule(trace, prefetch, cache)` says, for every position of a pass, whether that use
fetches or reuses a held slot, whether the slot is released after it, and how many device slots
the schedule needs at most (simulated over two passes, because it wraps around: the last units
of pass p prefetch the first units of pass p+1).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """What happens at each trace position. A *fetch* is a decode+upload into a fresh slot."""

    trace: tuple[int, ...]            # unit index used at each position of a pass
    fetches: tuple[bool, ...]         # this position fetches (else: reuses the slot held since an earlier use)
    releases: tuple[bool, ...]        # the slot is released after this position's use
    frontier: tuple[int, ...]         # index of the latest fetch at or before each position
    fetch_units: tuple[int, ...]      # unit of each fetch, in pass order
    prefetch: int
    num_slots: int                    # most slots occupied at once (held + in flight), over the wrap

    @property
    def num_fetches(self) -> int:
        return len(self.fetch_units)

    def fetch_unit(self, g: int) -> int:
        """Unit of global fetch `g` (fetch `g % num_fetches` of pass `g // num_fetches`)."""
        return self.fetch_units[g % len(self.fetch_units)]


def make_schedule(trace, prefetch: int, cache: str, ends=None) -> Schedule:
    """Fetch/release flags per position and the slot count the schedule needs.

    `ends[i]` is the last position bound before the use at position `i` was released (a unit
    that encloses others, e.g. a module owning parameters with children that own more, is
    held while they run); without it every use is released before the next bind.
    """
    trace = tuple(trace)
    ends = tuple(range(len(trace))) if ends is None else tuple(ends)
    if cache == "none":
        fetches = releases = tuple(True for _ in trace)
    else:
        first = {u: i for i, u in reversed(list(enumerate(trace)))}
        last = {u: i for i, u in enumerate(trace)}
        fetches = tuple(first[u] == i for i, u in enumerate(trace))
        releases = tuple(last[u] == i for i, u in enumerate(trace))
    frontier = tuple(n - 1 for n in itertools.accumulate(fetches))
    fetch_units = tuple(u for u, f in zip(trace, fetches) if f)
    freed_after = [0] * len(trace)              # slots freed right after each position's bind
    for pos, end in enumerate(ends):
        freed_after[max(pos, min(end, len(trace) - 1))] += releases[pos]
    peak = _peak_slots(len(fetch_units), freed_after, frontier, prefetch)
    return Schedule(trace, fetches, releases, frontier, fetch_units, prefetch, peak)


def _peak_slots(num_fetches: int, freed_after, frontier, prefetch: int) -> int:
    """Simulate two passes (the schedule wraps): at each bind, fetches up to frontier+prefetch
    are in flight; slots free after the binds their units enclose."""
    if num_fetches == 0:
        return 0
    occupied, requested, peak = 0, -1, 0
    for p in range(2):
        for pos in range(len(frontier)):
            target = p * num_fetches + frontier[pos] + prefetch
            occupied += max(0, target - requested)
            requested = max(requested, target)
            peak = max(peak, occupied)
            occupied -= freed_after[pos]
    return peak
