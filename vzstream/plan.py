"""The memory plan: which units stay resident, and the one slot layout every part reads.

Pure arithmetic over unit sizes, so every decision is testable on CPU. A `MemoryPlan` fixes
the slot size and count; the ring allocates at most that, staging reads it, and a budget counts
it. Units larger than the ring's slots never widen the ring:

- under a budget they stay resident (a slot of their size would cost as much, and streams);
- without one they stream through a dedicated slot of their own, so finer `units` never need
  more device memory than coarser ones.

`plan_pool` plans every member of a `DevicePool` at once, under the pool's budget: the units
kept resident are those that save the most streamed bytes per pass per byte of device memory
(every unit fetched once a pass saves its own size: the same ratio), spread evenly over all
members, so each gets an equal share. A member's own `vram_budget` stays a cap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import ConfigError
from .units import unit_nbytes

MIB = 1 << 20


@dataclass(frozen=True)
class MemoryPlan:
    """Which units stay resident, and the slot layout: `num_slots` slots of `slot_nbytes`, plus
    one slot of its own for each unit in `dedicated`."""

    resident: frozenset[int]
    slot_nbytes: int            # one slot of the ring
    num_slots: int              # slots of the ring
    resident_nbytes: int
    activation_reserve: int
    budget: int | None
    stream_reserve: int = 0     # what streaming needs besides the ring (landing buffers); 0 if none streams
    dedicated: tuple[tuple[int, int], ...] = ()   # (unit index, its slot's bytes): outsized streamed units

    @property
    def ring_nbytes(self) -> int:
        return self.slot_nbytes * self.num_slots + sum(n for _, n in self.dedicated)

    @property
    def device_nbytes(self) -> int:
        return self.resident_nbytes + self.ring_nbytes + self.activation_reserve + self.stream_reserve


def plan_layout(sizes: list[int], streamed: set[int], num_slots: int, min_slot_nbytes: int = 0) -> MemoryPlan:
    """No budget: the `streamed` units stream, through the cheapest layout. Every slot size S is
    tried; units larger than S get a dedicated slot; the least device memory wins (on a tie, the
    fewest dedicated slots)."""
    resident = frozenset(u for u in range(len(sizes)) if u not in streamed)
    resident_nbytes = sum(sizes[u] for u in resident)
    if not streamed:
        return MemoryPlan(resident, 0, 0, resident_nbytes, 0, None)
    best = None
    for slot in sorted({sizes[u] for u in streamed}, reverse=True):
        slot = max(slot, min_slot_nbytes)
        dedicated = tuple((u, sizes[u]) for u in sorted(streamed) if sizes[u] > slot)
        cost = num_slots * slot + sum(n for _, n in dedicated)
        if best is None or cost < best[0]:
            best = (cost, slot, dedicated)
    return MemoryPlan(resident, best[1], num_slots, resident_nbytes, 0, None, dedicated=best[2])


def _evenly_spaced(m: int, n: int) -> list[int]:
    """`n` of the positions 0..m-1, spread evenly (streaming has compute to hide behind)."""
    return sorted({min(m - 1, int((i + 0.5) * m / n)) for i in range(n)}) if n else []


def _fill(sizes: list[int], candidates: list[int], free: int) -> set[int]:
    """The most evenly spread candidates that fit in `free`, then whatever else fits, smallest first."""
    best: set[int] = set()
    for n in range(len(candidates), 0, -1):
        chosen = {candidates[i] for i in _evenly_spaced(len(candidates), n)}
        if sum(sizes[u] for u in chosen) <= free:
            best = chosen
            break
    free -= sum(sizes[u] for u in best)
    for u in sorted((u for u in candidates if u not in best), key=lambda u: sizes[u]):
        if sizes[u] <= free:
            best.add(u)
            free -= sizes[u]
    return best


def plan_memory(sizes: list[int], budget: int, num_slots: int, activation_reserve: int = 0,
                min_slot_nbytes: int = 0, what: str = "`vram_budget`", stream_reserve: int = 0,
                names: list[str] | None = None, prefetch: int | None = None) -> MemoryPlan:
    """Keep as many units resident as fit after reserving the ring and the activation margin.

    `sizes` are the units' slot sizes in module order (≈ trace order). Every slot size S the
    ring could have is tried: units larger than S must stay resident; the rest are filled in
    evenly; the plan streaming the fewest bytes per pass wins. Raises `ConfigError` naming the
    smallest budget that would work, and what takes it, when nothing fits. `min_slot_nbytes`: a
    shared pool's ring is at least that large already. `stream_reserve`: what streaming needs
    besides the ring (the backend's landing buffers), reserved only by plans that stream something.
    `names` (unit fqns) and `prefetch` only make the error say more.
    """
    total, act = sum(sizes), activation_reserve
    if total + act + num_slots * min_slot_nbytes <= budget:       # a shared ring stays either way
        return MemoryPlan(frozenset(range(len(sizes))), 0, 0, total, act, budget)
    best = None
    for slot in sorted(set(sizes), reverse=True):
        fixed = _fixed(sizes, slot, num_slots, act, min_slot_nbytes, stream_reserve)
        if fixed > budget:
            continue
        forced = {u for u, n in enumerate(sizes) if n > slot}
        resident = forced | _fill(sizes, [u for u in range(len(sizes)) if u not in forced], budget - fixed)
        resident_nbytes = sum(sizes[u] for u in resident)
        if best is None or resident_nbytes > best.resident_nbytes:
            best = MemoryPlan(frozenset(resident), max(slot, min_slot_nbytes), num_slots, resident_nbytes, act,
                              budget, stream_reserve)
    if best is None:
        raise ConfigError(_too_small(sizes, budget, num_slots, act, min_slot_nbytes, stream_reserve, what,
                                     names, prefetch))
    return best


def _fixed(sizes, slot: int, num_slots: int, act: int, min_slot: int, stream_reserve: int) -> int:
    """Device bytes a plan with ring slots of `slot` needs before anything optional is resident."""
    return sum(n for n in sizes if n > slot) + num_slots * max(slot, min_slot) + act + stream_reserve


def minimum_budget(sizes, num_slots: int, act: int = 0, min_slot: int = 0, stream_reserve: int = 0) -> tuple[int, int]:
    """(smallest budget any plan fits in, the ring slot size it uses)."""
    everything = sum(sizes) + act + num_slots * min_slot
    best = min(((_fixed(sizes, s, num_slots, act, min_slot, stream_reserve), s) for s in set(sizes)),
               default=(everything, 0))
    return min(best, (everything, 0))


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n} bytes"


def _too_small(sizes, budget, num_slots, act, min_slot, stream_reserve, what, names, prefetch) -> str:
    """The budget error: the smallest budget that fits, its largest parts, and what lowers it."""
    minimum, slot = minimum_budget(sizes, num_slots, act, min_slot, stream_reserve)
    if not slot:                            # streaming anything costs more than keeping it all
        return (f"{what} of {budget} bytes ({budget / MIB:.1f} MiB) cannot hold this model: a ring of {num_slots} "
                f"slots would take more than keeping every unit resident, which needs {minimum} bytes "
                f"({minimum / MIB:.1f} MiB) with {act} bytes of activation reserve. Raise the budget to {minimum}.")
    slot = max(slot, min_slot)
    names = names or [f"unit {i}" for i in range(len(sizes))]
    forced = sorted(((n, names[u] or "(root)") for u, n in enumerate(sizes) if n > slot), reverse=True)
    parts = [f"the ring of {num_slots} slots of {_size(slot)}: {_size(num_slots * slot)}"]
    parts += [f"`{name}` kept resident, as it is larger than a slot: {_size(n)}" for n, name in forced[:3]]
    if len(forced) > 3:
        parts.append(f"{len(forced) - 3} more such units: {_size(sum(n for n, _ in forced[3:]))}")
    advice = f"Raise the budget to {minimum} or more"
    if prefetch:
        fewer, _ = minimum_budget(sizes, num_slots - prefetch, act, min_slot, stream_reserve)
        advice += f", or set `prefetch=0` (it then needs {fewer} bytes)"
    if forced and forced[0][0] > num_slots * slot:
        advice += "; finer `units` do not help when the largest part is one tensor"
    return (f"{what} of {budget} bytes ({budget / MIB:.1f} MiB) cannot hold even full streaming: the ring of "
            f"{num_slots} slots plus {act} bytes of activation reserve"
            + (f" and {stream_reserve} bytes of landing buffers" if stream_reserve else "")
            + f" needs at least {minimum} bytes ({minimum / MIB:.1f} MiB). It is made of "
            + "; ".join(parts) + f". {advice}.")


# -- a pool's joint plan --------------------------------------------------------------------------

@dataclass(frozen=True)
class Needs:
    """What one member asks of a plan: its units' slot sizes (module order), which stream when
    nothing forces a choice, its slot count, activation reserve, scratch, and own budget cap."""

    sizes: tuple[int, ...]
    streamed: frozenset[int]
    num_slots: int
    activation_reserve: int = 0
    stream_reserve: int = 0
    cap: int | None = None
    names: tuple[str, ...] = ()
    prefetch: int | None = None


def plan_alone(needs: Needs, min_slot_nbytes: int = 0) -> MemoryPlan:
    """One member's plan, under its own cap if it has one, else its `units` choice."""
    if needs.cap is None:
        return plan_layout(list(needs.sizes), set(needs.streamed), needs.num_slots, min_slot_nbytes)
    return plan_memory(list(needs.sizes), needs.cap, needs.num_slots, needs.activation_reserve, min_slot_nbytes,
                       "`vram_budget`", needs.stream_reserve, list(needs.names), needs.prefetch)


def plan_pool(members: list[Needs], budget: int | None) -> list[MemoryPlan]:
    """Every member's plan. Without a pool budget each plans alone over one shared ring (its
    slots as large as the largest any member needs); with one, all units of all members are
    planned together (one ring, the largest reserve: one member runs at a time), then each
    member's share is cut to its own cap."""
    if not members:
        return []
    if budget is None:
        alone = [plan_alone(m) for m in members]
        slot = max(p.slot_nbytes for p in alone)
        return [plan_alone(m, slot) if p.slot_nbytes < slot and p.num_slots else p for m, p in zip(members, alone)]
    sizes = [n for m in members for n in m.sizes]
    names = [f"{n}" for m in members for n in (m.names or [""] * len(m.sizes))]
    joint = plan_memory(sizes, budget, max(m.num_slots for m in members),
                        max(m.activation_reserve for m in members), 0,
                        f"the pool's `budget` (shared by {len(members)} sessions)",
                        max(m.stream_reserve for m in members), names, max(m.prefetch or 0 for m in members))
    plans, start = [], 0
    for m in members:
        mine = frozenset(u - start for u in joint.resident if start <= u < start + len(m.sizes))
        plan = replace(joint, resident=mine, resident_nbytes=sum(m.sizes[u] for u in mine),
                       activation_reserve=m.activation_reserve)
        if m.cap is not None and plan.device_nbytes > m.cap:
            plan = plan_memory(list(m.sizes), m.cap, joint.num_slots, m.activation_reserve, joint.slot_nbytes,
                               "`vram_budget`", m.stream_reserve, list(m.names), m.prefetch)
        plans.append(plan)
        start += len(m.sizes)
    return plans


# -- `s.plan` -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnitPlan:
    fqn: str
    nbytes: int
    streamed: bool
    reason: str


@dataclass(frozen=True)
class SessionPlan:
    """`s.plan`: which units are resident or streamed, and why; `str()` is a table."""

    units: tuple[UnitPlan, ...]
    budget: int | None
    slot_nbytes: int
    num_slots: int
    activation_reserve: int
    dedicated_nbytes: int = 0
    pool: str = ""              # a shared pool's split, or ""
    slots_why: str = ""         # why the slot count is what it is

    @property
    def resident(self) -> frozenset[int]:
        return frozenset(i for i, u in enumerate(self.units) if not u.streamed)

    @property
    def resident_nbytes(self) -> int:
        return sum(u.nbytes for u in self.units if not u.streamed)

    @property
    def streamed_nbytes(self) -> int:
        return sum(u.nbytes for u in self.units if u.streamed)

    def __str__(self) -> str:
        dedicated = f" + {self.dedicated_nbytes / MIB:.1f} MiB of dedicated slots" if self.dedicated_nbytes else ""
        head = (f"budget {'none' if self.budget is None else f'{self.budget / MIB:.1f} MiB'}; "
                f"resident {self.resident_nbytes / MIB:.1f} MiB, streamed {self.streamed_nbytes / MIB:.1f} MiB per pass; "
                f"ring {self.num_slots} x {self.slot_nbytes / MIB:.1f} MiB{dedicated}"
                f"{f' ({self.slots_why})' if self.slots_why else ''}; "
                f"activation reserve {self.activation_reserve / MIB:.1f} MiB")
        width = max((len(u.fqn) for u in self.units), default=4)
        rows = [f"{u.fqn or '(root)':<{width}}  {'streamed' if u.streamed else 'resident':<8}  "
                f"{u.nbytes / MIB:9.2f} MiB  {u.reason}" for u in self.units]
        return "\n".join([head, *([self.pool] if self.pool else []), *rows])


def describe_plan(units, spec, memory: MemoryPlan, alignment: int, pool: str = "", slots_why: str = "") -> SessionPlan:
    """Why each unit streams or stays: the budget planner's choice, or else the `units` option."""
    rows, dedicated = [], dict(memory.dedicated)
    for u in units:
        nbytes = unit_nbytes(u, alignment)
        if u.index in dedicated:
            why = "streamed: through a slot of its own (larger than the ring's slots)"
        elif memory.budget is not None:
            if u.streamed:
                why = "streamed: does not fit in the budget after the ring and the reserve"
            elif memory.slot_nbytes and nbytes > memory.slot_nbytes:
                why = "resident: larger than a ring slot, so it must stay"
            else:
                why = "resident: fits in the budget"
        elif spec == "blocks":
            why = "streamed: a block of the largest nn.ModuleList" if u.streamed else "resident: outside the blocks"
        elif spec == "leaves":
            why = "streamed: owns parameters (units='leaves')"
        else:
            why = "streamed: listed in `units`" if u.streamed else "resident: not listed in `units`"
        rows.append(UnitPlan(u.fqn, nbytes, u.streamed, why))
    return SessionPlan(tuple(rows), memory.budget, memory.slot_nbytes, memory.num_slots, memory.activation_reserve,
                       sum(dedicated.values()), pool, slots_why)
