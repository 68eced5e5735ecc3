"""`Timing`: where each pass's time went, for `s.stats()` (the overlap report) and `s.timeline()`.

The stages report spans `(kind, lane, fqn, t0, t1)`, in `time.perf_counter()` seconds, from the
thread that did the work:

    decode   one decode job; lane: the worker thread's name ("forward" for a unit fetched inline)
    upload   one unit's upload: as the host ran it (CPU, fake), or as the device did (CUDA)
    copy     CUDA: the copy stream's part of an upload (raw area and chunks crossing the bus)
    expand   CUDA: the merge stream's part (each landed chunk expanded or merged into the slot)
    compute  a streamed unit, from its bind to its release (lane "compute")
    stall    compute waiting for a unit; lane: the cause, "decode" or "upload" (or "inline": a small
             unit decoded on the forward thread at its bind, cheaper there than on a worker)

A pass's figures are summed when it closes: at its end, or, when the device's spans arrive one
pass late (CUDA), at the end of the next one. `overlap` is the share of the time some decode or
upload ran (their union, `busy_s`) during which compute did not wait.

Invariants:
- Memory stays bounded over any run: the spans in a ring, closed passes in a deque of
  `KEEP_PASSES`, stall totals per unit in a dict over the session's units. The ring holds
  `RING_PASSES` passes of the largest seen (a 70B model's zstd frames are ~17,000 decode jobs a
  pass), at least `RING_MIN` spans (filled within the first passes: growth after a warm-up stays
  0) and at most `RING_MAX` (~35 MiB).
- Any thread appends without a lock: `deque.append` is atomic in CPython. Summing runs on the
  forward thread, once per pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

RING_MIN = 1 << 12          # spans (~130 bytes each)
RING_MAX = 1 << 18
RING_PASSES = 8
KEEP_PASSES = 64            # closed passes kept (per pass figures; the timeline window)
TOP_UNITS = 3
CAUSES = ("decode", "upload")


@dataclass(frozen=True, slots=True)
class PassTimes:
    """One pass's figures (seconds), or the sum of many (`passes` of them)."""

    passes: int = 0
    wall_s: float = 0.0      # inside the root forward
    decode_s: float = 0.0    # decode busy time, summed over the threads that decoded
    upload_s: float = 0.0
    stall_s: float = 0.0     # compute waiting for a unit
    stall_decode_s: float = 0.0   # of stall_s, waiting for a decode (the rest: for an upload)
    stall_inline_s: float = 0.0   # of stall_decode_s, decoding small units inline
    busy_s: float = 0.0      # time some decode or upload ran (their union)
    hidden_s: float = 0.0    # of busy_s, while compute did not wait

    @property
    def compute_s(self) -> float:
        """Forward time not spent waiting: the model's compute, resident units included."""
        return max(0.0, self.wall_s - self.stall_s)

    @property
    def overlap(self) -> float:
        """The share of decode plus upload time hidden behind compute (1.0: nothing to hide)."""
        return self.hidden_s / self.busy_s if self.busy_s > 0 else 1.0

    @property
    def stall_fraction(self) -> float:
        return self.stall_s / self.wall_s if self.wall_s > 0 else 0.0

    def __add__(self, other: "PassTimes") -> "PassTimes":
        return PassTimes(*(a + b for a, b in zip(_values(self), _values(other))))


def _values(p: PassTimes) -> tuple:
    return (p.passes, p.wall_s, p.decode_s, p.upload_s, p.stall_s, p.stall_decode_s, p.stall_inline_s, p.busy_s,
            p.hidden_s)


class Timing:
    """Spans of one session's passes and the figures summed from them."""

    def __init__(self) -> None:
        self.spans: deque = deque(maxlen=RING_MIN)
        self.closed: deque = deque(maxlen=KEEP_PASSES)     # (number, t0, t1, PassTimes)
        # The closed passes' figures, added up in place: a new PassTimes a pass grew RSS by ~270 KB
        # over `bench soak`'s first 4,000 passes (allocator churn), this by nothing measurable.
        self._sums = [0] + [0.0] * (len(_values(PassTimes())) - 1)
        self.stalled: dict[str, list[float]] = {}          # fqn -> seconds stalled, per cause
        self.number = 0                                    # the pass running, or next to run
        self._open: deque = deque(maxlen=RING_MIN)         # spans since the last pass ended
        self._pending = None                               # a pass waiting for its device spans

    def span(self, kind: str, lane: str, fqn: str, t0: float, t1: float) -> None:
        s = (kind, lane, fqn, t0, t1)
        self.spans.append(s)
        self._open.append(s)

    def end_pass(self, t0: float, t1: float, late: bool = False):
        """The pass that ran from `t0` to `t1` ended. Returns the pass to close now: this one, or
        (`late`: its device spans come one pass late) the one before, if any."""
        ended = (self.number, t0, t1, self._open)
        self.number += 1
        self._open = deque(maxlen=self.spans.maxlen)
        if not late:
            return ended
        ended, self._pending = self._pending, ended
        return ended

    @property
    def total(self) -> PassTimes:
        """The figures of every closed pass, added up."""
        return PassTimes(*self._sums)

    def take_pending(self):
        """The pass still waiting for its device spans (None: none is), no longer waiting."""
        ended, self._pending = self._pending, None
        return ended

    def close(self, ended, device_spans=()) -> None:
        """Sum the figures of `ended` (from `end_pass`), with its device spans."""
        number, t0, t1, spans = ended
        spans = list(spans) + list(device_spans)
        if RING_PASSES * len(spans) > self.spans.maxlen:
            # A worker appending to the old ring meanwhile loses that span from the picture only.
            self.spans = deque(self.spans, maxlen=min(RING_MAX, RING_PASSES * len(spans)))
        for s in device_spans:
            self.spans.append(s)
        figures = self._sum(spans, t1 - t0)
        self.closed.append((number, t0, t1, figures))
        sums = self._sums
        for i, v in enumerate(_values(figures)):
            sums[i] += v

    def _sum(self, spans: list, wall_s: float) -> PassTimes:
        """One pass's figures (one loop: this runs on the forward thread at every pass end)."""
        busy, waits, stalled = [], [], self.stalled
        decode_s = upload_s = stall_s = stall_upload_s = stall_inline_s = 0.0
        for kind, lane, fqn, a, b in spans:
            if kind == "stall":
                waits.append((a, b))
                stall_s += b - a
                if lane == "upload":
                    stall_upload_s += b - a
                elif lane == "inline":
                    stall_inline_s += b - a
                entry = stalled.get(fqn)
                if entry is None:
                    entry = stalled[fqn] = [0.0, 0.0]
                entry[lane == "upload"] += b - a
            elif kind == "decode":
                busy.append((a, b))
                decode_s += b - a
            elif kind == "upload":
                busy.append((a, b))
                upload_s += b - a
        busy_s = _covered(busy)
        # The busy time hidden is busy minus its overlap with the stalls: |busy | stalls| - |stalls|.
        hidden_s = max(0.0, _covered(busy + waits) - _covered(waits)) if waits else busy_s
        return PassTimes(1, wall_s, decode_s, upload_s, stall_s, stall_s - stall_upload_s, stall_inline_s, busy_s,
                         hidden_s)

    def recent(self, n: int, steady: bool = False) -> list[PassTimes]:
        """The figures of the last `n` closed passes, oldest first; `steady`: without the
        session's first pass (it traces, fetching each unit as it is reached) while others exist."""
        closed = list(self.closed)
        if steady and len(closed) > 1:
            closed = [c for c in closed if c[0] > 0]
        return [p for *_, p in closed[-n:]]

    def worst_units(self, n: int = TOP_UNITS) -> list[tuple[str, float, str]]:
        """(fqn, seconds stalled, main cause) of the `n` units compute waited for the longest."""
        ranked = sorted(list(self.stalled.items()), key=lambda kv: -sum(kv[1]))[:n]   # list(): one C call
        return [(fqn, sum(s), CAUSES[s[1] > s[0]]) for fqn, s in ranked if sum(s) > 0]

    def window(self, passes: int) -> tuple[float, float, list]:
        """(start, end, [(number, t0, t1, PassTimes)]) of the last `passes` closed passes, from a
        little before the first: where the decodes prefetched between passes ran."""
        closed = list(self.closed)
        shown = closed[-passes:]
        if not shown:
            return 0.0, 0.0, []
        start, end = shown[0][1], shown[-1][2]
        before = closed[-passes - 1][2] if len(closed) > passes else start
        return max(before, start - 0.25 * (end - start) / len(shown)), end, shown


def stall_spans(fqn: str, t0: float, t1: float, decoded_at: float, uploaded_at: float) -> list:
    """The stall spans of compute waiting for `fqn` from `t0` to `t1`: upload's while its upload
    ran (from `decoded_at` to `uploaded_at`), decode's before and after; all upload's when it had
    nothing to decode (`decoded_at` 0). After the upload, what is left is the forward thread
    waking up: slow when a decode worker holds the GIL (pipeline.gil_switch_interval)."""
    if not decoded_at:
        return [("stall", "upload", fqn, t0, t1)] if t1 > t0 else []
    a, b = min(max(decoded_at, t0), t1), min(max(uploaded_at, t0), t1)
    parts = (("decode", t0, a), ("upload", a, b), ("decode", b, t1))
    return [("stall", cause, fqn, x, y) for cause, x, y in parts if y > x]


def _covered(intervals: list) -> float:
    """The time `intervals` cover, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - (a if a > end else end)
            end = b
    return total
