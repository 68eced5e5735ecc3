"""Units: which parameters are fetched together, found once from the module tree.

A `Unit` is the one object that owns a group of parameters for the whole session: the
parameters and their sizes, whether the unit streams or stays resident, its packed store while
it streams, and how to put each parameter back (`originals`). The planner decides residency,
packing fills `store`, install fills `originals` and `moved`; the runtime and the backends read
what they need from the unit, never from the session.

- `units="blocks"`: each child of the model's largest `nn.ModuleList` streams; the rest stays.
- `units="leaves"`: every module that directly owns parameters streams.
- `units=[fqn, ...]`: the listed modules stream (each a whole subtree).

Each parameter belongs to exactly one unit (tied parameters to the first module owning them); a
unit is bound by a hook on every module that uses its parameters.
"""

from __future__ import annotations

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
    store: object = field(default=None, repr=False)       # its UnitStore while it streams
    originals: list = field(default_factory=list, repr=False)   # install: how to restore each streamed param
    moved: list = field(default_factory=list, repr=False)       # install: (param, original device, placed) while resident

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


def unit_nbytes(unit: Unit, alignment: int) -> int:
    """Bytes of one slot holding `unit`, each tensor starting on an `alignment` boundary."""
    return sum(align(n, alignment) for n in unit.param_nbytes)


def align(n: int, alignment: int) -> int:
    """`n` rounded up to a multiple of `alignment`."""
    return (n + alignment - 1) // alignment * alignment
