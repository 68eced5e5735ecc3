"""`DeviceTimer`: when each fetch on plan ran on the GPU (its copies, its expansion, the compute
that waited for it), from CUDA timing events, as `Timing` spans (`timing.py`) on the host clock.

On CUDA the forward thread never blocks on a unit: the compute stream waits on an event. A
stall happens on the device only, and only events can time it. The rules, each for a reason:

- Events are made once, when a schedule is learned, and re-recorded every pass: an Event's
  destructor hands the GIL over (cuda.py), and `tests/test_calls.py` checks no fetch makes one.
- A fetch's record is picked by its pass number modulo `depth` and its place in the pass. A
  pass's records are read at the end of the next pass; `depth` sets keep them until then (a
  fetch is requested at most `prefetch` fetches ahead of its use).
- Reading never synchronises: a pass whose successor's anchor has not run yet (`query()`) is
  left untimed, and so is a record missing a point (a fetch dropped unbound, a failed upload).
- The device's clock is put on the host's by each pass's anchor, recorded on the compute stream
  as the pass starts, as if the device ran it at once: true when the host waited for the
  previous pass's output (generation does, for each token); otherwise device spans show early.

A record's points, in `POINTS` order: `reach` (compute stream, as the forward thread reaches the
bind, before any wait), `start` and `copied` (copy stream: before the first copy, after the
last), `expand` and `merged` (merge stream: before the first kernel, after the last), `release`
(compute stream). Upload: start → max(copied, merged); stall: reach → that, when later, split
where the host's decode ended (`decoded_at`, set by the pipeline before the upload).
"""

from __future__ import annotations

from ..timing import stall_spans

POINTS = ("reach", "start", "copied", "expand", "merged", "release")
REACH, START, COPIED, EXPAND, MERGED, RELEASE = range(len(POINTS))
REQUIRED = (REACH, START, COPIED, MERGED, RELEASE)      # `expand`: only an image with chunks
_UNMARKED = [False] * len(POINTS)


class FetchRecord:
    """The events of one fetch; re-recorded by the fetch of the same place `depth` passes later."""

    __slots__ = ("events", "marked", "number", "fqn", "decoded_at")

    def __init__(self, events: list) -> None:
        self.events, self.marked = events, list(_UNMARKED)
        self.number, self.fqn, self.decoded_at = -1, "", 0.0

    def mark(self, point: int, stream) -> None:
        """Record `point` on `stream` (each point from one thread: no lock)."""
        stream.record_event(self.events[point])
        self.marked[point] = True


class DeviceTimer:
    def __init__(self, cuda, device, num_fetches: int, prefetch: int) -> None:
        self.cuda, self.device = cuda, device
        self.num_fetches, self.depth = num_fetches, _depth(num_fetches, prefetch)
        self.records = [[FetchRecord([self._event() for _ in POINTS]) for _ in range(num_fetches)]
                        for _ in range(self.depth)]
        self.anchors = [self._event() for _ in range(self.depth)]
        self.anchored = [(-1, 0.0)] * self.depth     # (pass number, host time) of each anchor's record

    def _event(self):
        return self.cuda.Event(enable_timing=True)

    def fits(self, num_fetches: int, prefetch: int) -> bool:
        return num_fetches <= self.num_fetches and _depth(num_fetches, prefetch) <= self.depth

    def _compute(self):
        return self.cuda.current_stream(self.device)

    # -- the forward thread ------------------------------------------------------------------
    def pass_started(self, number: int, t_host: float) -> None:
        d = number % self.depth
        self._compute().record_event(self.anchors[d])
        self.anchored[d] = (number, t_host)

    def record(self, number: int, index: int, fqn: str) -> FetchRecord:
        """The record of fetch `index` of pass `number`, cleared for it (before its jobs run)."""
        rec = self.records[number % self.depth][index]
        rec.number, rec.fqn, rec.decoded_at = number, fqn, 0.0
        rec.marked[:] = _UNMARKED
        return rec

    def reach(self, rec: FetchRecord) -> None:
        rec.mark(REACH, self._compute())

    def release(self, rec: FetchRecord) -> None:
        rec.mark(RELEASE, self._compute())

    def read(self, number: int, last: bool = False) -> list:
        """Spans of pass `number`, once the device ran it: known when the next pass's anchor has
        run, or (`last`: no pass follows) record by record."""
        d, after = number % self.depth, (number + 1) % self.depth
        anchor_no, t_host = self.anchored[d]
        if anchor_no != number:
            return []
        if not last and (self.anchored[after][0] != number + 1 or not self.anchors[after].query()):
            return []                           # the device is more than a pass behind: untimed
        anchor, spans = self.anchors[d], []
        for rec in self.records[d]:
            if rec.number != number or not all(rec.marked[p] for p in REQUIRED):
                continue
            if last and not (anchor.query() and rec.events[RELEASE].query()):
                continue
            at = [t_host + anchor.elapsed_time(e) / 1e3 if rec.marked[p] else None for p, e in enumerate(rec.events)]
            spans += _spans(rec, at)
        return spans


def _depth(num_fetches: int, prefetch: int) -> int:
    return 3 + prefetch // max(1, num_fetches)


def _spans(rec: FetchRecord, at: list) -> list:
    fqn, reach = rec.fqn, at[REACH]
    ready = max(at[COPIED], at[MERGED])
    out = [("upload", "copy", fqn, at[START], ready), ("copy", "copy", fqn, at[START], at[COPIED])]
    if at[EXPAND] is not None:
        out.append(("expand", "expand", fqn, at[EXPAND], at[MERGED]))
    out += stall_spans(fqn, reach, ready, rec.decoded_at, ready)
    out.append(("compute", "compute", fqn, max(reach, ready), at[RELEASE]))
    return out
