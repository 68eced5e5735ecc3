"""Pure planning: which parameters form which unit, and the fetch schedule over a trace.

Nothing here touches threads or devices, so every decision is testable on CPU.

- `find_units(model, spec)` groups parameters into units (DESIGN §2). Each parameter belongs to
  exactly one unit (tied parameters to the first module that owns them); a unit is bound by a
  hook on each module that uses its parameters.
- `make_schedule(trace, prefetch, cache)` says, for every position of a pass, whether that use
  fetches or reuses a held slot, whether the slot is released after it, and how many device
  slots the schedule needs at most (simulated over two passes, because it wraps around).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from torch import nn

from .errors import ConfigError

log = logging.getLogger("vzstream")


@dataclass(eq=False)
class Unit:
    """A group of parameters fetched together: one slot, one trace entry per use."""

    index: int
    fqn: str
    modules: list[nn.Module]                      # hook targets: every module that uses these params
    params: list[tuple[str, nn.Parameter]]        # (fqn, param), each param once
    streamed: bool = True
    param_nbytes: list[int] = field(init=False, default_factory=list)  # sizes as found (params get swapped later)

    def __post_init__(self) -> None:
        self.param_nbytes = [p.numel() * p.element_size() for _, p in self.params]

    @property
    def raw_nbytes(self) -> int:
        return sum(self.param_nbytes)


def _direct_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module._parameters.values() if p is not None]


def _largest_module_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    best, best_numel = None, 0
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            numel = sum(p.numel() for p in mod.parameters())
            if numel > best_numel:
                best, best_numel = (fqn, mod), numel
    return best


def _stream_roots(model: nn.Module, spec) -> tuple[list[str], bool]:
    """Module fqns whose whole subtree is one streamed unit, and whether leaves stream too."""
    modules = dict(model.named_modules(remove_duplicate=False))   # an aliased module answers to every name
    if spec == "leaves":
        return [], True
    if spec == "blocks":
        found = _largest_module_list(model)
        if found is None:
            log.warning("vzstream: units='blocks' found no nn.ModuleList of blocks; streaming every leaf instead")
            return [], True
        prefix = f"{found[0]}." if found[0] else ""
        seen: set[int] = set()
        roots = []
        for i, block in enumerate(found[1]):
            if id(block) not in seen:         # a block listed twice (shared weights) is one unit
                seen.add(id(block))
                roots.append(f"{prefix}{i}")
        return roots, False
    missing = [f for f in spec if f not in modules]
    if missing:
        sample = ", ".join(list(modules)[1:8])
        raise ConfigError(
            f"`units` names modules the model does not have: {missing}; "
            f"names are fqns as in model.named_modules(), e.g. {sample}."
        )
    for a in spec:
        for b in spec:
            if a != b and (a == "" or b.startswith(a + ".")):
                raise ConfigError(f"`units` lists {a!r} and its submodule {b!r}; list only one of them.")
    return list(spec), False


def find_units(model: nn.Module, spec="blocks") -> list[Unit]:
    """Group the model's parameters into units. Streamed units come first, in module order."""
    roots, leaves_stream = _stream_roots(model, spec)
    modules = dict(model.named_modules())
    by_name = dict(model.named_modules(remove_duplicate=False))
    owner: dict[int, Unit] = {}
    units: list[Unit] = []

    def add(fqn: str, mods: list[nn.Module], params, streamed: bool) -> None:
        fresh = [(n, p) for n, p in params if id(p) not in owner]
        if not fresh:
            return
        unit = Unit(len(units), fqn, mods, fresh, streamed)
        units.append(unit)
        for _, p in fresh:
            owner[id(p)] = unit

    for fqn in roots:
        prefix = f"{fqn}." if fqn else ""
        add(fqn, [by_name[fqn]], [(prefix + n, p) for n, p in by_name[fqn].named_parameters()], True)
    for fqn, mod in modules.items():
        prefix = f"{fqn}." if fqn else ""
        add(fqn, [mod], [(prefix + n, p) for n, p in mod._parameters.items() if p is not None], leaves_stream)
    # A module that uses a parameter owned elsewhere (tied weights) must bind that unit too.
    for mod in modules.values():
        for p in _direct_params(mod):
            unit = owner[id(p)]
            if not any(mod is m or _is_descendant(m, mod) for m in unit.modules):
                unit.modules.append(mod)
    units.sort(key=lambda u: not u.streamed)
    for i, u in enumerate(units):
        u.index = i
    return units


def nesting_depth(model: nn.Module, units: list[Unit]) -> int:
    """Most units bound at once by nesting alone (a unit module inside another unit module)."""
    hooked = {id(m) for u in units for m in u.modules}

    def depth(mod: nn.Module, seen: set[int]) -> int:
        if id(mod) in seen:                   # shared submodules: count each path once
            return 0
        seen = seen | {id(mod)}
        below = max((depth(c, seen) for c in mod.children()), default=0)
        return below + (id(mod) in hooked)

    return max(1, depth(model, set()))


def _is_descendant(ancestor: nn.Module, mod: nn.Module) -> bool:
    return any(m is mod for m in ancestor.modules())


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


def unit_nbytes(unit: Unit, alignment: int) -> int:
    """Bytes of one slot holding `unit`, each tensor starting on an `alignment` boundary."""
    return sum(align(n, alignment) for n in unit.param_nbytes)


def align(n: int, alignment: int) -> int:
    """`n` rounded up to a multiple of `alignment`."""
    return (n + alignment - 1) // alignment * alignment


def param_offsets(unit: Unit, alignment: int) -> list[int]:
    """Byte offset of each tensor inside a slot (aligned so kernels see the alignment they expect)."""
    offsets, off = [], 0
    for n in unit.param_nbytes:
        offsets.append(off)
        off += align(n, alignment)
    return offsets


@dataclass(frozen=True)
class MemoryPlan:
    """Which units stay resident under a device-memory budget, and what the ring costs."""

    resident: frozenset[int]
    slot_nbytes: int            # one slot: the largest streamed unit
    num_slots: int              # the static ring (prefetch + 2)
    resident_nbytes: int
    activation_reserve: int
    budget: int | None
    stream_reserve: int = 0     # what streaming needs besides the ring (merge scratch); 0 if none streams

    @property
    def ring_nbytes(self) -> int:
        return self.slot_nbytes * self.num_slots

    @property
    def device_nbytes(self) -> int:
        return self.resident_nbytes + self.ring_nbytes + self.activation_reserve + self.stream_reserve


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
                min_slot_nbytes: int = 0, what: str = "`vram_budget`", committed_nbytes: int = 0,
                stream_reserve: int = 0, held_reserve: int = 0) -> MemoryPlan:
    """Keep as many units resident as fit after reserving the ring and the activation margin.

    `sizes` are the units' slot sizes in module order (≈ trace order). Every slot size S the
    ring could have is tried: units larger than S must stay resident; the rest are filled in
    evenly; the plan streaming the fewest bytes per pass wins. Raises `ConfigError` naming the
    smallest budget that would work when nothing fits. `min_slot_nbytes`: a shared pool's ring
    is at least that large already, whatever this model needs. `what` names the budget in errors;
    `committed_nbytes` (other sessions' residents in a pool) is added to the numbers it names.
    `stream_reserve`: what streaming needs besides the ring (the backend's merge scratch), reserved
    only by plans that stream something; `held_reserve`: the part of it a shared pool holds
    already, which stays either way (like a shared ring).
    """
    total, act = sum(sizes), activation_reserve
    if total + act + num_slots * min_slot_nbytes + held_reserve <= budget:   # a shared ring stays either way
        return MemoryPlan(frozenset(range(len(sizes))), 0, 0, total, act, budget)
    best, minimum = None, total + act + num_slots * min_slot_nbytes + held_reserve
    for slot in sorted(set(sizes), reverse=True):
        forced = {u for u, n in enumerate(sizes) if n > slot}
        fixed = sum(sizes[u] for u in forced) + num_slots * max(slot, min_slot_nbytes) + act + stream_reserve
        minimum = min(minimum, fixed)
        if fixed > budget:
            continue
        resident = forced | _fill(sizes, [u for u in range(len(sizes)) if u not in forced], budget - fixed)
        resident_nbytes = sum(sizes[u] for u in resident)
        if best is None or resident_nbytes > best.resident_nbytes:
            best = MemoryPlan(frozenset(resident), max(slot, min_slot_nbytes), num_slots, resident_nbytes, act, budget,
                              stream_reserve)
    if best is None:
        shown, minimum = budget + committed_nbytes, minimum + committed_nbytes
        raise ConfigError(
            f"{what} of {shown} bytes ({shown / 2**20:.1f} MiB) cannot hold even full streaming: "
            f"the ring of {num_slots} slots plus {act} bytes of activation reserve"
            + (f" and {stream_reserve} bytes of merge scratch" if stream_reserve else "") + " needs at least "
            f"{minimum} bytes ({minimum / 2**20:.1f} MiB). Raise the budget to {minimum} or more, "
            f"lower `prefetch`, or use finer `units`."
        )
    return best


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
        mib = 2**20
        head = (f"budget {'none' if self.budget is None else f'{self.budget / mib:.1f} MiB'}; "
                f"resident {self.resident_nbytes / mib:.1f} MiB, streamed {self.streamed_nbytes / mib:.1f} MiB per pass; "
                f"ring {self.num_slots} x {self.slot_nbytes / mib:.1f} MiB; "
                f"activation reserve {self.activation_reserve / mib:.1f} MiB")
        width = max((len(u.fqn) for u in self.units), default=4)
        rows = [f"{u.fqn or '(root)':<{width}}  {'streamed' if u.streamed else 'resident':<8}  "
                f"{u.nbytes / mib:9.2f} MiB  {u.reason}" for u in self.units]
        return "\n".join([head, *rows])


def describe_plan(units: list[Unit], spec, memory: MemoryPlan | None, alignment: int,
                  num_slots: int) -> SessionPlan:
    """Why each unit streams or stays: the budget planner's choice, or else the `units` option."""
    rows = []
    for u in units:
        nbytes = unit_nbytes(u, alignment)
        if memory is not None:
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
    slot = memory.slot_nbytes if memory else max((r.nbytes for r in rows if r.streamed), default=0)
    slots = memory.num_slots if memory else num_slots
    act = memory.activation_reserve if memory else 0
    return SessionPlan(tuple(rows), memory.budget if memory else None, slot, slots, act)
