"""DevicePool: device memory shared by several sessions, one of them streaming at a time.

The pool owns the backend, the gate (a lock a session takes for each call), one ring of slots
and its members. When a member joins or leaves, measures its activations, or traces a pass
that holds more units than planned, the pool re-plans every member's resident set under its
budget (`plan.plan_pool`), between calls, and applies it: units that no longer fit
are packed and stream from then on, units that now fit are decoded onto the device. A member is
the session's parts below it (units, install, runtime), never the session itself. Between
calls on a shared pool no member holds a slot, only its resident units.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .backends import make_backend
from .config import check_device, resolve_budget
from .errors import ConfigError
from .install import Installed
from .orphans import run_pending
from .pipeline import gil_switch_interval
from .ring import SlotPool
from .plan import MemoryPlan, Needs, SessionPlan, describe_plan, minimum_budget, plan_pool
from .gate import Gate
from .runtime import Streamer

log = logging.getLogger("vzstream")


@dataclass(eq=False)
class Member:
    """One session's parts, as the pool plans and re-plans them."""

    units: list
    installed: Installed
    runtime: Streamer
    needs: Needs
    pack: Callable                  # unit -> its UnitStore (a unit that stops being resident)
    plan: MemoryPlan | None = field(default=None)
    fit_pending: bool = False       # plan again once the traced pass measured the activations
    growth: int = 0                 # of the activation reserve: a generation's KV cache (expect_growth)

    def apply(self, plan: MemoryPlan, admit: bool) -> None:
        """Move units between resident and streamed as `plan` says: those that stop being
        resident (`admit=False`), or those that become resident (`admit=True`). The pool does
        all evictions first, so device memory never holds both the old and the new plan."""
        changed = [u for u in self.units if (u.index in plan.resident) == u.streamed == admit]
        if changed:
            self.runtime.park()
            self.installed.unhook()
            try:
                for unit in changed:
                    if admit:
                        self.installed.admit(unit)
                    else:
                        self.installed.evict(unit, self.pack(unit))
            finally:                            # whatever moved, the units stream as they now are
                self.installed.hook(self.runtime)
                self.runtime.relearn_from_scratch()
                self.runtime.backend.clear_caches()     # cached jobs would keep dropped stores alive
                # Staging and landing buffers for the units that now stream (CUDA), sized here on
                # the thread holding the lock, not by a worker mid-pass.
                self.runtime.backend.prepare(self.needs.prefetch or 0, [u.store for u in self.units if u.streamed])
            log.info("vzstream: re-planned: %d unit(s) %s", len(changed), "now resident" if admit else "now stream")
        self.plan = plan


class DevicePool:
    """`vzstream.DevicePool(device, budget=...)`; pass it as `session(model, pool=pool)`."""

    def __init__(self, device: str = "auto", budget=None, *, backend=None) -> None:
        self.backend = make_backend(check_device(device), backend)
        self.budget = resolve_budget(budget, self.backend.total_memory, "budget")
        self.gate = Gate()
        self.ring = SlotPool(self.backend, 0)
        self.members: list[Member] = []
        self.pending: list = []           # closes of collected sessions, waiting for the lock (`orphans`)

    def __repr__(self) -> str:
        count = len(self.members)
        return (f"<vzstream.DevicePool on {self.backend.device}, {budget_text(self.budget)}, "
                f"{count} open session{'' if count == 1 else 's'}>")

    @property
    def lock(self):
        return self.gate.lock

    @property
    def shared(self) -> bool:
        return len(self.members) > 1

    def plans(self, needs: list[Needs]) -> list[MemoryPlan]:
        """The joint plan of `needs` (pure: raises ConfigError before anything changes)."""
        return plan_pool(needs, self.budget)

    def join(self, member: Member, plans: list[MemoryPlan]) -> None:
        """Add `member` with `plans` (one per member, `member`'s last), applied to the others
        first: what they evict makes room for what the newcomer moves in. Caller holds the lock."""
        run_pending(self)
        for other in self.members:
            other.runtime.park()
        self.members.append(member)
        self.gate.shared = self.shared
        self._apply(plans)

    def replan(self, member: Member, needs: Needs) -> None:
        """`member`'s needs changed (its activations were measured): plan everyone again. Caller
        holds the lock. A plan that no longer fits keeps the old one, with a warning."""
        trial = [needs if m is member else m.needs for m in self.members]
        try:
            plans = self.plans(trial)
        except ConfigError as exc:
            log.warning("vzstream: the measured activations (%d bytes) do not fit the budget even fully "
                        "streamed; keeping the plan. %s", needs.activation_reserve, exc)
            return
        member.needs = needs
        self._apply(plans)

    def expect_growth(self, member: Member, growth: int, what: str) -> None:
        """A generation will grow the KV cache by `growth` bytes (`what` says why): under a budget,
        on a device whose memory in use is known (CUDA; `Headroom`), reserve it now, planning
        again (fewer units resident), or raise the ConfigError that says what fits, before
        anything runs. Caller holds the lock."""
        if growth <= member.growth or member.runtime.headroom is None:     # no budget, or memory not known
            return
        needs = replace(member.needs, activation_reserve=member.needs.activation_reserve - member.growth + growth)
        try:
            plans = self.plans([needs if m is member else m.needs for m in self.members])
        except ConfigError as exc:
            raise ConfigError(f"{what} needs {growth} bytes of KV cache on the device, which the budget cannot hold "
                              f"besides the weights' slots: generate fewer tokens, or {exc}") from exc
        member.growth, member.needs = growth, needs
        self._apply(plans)

    def _fit_depth(self, member: Member) -> None:
        """prefetch="auto" chose a depth: the schedule keeps that many fetches in flight from now
        on, and under a budget the pool plans again with its slots, so the deeper trials' slots
        go back to resident units. Caller holds the lock."""
        runtime = member.runtime
        runtime.depth_chosen = False
        fewer, runtime.prefetch = runtime.prefetch - runtime.depth, runtime.depth
        if fewer > 0 and (self.budget is not None or member.needs.cap is not None):
            self.replan(member, replace(member.needs, num_slots=member.needs.num_slots - fewer, prefetch=runtime.depth))

    def _more_slots(self, member: Member, partial: bool = False) -> None:
        """The traced pass needed more slots than `member`'s budgeted plan counted: plan again
        with that many (keeping fewer units resident), or raise the ConfigError that names the
        budget that holds them. `partial`: the pass stopped where the slots ran out (a block
        calling another from inside its forward), so it may need more than it saw: the error
        also names a budget that holds every streamed unit bound at once."""
        needed, planned = member.runtime.slots_needed, member.needs.num_slots
        member.runtime.slots_needed = 0
        if needed <= planned:
            return
        what = (f"the traced first pass {'binds at least' if partial else 'holds'} {needed} units at once "
                f"(units bound inside one another, or held for reuse under cache='pass', with prefetch in "
                f"flight), more than the {planned} slots planned at open; nothing was allocated past the budget.")
        needs = replace(member.needs, num_slots=needed)
        try:
            plans = self.plans([needs if m is member else m.needs for m in self.members])
        except ConfigError as exc:
            raise ConfigError(f"{what} {exc}{self._sure(member, partial)}") from None
        member.needs = needs
        self._apply(plans)
        if partial:
            raise ConfigError(f"{what} The next call plans for {needed} slots within `vram_budget`."
                              f"{self._sure(member, partial)}")

    def _sure(self, member: Member, partial: bool) -> str:
        """A budget sure to hold every streamed unit of `member` bound at once."""
        if not partial:
            return ""
        count = sum(1 for u in member.units if u.streamed) + member.needs.prefetch + 1
        sure, _ = minimum_budget(list(member.needs.sizes), count, member.needs.activation_reserve, 0,
                                 member.needs.stream_reserve)
        return f" A `vram_budget` of {sure} bytes holds even every streamed unit bound at once."

    def leave(self, member: Member | None) -> None:
        """Drop `member`; with no member left, free the ring and scratch (a model that came from
        this device needs the room to be restored there). Caller holds the lock."""
        if member in self.members:
            self.members.remove(member)
            self.gate.shared = self.shared
            _forget_views(member)               # cached views would keep the slots alive
        self.backend.clear_caches()
        if not self.members:
            self._rebuild_ring(0, {})
            self.backend.free_scratch()

    def rebalance(self) -> None:
        """Plan the remaining members again (after one left and its parameters went back)."""
        if not self.members:
            return
        try:
            self._apply(self.plans([m.needs for m in self.members]))
        except ConfigError as exc:          # they fitted before: keep their plans
            log.warning("vzstream: re-planning the pool after a member left failed: %s", exc)

    def _apply(self, plans: list[MemoryPlan]) -> None:
        """Give each member its plan: evictions first, then the ring resized (rebuilt for other
        slots, or for fewer under a budget), then admissions,
        so the device never holds more than the larger of the old and new plans. Every member
        is parked first: no fetch may be in flight into a ring about to be rebuilt."""
        for member in self.members:
            member.runtime.park()
        for member, plan in zip(self.members, plans):
            member.apply(plan, admit=False)
        slot = max((p.slot_nbytes for p in plans), default=0)
        dedicated = {(id(m.runtime), u): n for m, p in zip(self.members, plans) for u, n in p.dedicated}
        count = max((p.num_slots for p in plans), default=0)
        fewer = any(p.budget is not None for p in plans) and len(self.ring.slots) > count   # prefetch="auto" chose
        if slot != self.ring.slot_nbytes or dedicated != self.ring.dedicated_nbytes or fewer:
            self._rebuild_ring(slot, dedicated)
        for member, plan in zip(self.members, plans):
            member.apply(plan, admit=True)
        for member, plan in zip(self.members, plans):
            member.runtime.use_ring(self.ring, count, plan.budget is not None)
        if any(p.budget is not None for p in plans):   # a budgeted ring is static from here on
            self.ring.reserve(count)

    def _rebuild_ring(self, slot_nbytes: int, dedicated: dict) -> None:
        # Members are parked (no slot in use) whenever the pool lock is free.
        self.ring.close()
        for member in self.members:          # cached views would keep old slots alive
            _forget_views(member)
        self.backend.clear_caches()
        self.ring = SlotPool(self.backend, slot_nbytes, dedicated)
        for member in self.members:          # none may keep the closed ring, whatever fails next
            member.runtime.ring = self.ring

    @contextlib.contextmanager
    def call(self, member: Member, switch_interval: float | None, check_open):
        """Hold the gate for one call of `member` (no gradients, the GIL switch interval lowered);
        after it, plan again if the traced pass measured the activations; after an exception,
        tidy up the runtime (a KeyboardInterrupt skips always_call hooks); on a shared pool, hand
        every slot back."""
        runtime = member.runtime
        with self.gate.held(runtime, _REENTRY), torch.no_grad(), gil_switch_interval(switch_interval):
            check_open()                          # closed while this call waited for the lock?
            try:
                yield
                if member.fit_pending and runtime.activation_nbytes is not None:
                    member.fit_pending = False
                    self.replan(member, replace(member.needs,
                                                activation_reserve=runtime.activation_nbytes + member.growth))
                self._more_slots(member)
                if runtime.depth_chosen:
                    self._fit_depth(member)
            except BaseException as exc:
                runtime.abort()
                if isinstance(exc, ConfigError) and runtime.slots_needed:
                    self._more_slots(member, partial=True)      # raises what to do
                raise
            finally:
                if self.shared:
                    runtime.park()
                run_pending(self)

    def describe(self, member: Member, spec) -> SessionPlan:
        """`s.plan` of `member`: its units, the slots its runtime uses, and the pool's split."""
        runtime = member.runtime
        plan = replace(member.plan, num_slots=max(member.plan.num_slots, runtime.num_slots))
        return describe_plan(member.units, spec, plan, self.backend.alignment, self._split(member), runtime.slots_why)

    def _split(self, member: Member) -> str:
        """How the pool's resident room is shared, when it is ("" for a pool of one)."""
        if not self.shared:
            return ""
        mine = sum(member.needs.sizes[u] for u in member.plan.resident)
        others = sum(m.needs.sizes[u] for m in self.members if m is not member for u in m.plan.resident)
        return (f"pool ({budget_text(self.budget)}) shared by {len(self.members)} sessions: resident here "
                f"{mine / 2**20:.1f} MiB, in the others {others / 2**20:.1f} MiB")

    @property
    def peak_device_nbytes(self) -> int:
        return self.backend.peak_device_nbytes


def budget_text(budget: int | float | None) -> str:
    """A budget (bytes, a share of the device, or None) as the reprs and a shared pool's `s.plan` show it."""
    if budget is None:
        return "no budget"
    if isinstance(budget, float):
        return f"budget {budget:.0%} of the device"
    return f"budget {budget / 2**20:.1f} MiB"


def _forget_views(member: Member) -> None:
    """Drop the slot views `member`'s stores cached (the slots are going)."""
    for unit in member.units:
        if unit.store is not None:
            unit.store.forget_slots()


_REENTRY = ("a vzstream call was made from inside another call on the same pool (a hook, a callback, "
            "or another session's forward); a pool runs one call at a time. Make the call after the "
            "outer one returns, or give the two sessions separate `pool`s.")

__all__ = ["DevicePool", "Member"]
