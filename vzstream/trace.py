"""The layer-order tracer (docs/design.md, "Trace, schedule, caching").

A *pass* is one call of the root module's forward. The tracer records the order in which
streamed units are bound during a pass. The first pass has no trace (everything is fetched
synchronously); from then on each bind is checked against the learned trace. The first bind
that differs, or a pass that ends early or runs long, is a *miss*: the pass goes off plan,
and the order this pass actually took becomes the trace for the next one.
"""

from __future__ import annotations


class Tracer:
    def __init__(self) -> None:
        self.trace: tuple[int, ...] | None = None
        self.recording: list[int] = []
        self.ends: list[int] = []         # per recorded bind: last bind before its release
        self.open: list[int] = []         # recorded binds not yet released (nesting)
        self.learned_ends: tuple[int, ...] | None = None
        self.position = 0           # next expected position in `trace`
        self.on_plan = False        # this pass has matched the trace so far
        self.misses = 0

    def start_pass(self) -> None:
        self.recording, self.ends, self.open = [], [], []
        self.position = 0
        self.on_plan = self.trace is not None

    def observe(self, unit: int) -> int | None:
        """Record a bind of `unit`. Its trace position if the pass is still on plan, else None."""
        self.open.append(len(self.recording))
        self.recording.append(unit)
        self.ends.append(len(self.recording) - 1)
        if self.on_plan:
            pos = self.position
            if pos < len(self.trace) and self.trace[pos] == unit:
                self.position += 1
                return pos
            self._miss()
        return None

    def observe_release(self) -> None:
        """Record the release matching the innermost open bind (hooks nest like calls)."""
        if self.open:
            i = self.open.pop()
            self.ends[i] = len(self.recording) - 1

    def end_pass(self) -> bool:
        """Close the pass. True when the trace was (re)learned from it."""
        if self.on_plan and self.position != len(self.trace):
            self._miss()              # the pass ended early: an early exit is a miss too
        if self.on_plan:
            return False
        self.trace, self.learned_ends = tuple(self.recording), tuple(self.ends)
        return True

    def forget(self) -> None:
        """Drop the learned trace (the streamed set changed); the miss count stays."""
        self.trace = self.learned_ends = None
        self.on_plan = False

    def abort_pass(self) -> None:
        """The forward raised: keep the old trace, forget this partial pass."""
        self.on_plan = False
        self.recording, self.ends, self.open = [], [], []

    def _miss(self) -> None:
        if self.on_plan:
            self.misses += 1
            self.on_plan = False
