"""The schedule walk: `Streamer` runs from the hooks, binding, releasing and prefetching units
through the pipeline's tickets (DESIGN §4).

Invariants:
- `Streamer` methods run under the pool's lock: from hooks on the forward thread, or from
  `park`/`close` on the thread that holds the lock.
- Every ticket ends bound-then-released or drained; `close()` drains all of them, so no
  thread or slot outlives the session.
- On plan, fetch `g` (global: pass * fetches_per_pass + index) is requested when the forward
  reaches fetch `g - prefetch`; off plan (first pass, a miss, calls outside a pass) units are
  fetched synchronously and released after use. Outputs never depend on which path ran.
"""

from __future__ import annotations

import logging
import time

from .errors import TraceError
from .hooks import bind_params, unbind_params
from .pipeline import Pipeline, SlotPool, Ticket
from .plan import Schedule, make_schedule
from .trace import Tracer

log = logging.getLogger("vzstream")


class Streamer:
    """Walks the schedule from hooks: bind, release, pass start/end, prefetch, drain."""

    def __init__(self, stores: dict, device_pool, pipeline: Pipeline, config, stats, max_slots: int | None,
                 owner=None, measure: bool = False) -> None:
        self.owner = owner                      # the session; another one's call must not run this model
        self.measure = measure                  # measure activations on the first traced pass
        self.activation_nbytes: int | None = None
        self.stores, self.device_pool, self.pipeline = stores, device_pool, pipeline
        self.backend = device_pool.backend
        self.prefetch, self.cache, self.stats = config.prefetch, config.cache, stats
        self.max_slots = max_slots              # a budgeted ring is static: never grow past it
        self.tracer = Tracer()
        self.schedule: Schedule | None = None
        self.in_pass = False
        self.pass_no = 0                        # passes since the schedule was learned
        self.requested = -1                     # highest global fetch index requested
        self.tickets: dict[int, Ticket] = {}    # in flight: requested, not yet bound
        self.held: dict[int, list] = {}         # unit -> [ticket, bind_count]
        self.pass_t0 = 0.0

    # -- passes -----------------------------------------------------------------------------
    def pass_start(self) -> None:
        active = getattr(self.device_pool, "active", None)
        if active is not None and active is not self.owner:
            raise TraceError(
                "this model's session shares a DevicePool with the session whose call is running; calling "
                "it from inside that call would stream both at once past the pool's ring. Call it through "
                "its own session after the outer call returns, or give the sessions separate `pool`s.")
        if self.in_pass:                        # the previous pass died without its end hook
            self.abort()
        if self.measure and self.tracer.trace is None:
            self.backend.begin_measure()
        self.in_pass = True
        self.tracer.start_pass()
        self.pass_t0 = time.perf_counter()

    def pass_failed(self) -> None:
        """The root forward raised (its plain end hook never ran): keep the old trace."""
        if self.in_pass:
            self.abort()

    def pass_end(self) -> None:
        if not self.in_pass:
            return
        self.in_pass = False
        self.stats.passes += 1
        self.stats.wall_s += time.perf_counter() - self.pass_t0
        if self.tracer.end_pass():
            if self.measure:                    # the first traced pass: its activation peak
                self.measure, self.activation_nbytes = False, self.backend.end_measure()
            self._relearn()
        else:
            self.pass_no += 1

    @property
    def pool(self) -> SlotPool:
        return self.device_pool.ring            # looked up each time: a joining session may resize it

    def _relearn(self) -> None:
        self._drain()
        self._release_idle()
        trace, ends = self.tracer.trace, self.tracer.learned_ends
        self.schedule = make_schedule(trace, self.prefetch, self.cache, ends)
        if self.max_slots is not None and self.schedule.num_slots > self.max_slots:
            # Holding units for reuse would overflow the budgeted ring: fetch at every use.
            self.schedule = make_schedule(trace, self.prefetch, "none", ends)
        self.pool.reserve(self.schedule.num_slots)
        self.pass_no, self.requested = 0, -1
        if self.schedule.num_fetches:
            self._request_through(self.prefetch - 1)   # wrap: the next pass starts warm

    # -- units ------------------------------------------------------------------------------
    def bind(self, unit: int) -> None:
        pos = self.tracer.observe(unit) if self.in_pass else None
        fetch = None
        if pos is not None:
            g = self.pass_no * self.schedule.num_fetches + self.schedule.frontier[pos]   # global fetch index
            self._request_through(g + self.prefetch)
            if self.schedule.fetches[pos]:
                fetch = self.tickets.pop(g)
        elif self.tickets and not (self.in_pass and self.tracer.on_plan):
            self._drain()                       # a miss: in-flight prefetches are for the old plan
            self._release_idle()
        entry = self.held.get(unit)
        if entry is not None:                   # held since an earlier use (or bound around this one)
            entry[1] += 1
            entry[0].position = -1 if pos is None else pos
            if fetch is not None:               # only when a unit re-enters itself: drop the copy
                self._drop(fetch)
            return
        if fetch is not None:
            ticket = fetch
            self.stats.prefetched += 1
        else:
            ticket = self.pipeline.submit(self.stores[unit], self.pool.acquire())
            self.stats.sync_fetches += 1
        ticket.position = -1 if pos is None else pos
        self.held[unit] = [ticket, 1]
        self.pipeline.wait(ticket)
        self.backend.wait(ticket)
        bind_params(ticket.store.unit.params, ticket.store.views(ticket.slot))

    def release(self, unit: int) -> None:
        if self.in_pass:
            self.tracer.observe_release()
        entry = self.held.get(unit)
        if entry is None:
            return
        entry[1] -= 1
        ticket = entry[0]
        if entry[1] > 0:
            return
        on_plan = self.in_pass and self.tracer.on_plan and ticket.position >= 0
        if on_plan and not self.schedule.releases[ticket.position]:
            return                              # cache="pass": held until its last use
        self._release_slot(unit)

    def _release_slot(self, unit: int) -> None:
        ticket = self.held.pop(unit)[0]
        self.pipeline.settle(ticket)            # a wait interrupted by Ctrl-C leaves workers writing this slot
        unbind_params(ticket.store.unit.params)
        self.backend.release(ticket)
        self.pool.release(ticket.slot)

    # -- in-flight work ---------------------------------------------------------------------
    def _request_through(self, target: int) -> None:
        while self.requested < target:
            self.requested += 1
            store = self.stores[self.schedule.fetch_unit(self.requested)]
            ticket = self.tickets[self.requested] = self.pipeline.submit(store, self.pool.acquire())
            try:
                self.pipeline.start(ticket)     # after it is held: an interrupt drops it, no leak
            except BaseException:               # Ctrl-C: drop it now (a direct model call has no
                self._drop(self.tickets.pop(self.requested))    # abort to do it), request it again
                self.requested -= 1
                raise

    def _drop(self, ticket: Ticket) -> None:
        self.pipeline.settle(ticket)
        if ticket.error is not None:
            log.debug("vzstream: dropped prefetch of %s that failed: %r", ticket.store.unit.fqn, ticket.error)
        self.backend.release(ticket)
        self.pool.release(ticket.slot)
        self.stats.drained += 1

    def _drain(self) -> None:
        """Finish and drop every in-flight prefetch (after a miss, outside a pass, at close)."""
        if not self.tickets:
            return
        self.requested = min(self.tickets) - 1  # a later on-plan bind requests them again
        for g in list(self.tickets):            # pop first: an interrupted drain never drops one twice
            self._drop(self.tickets.pop(g))

    def _release_idle(self) -> None:
        """Release held units that are not bound right now (their planned reuse is moot)."""
        for unit in [u for u, (_, count) in self.held.items() if count == 0]:
            self._release_slot(unit)

    def relearn_from_scratch(self, max_slots: int | None) -> None:
        """The streamed set changed: forget the trace; the next pass traces again."""
        self.park()
        self.tracer.forget()
        self.schedule, self.max_slots = None, max_slots
        self.pass_no, self.requested = 0, -1

    def park(self) -> None:
        """Hand every slot back (between calls on a shared pool); keep the learned schedule."""
        self._drain()
        for unit in list(self.held):
            self._release_slot(unit)

    def abort(self) -> None:
        """Forget the current pass after an exception: everything back to the pool."""
        self.in_pass = False
        self.tracer.abort_pass()
        self.park()
        if self.schedule is not None:
            self.pass_no, self.requested = 0, -1

    def close(self) -> None:
        self.abort()
        self.pipeline.close()
