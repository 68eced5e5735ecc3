"""The runtime: the schedule walk. `Streamer` runs from the hooks, binding, releasing and
prefetching units through the pipeline's tickets, over a ring of slots it is handed.

Invariants:
- `Streamer` methods run under the pool's lock: from hooks on the forward thread, or from
  `park`/`close` on the thread that holds the lock (or `abort` from the thread that takes back
  a hold a Ctrl-C cut short, once that pass has left its thread's stack).
- Every ticket ends bound-then-released or drained; `close()` drains all of them, so no
  thread or slot outlives the session.
- On plan, fetch `g` (global: pass * fetches_per_pass + index) is requested when the forward
  reaches fetch `g - prefetch`, as soon as a slot is free for it: requests go in order, and one
  that finds no free slot (a unit's dedicated slot still in use) waits for the next release.
  Off plan (first pass, a miss, calls outside a pass) units are fetched synchronously and
  released after use. Outputs never depend on which path ran.
- The ring never grows past the plan's slot count under a budget: a traced pass that needs
  more records how many (`slots_needed`) and the pool plans again after the call, or raises
  `ConfigError` naming the budget that fits; nothing exceeds the budget meanwhile.
- The runtime alone writes the counters (`Counters`); everything else reads them.
- Each stage runs inside its profiler range (`ranges.py`) and reports its span to `Timing`
  (`timing.py`): on the host clock, or (a fetch with a device timing record, CUDA on plan) on
  the device's, read one pass late (`backends/timer.py`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from . import ranges, standin
from .errors import ConfigError, StreamedWeightError, TraceError
from .gate import Gate
from .hooks import bind_params, unbind_params
from .pipeline import Pipeline, Ticket
from .ring import SlotPool
from .schedule import Schedule, make_schedule
from .trace import Tracer
from .tune import Tuner  # noqa: F401 (the type of `tuners`)

log = logging.getLogger("vzstream")


@dataclass
class Counters:
    """What the runtime counts while it streams (read by `Session.stats`)."""

    passes: int = 0                  # root forwards completed
    decodes: int = 0                 # unit fetches submitted (prefetched or synchronous)
    prefetched: int = 0              # binds served by a prefetch already in flight
    sync_fetches: int = 0            # binds that had to fetch synchronously (first pass, misses)
    drained: int = 0                 # prefetches dropped unused (a miss, a park between calls, close)
    slot_overflows: int = 0          # slots allocated beyond the plan's count (no budget, off plan only)
    decode_s: float = 0.0            # worker time spent decoding (summed over threads)
    wall_s: float = 0.0              # time inside root forwards (stalls: `timing.Timing`)
    _lock: ClassVar[threading.Lock] = threading.Lock()   # workers add decode time concurrently

    def add_decode_s(self, seconds: float) -> None:
        with self._lock:
            self.decode_s += seconds

    def as_dict(self) -> dict:
        return asdict(self)


def _refuse_capture() -> None:
    """A compiler tracing the forward, or a CUDA graph capturing it, would record one pass of
    hooks and slots as if they were constant: refuse at the call, before anything is fetched."""
    if torch.compiler.is_compiling() or _in_compiled_region():
        raise TraceError(
            "a streamed model cannot run under `torch.compile`: its weights arrive in reused slots during the "
            "forward, which a compiled graph would treat as constant (or recompile at every unit). Call the "
            "session (or the model) uncompiled; compile submodules that do not stream, if you need to.")
    if torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise TraceError(
            "a streamed model cannot be captured in a CUDA graph: the graph would replay one pass's uploads "
            "into slots the next pass reuses. Capture the model outside the session, all resident, if you need to.")


def _refuse_autograd() -> None:
    """Autograd would save the bound weights for backward, and they leave with their unit: a
    backward would read stand-ins or another unit's bytes in a reused slot."""
    raise StreamedWeightError(
        "the model was called with autograd on inside a vzstream session: its streamed weights leave after each "
        "unit's forward, so a backward would read other weights. A session is for inference: call the model under "
        "`torch.no_grad()` or `torch.inference_mode()` (`s(...)` and `s.generate(...)` do), and train or "
        "backpropagate outside the session.")


try:
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _dynamo_callback
except ImportError:                          # a torch without Dynamo: nothing compiles
    _dynamo_callback = None


def _in_compiled_region() -> bool:
    """Whether a `torch.compile`d function is running this (Dynamo runs what it cannot trace,
    these hooks, eagerly, between graphs: `is_compiling()` is False there)."""
    return _dynamo_callback is not None and _dynamo_callback() not in (None, False)


class Streamer:
    """Walks the schedule from hooks: bind, release, pass start/end, prefetch, drain."""

    def __init__(self, units: list, gate: Gate, pipeline: Pipeline, *, prefetch: int, cache: str,
                 measure: bool = False, tuners: tuple = ()) -> None:
        self.units = {u.index: u for u in units}
        self.gate, self.pipeline, self.backend = gate, pipeline, pipeline.backend
        # `prefetch` sizes the schedule's slots; `depth` is how far ahead fetches are requested:
        # the same, unless prefetch="auto" tries smaller depths within those slots (`tuners`:
        # tune.Tuner of "prefetch" and/or "workers", tried in that order).
        self.prefetch, self.cache, self.counters = prefetch, cache, pipeline.counters
        self.tuners = list(tuners)
        self.depth = next((t.value for t in self.tuners if t.name == "prefetch"), prefetch)
        self.depth_chosen = False               # the depth was chosen: the pool plans with its slots
        self.measure = measure                  # measure activations on the first traced pass
        self.activation_nbytes: int | None = None
        self.ring: SlotPool | None = None
        self.num_slots, self.fixed = 0, False   # the plan's slot count; fixed: under a budget
        self.slots_needed = 0                   # a traced pass needed more slots than a budget counted
        self.slots_why = ""
        self.tracer = Tracer()
        self.schedule: Schedule | None = None
        self.in_pass = False
        self.pass_no = 0                        # passes since the schedule was learned
        self.requested = -1                     # highest global fetch index requested
        self.wanted = -1                        # highest global fetch index prefetch asks for
        self.tickets: dict[int, Ticket] = {}    # in flight: requested, not yet bound
        self.held: dict[int, list] = {}         # unit -> [ticket, bind_count]
        self.pass_t0 = 0.0
        self.timing = pipeline.timing           # where each pass's time went
        self.timer = None                       # the backend's device timing (CUDA, once a schedule is learned)
        self.pass_base = 0                      # `timing.number` of the pass the schedule's pass 0 is
        self.undo_edits = None                  # Installed.undo_edits, run once a stand-in refused a use
        self.headroom = None                    # under a budget, where memory in use is known (headroom.py)
        self.refusals = standin.refusals
        if self.tuners and self.tuners[0].name == "workers":
            self._use(self.tuners[0])           # its first try (no thread has started yet)

    def use_ring(self, ring: SlotPool, num_slots: int, fixed: bool) -> None:
        """The ring to fetch into, and the plan's slot count (called while parked)."""
        learned = self.schedule.num_slots if self.schedule is not None and not fixed else 0
        self.ring, self.num_slots, self.fixed = ring, max(num_slots, learned), fixed
        if not learned > num_slots:
            self.slots_why = ""

    # -- passes -----------------------------------------------------------------------------
    def pass_start(self) -> None:
        _refuse_capture()
        if torch.is_grad_enabled() and any(u.streamed for u in self.units.values()):
            _refuse_autograd()
        gate = self.gate
        gate.reclaim_stale()                    # a direct call a Ctrl-C cut short, on any thread
        if gate.owner != threading.get_ident():
            # A direct `model(x)` waits for the pool like a session call; the root's call frame
            # stays on the stack for the whole forward.
            gate.acquire(self, sys._getframe(2))
        active = gate.active
        if active is not None and active is not self:
            raise TraceError(
                "this model's session shares a DevicePool with the session whose call is running; calling "
                "it from inside that call would stream both at once past the pool's ring. Call it through "
                "its own session after the outer call returns, or give the sessions separate `pool`s.")
        if self.in_pass:                        # the previous pass died without its end hook
            self.abort()
        if self.refusals != standin.refusals and self.undo_edits is not None:
            self.refusals = standin.refusals    # a conversion refused part-way: undo what it reached
            self.undo_edits()
        if self.headroom is not None:           # raises before a pass that would cross the budget
            self.headroom.check(enforce=self.tracer.trace is not None)
        if self.headroom is not None or (self.measure and self.tracer.trace is None):
            self.backend.begin_measure()
        self.in_pass = True
        self.tracer.start_pass()
        self.pass_t0 = time.perf_counter()
        if self.timer is not None:
            self.timer.pass_started(self.timing.number, self.pass_t0)

    def pass_failed(self) -> None:
        """The root's last hook, run whether the forward returned or raised (then the plain end
        hook did not run: keep the old trace). A direct call gives the gate back only here: once
        it is back, another thread's pass may start on this same runtime."""
        if self.in_pass:
            self.abort()
        self._end_direct()

    def _end_direct(self) -> None:
        """A direct call gives the lock back with its pass (a session call keeps it)."""
        gate = self.gate
        if gate.entry is not None and gate.active is self and gate.owner == threading.get_ident():
            if gate.shared:                     # between calls no member of a shared pool holds a slot
                self.park()
            gate.release()

    def pass_end(self) -> None:
        if not self.in_pass:
            return
        self.in_pass = False
        t1 = time.perf_counter()
        self.counters.passes += 1
        self.counters.wall_s += t1 - self.pass_t0
        self._end_timing(t1)
        if self.headroom is not None:
            self.headroom.ended(self.backend.end_measure())
        if self.tracer.end_pass():
            if self.measure:                    # the first traced pass: its activation peak
                self.measure, self.activation_nbytes = False, self.backend.end_measure()
            self._relearn()
        else:
            self.pass_no += 1

    def _end_timing(self, t1: float) -> None:
        """This pass's spans end here. Close the pass whose figures are complete: this one, or
        the one before when the device times fetches (its events are read one pass late)."""
        timer = self.timer
        ended = self.timing.end_pass(self.pass_t0, t1, late=timer is not None)
        if ended is not None:
            self.timing.close(ended, timer.read(ended[0]) if timer is not None else ())
            if self.tuners and self.schedule is not None:
                self._tune(self.timing.recent(1)[-1].stall_fraction)

    def _tune(self, stall_fraction: float) -> None:
        """"auto" options: the one being tried sees the pass that closed, and may move on; once
        it has chosen, the next one starts trying."""
        tuner = next((t for t in self.tuners if t.chosen is None), None)
        if tuner is None or not tuner.observe(stall_fraction):
            return
        self._use(tuner)
        following = next((t for t in self.tuners if t.chosen is None), None)
        if following is not None and following is not tuner:
            self._use(following)

    def _use(self, tuner) -> None:
        """Run at what `tuner` has now: a depth, or a number of decode threads."""
        if tuner.name == "prefetch":
            self.depth, self.depth_chosen = tuner.value, tuner.chosen is not None
        elif tuner.value != self.pipeline.workers.num_threads:
            self._drain()                       # no fetch in flight while the threads change
            self.pipeline.resize(tuner.value)

    def _relearn(self) -> None:
        self._drain()
        self._release_idle()
        trace, ends = self.tracer.trace, self.tracer.learned_ends
        schedule = make_schedule(trace, self.prefetch, self.cache, ends)
        if schedule.num_slots > self.num_slots:
            if self.fixed:                      # the budget counted fewer: the pool plans again
                self.slots_needed = schedule.num_slots      # after this call, or says what fits
                self.tracer.forget()
                self.schedule = None
                return
            self.num_slots = schedule.num_slots
            self.slots_why = f"the traced pass holds {schedule.num_slots} units at once"
        self.schedule = schedule
        self.ring.reserve(schedule.num_slots)
        self.pass_no, self.requested, self.wanted = 0, -1, -1
        self.pass_base = self.timing.number
        if self.timer is None or not self.timer.fits(schedule.num_fetches, self.prefetch):
            self.timer = self.backend.device_timer(schedule.num_fetches, self.prefetch)   # events made here, once
        if schedule.num_fetches:
            self._request_through(self.depth - 1)   # wrap: the next pass starts warm

    # -- units ------------------------------------------------------------------------------
    def bind(self, unit: int) -> None:
        pos = self.tracer.observe(unit) if self.in_pass else None
        fetch = None
        if pos is not None:
            g = self.pass_no * self.schedule.num_fetches + self.schedule.frontier[pos]   # global fetch index
            if self.schedule.fetches[pos] and self.requested < g and not self._request(g):
                self.requested = self.wanted = g    # no slot came free for it: fetched below, synchronously
            self._request_through(g + self.depth)
            if self.schedule.fetches[pos]:
                fetch = self.tickets.pop(g, None)
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
            self.counters.prefetched += 1
        else:
            ticket = self.pipeline.submit(self.units[unit].store, self._acquire(unit))
            self.counters.sync_fetches += 1
        ticket.position = -1 if pos is None else pos
        self.held[unit] = [ticket, 1]
        if ticket.timing is not None:
            self.timer.reach(ticket.timing)     # before any wait: the device stall starts here
        self.pipeline.wait(ticket)
        if ranges.on():
            with ranges.stage_range("bind", ticket.store.unit.fqn):
                self._bind(ticket)
        else:
            self._bind(ticket)
        ticket.bound_at = time.perf_counter()

    def _bind(self, ticket: Ticket) -> None:
        self.backend.wait(ticket)
        bind_params(ticket.store.unit.params, ticket.store.views(ticket.slot), ticket.store.stand_ins)

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
        if ticket.timing is not None:
            self.timer.release(ticket.timing)
        elif ticket.bound_at:                   # 0: its bind raised (a failed decode)
            self.timing.span("compute", "compute", ticket.store.unit.fqn, ticket.bound_at, time.perf_counter())
        if self.wanted > self.requested:        # a request waited for this slot
            self._request_through(self.wanted)

    def _release_slot(self, unit: int) -> None:
        ticket = self.held.pop(unit)[0]
        self.pipeline.settle(ticket)            # a wait interrupted by Ctrl-C leaves workers writing this slot
        if ranges.on():
            with ranges.stage_range("release", ticket.store.unit.fqn):
                self._unbind(ticket)
        else:
            self._unbind(ticket)

    def _unbind(self, ticket: Ticket) -> None:
        unbind_params(ticket.store.unit.params, ticket.store.stand_ins)
        self.backend.release(ticket)
        self.ring.release(ticket.slot)

    def _acquire(self, unit: int):
        """A slot for a synchronous fetch of `unit`: one beyond the plan only without a budget."""
        slot = self.ring.acquire((id(self), unit), self.num_slots)
        if slot is None and self.fixed:         # the traced pass nests deeper than the plan counted
            self.slots_needed = len(self.held) + len(self.tickets) + 1
            raise ConfigError(f"the traced first pass binds at least {self.slots_needed} units at once")
        if slot is None:
            self.counters.slot_overflows += 1
            slot = self.ring.acquire((id(self), unit), None)
        return slot

    # -- in-flight work ---------------------------------------------------------------------
    def _request_through(self, target: int) -> None:
        self.wanted = max(self.wanted, target)
        while self.requested < target and self._request(self.requested + 1):
            pass

    def _request(self, g: int) -> bool:
        """Request fetch `g` (the next in order) if a slot is free for it."""
        unit = self.units[self.schedule.fetch_unit(g)]
        slot = self.ring.acquire((id(self), unit.index), self.num_slots)
        if slot is None:
            return False                        # asked again at the next release, or at its bind
        self.requested = g
        timing = None
        if self.timer is not None:              # its record: by pass, and by place in the pass
            n = self.schedule.num_fetches
            timing = self.timer.record(self.pass_base + g // n, g % n, unit.fqn)
        self.tickets[g] = self.pipeline.submit(unit.store, slot, timing)
        return True

    def _drop(self, ticket: Ticket) -> None:
        self.pipeline.settle(ticket)
        if ticket.error is not None:
            log.debug("vzstream: dropped prefetch of %s that failed: %r", ticket.store.unit.fqn, ticket.error)
        self.backend.release(ticket)
        self.ring.release(ticket.slot)
        self.counters.drained += 1

    def _drain(self) -> None:
        """Finish and drop every in-flight prefetch (after a miss, outside a pass, at close)."""
        self.wanted = self.requested = min(self.tickets, default=self.requested + 1) - 1
        for g in list(self.tickets):            # pop first: an interrupted drain never drops one twice
            self._drop(self.tickets.pop(g))

    def _release_idle(self) -> None:
        """Release held units that are not bound right now (their planned reuse is moot)."""
        for unit in [u for u, (_, count) in self.held.items() if count == 0]:
            self._release_slot(unit)

    def relearn_from_scratch(self) -> None:
        """The streamed set changed: forget the trace; the next pass traces again."""
        self.park()
        self.tracer.forget()
        self.schedule = None
        self.pass_no, self.requested, self.wanted = 0, -1, -1

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
            self.pass_no, self.requested, self.wanted = 0, -1, -1
            self.pass_base = self.timing.number   # the failed pass never ended: the next has its number

    def close(self) -> None:
        self.abort()
        self.pipeline.close()
        ended = self.timing.take_pending()
        if ended is not None:                   # the last pass's device spans: those done by now
            self.timing.close(ended, self.timer.read(ended[0], last=True))
