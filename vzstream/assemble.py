"""Assembling one session's parts, in the order `Session.open` runs them: what the session
needs of the plan (`needs_of`), its parts (`new_member`: runtime, install, packer), putting
them in place (`install_member`: pack, join the pool, move residents, hook), and taking them
out again (`close_member`).

Each step only calls the layers below it; a failure part-way leaves a member that
`Installed.restore` and `DevicePool.leave` undo exactly.
"""

from __future__ import annotations

from functools import partial

from .config import SessionConfig, resolve_budget
from . import fromfile
from .headroom import Headroom
from .install import Installed, interrupts_deferred
from .pipeline import Pipeline
from .plan import Needs
from .pool import DevicePool, Member
from .runtime import Counters, Streamer
from .tune import AUTO_DEPTHS, Tuner, auto_workers
from .store import Calibration, pack_all, pack_unit, return_freed_memory
from .units import nesting_depth, unit_nbytes

TRIM_NBYTES = 256 << 20      # weights freed while packing between two hand-backs to the OS


def needs_of(model, units: list, cfg: SessionConfig, backend) -> Needs:
    """What a session asks of the pool's plan. Its slot count is an upper bound known at open:
    `prefetch` in flight, every unit that nesting in the module tree can bind at once, and one
    held for reuse; a traced pass that needs more raises (under a budget) or says why."""
    return Needs(tuple(unit_nbytes(u, backend.alignment) for u in units),
                 frozenset(u.index for u in units if u.streamed),
                 cfg.max_prefetch + 1 + nesting_depth(model, units), cfg.activation_reserve or 0,
                 backend.scratch_nbytes(units, cfg.codec), resolve_budget(cfg.vram_budget, backend.total_memory),
                 tuple(u.fqn for u in units), cfg.max_prefetch)


def new_member(model, units: list, needs: Needs, cfg: SessionConfig, pool: DevicePool, swapped=()) -> Member:
    """The runtime, the install and the packer of one session; nothing is changed yet (but
    `swapped`, the meta tensors a file's session replaced, which the install puts back). Under
    a budget with no reserve given, the traced pass measures the activations, and the pool plans
    again with them after that call."""
    backend = pool.backend
    budgeted = needs.cap is not None or pool.budget is not None
    measure = budgeted and cfg.activation_reserve is None and backend.measures_activations
    pipeline = Pipeline(backend, cfg.max_workers, Counters(), verify=cfg.verify == "stream")
    tuners = ([Tuner("prefetch", AUTO_DEPTHS)] if cfg.prefetch == "auto" else []) + \
        ([Tuner("workers", auto_workers(cfg.max_workers))] if cfg.workers == "auto" else [])
    runtime = Streamer(units, pool.gate, pipeline, prefetch=cfg.max_prefetch, cache=cfg.cache, measure=measure,
                       tuners=tuners)
    installed = Installed(model, units, backend, list(swapped), keep=cfg.materialize)
    runtime.undo_edits = installed.undo_edits
    budget = pool.budget if pool.budget is not None else needs.cap
    if budget is not None and backend.in_use() is not None:
        runtime.headroom = Headroom(backend, budget)
    return Member(units, installed, runtime, needs,
                  partial(pack_unit, backend=backend, level=cfg.level, coding=cfg.codec, checksums=cfg.verify == "stream"),
                  fit_pending=measure)


def install_member(member: Member, pool: DevicePool, plans: list, cfg: SessionConfig, calibration: Calibration,
                   threads: int, packed=None) -> None:
    """Pack the streamed units (or read them from `packed`, a file), join the pool (the others
    make room first), move the resident units and buffers to the device, and hook the model."""
    backend, installed = pool.backend, member.installed
    if packed is None:
        _pack(member, backend, cfg, calibration, threads)
    else:
        for unit in member.units:
            if unit.streamed:
                installed.swap_out(unit, fromfile.store(unit, packed, backend, member.pack, cfg.verify == "stream"))
    pool.join(member, plans)
    for unit in member.units:
        if not unit.streamed:
            if packed is not None:
                fromfile.fill(unit, packed)         # decoded on the CPU, one unit at a time
            installed.move_resident(unit)
    installed.move_buffers()
    backend.prepare(cfg.max_prefetch, [u.store for u in member.units if u.streamed])
    installed.hook(member.runtime)


def _pack(member: Member, backend, cfg: SessionConfig, calibration: Calibration, threads: int) -> None:
    """Free each streamed unit's parameters as its store arrives, handing the freed memory back
    as it goes (else RSS peaked at ~1.6x the model on a second open)."""
    freed = 0
    for unit, store in pack_all([u for u in member.units if u.streamed], backend, level=cfg.level, codec=cfg.codec,
                                raw_fraction=cfg.raw_fraction, workers=cfg.max_workers, threads=threads,
                                calibration=calibration, checksums=cfg.verify == "stream"):
        member.installed.swap_out(unit, store)
        freed += unit.raw_nbytes
        if freed >= TRIM_NBYTES:
            return_freed_memory()
            freed = 0
    return_freed_memory()


def close_member(member: Member | None, pool: DevicePool, threads: int, before_free, forget) -> None:
    """Undo `install_member` (the caller holds the pool's lock): stop the runtime, free the ring
    (a model that came from the device needs the room there), restore every parameter, then
    `forget()`. Putting the model back is not cut short by a Ctrl-C (held, raised at the end; a
    second one is obeyed): half-way, parameters would be left empty with nothing to restore them
    from. Stopping the workers is interruptible; a Ctrl-C there is held while they are joined
    again, so no thread outlives the session."""
    stopped = False
    try:
        if member is not None:
            member.installed.unhook()
            member.runtime.close()
        stopped = True
    finally:
        with interrupts_deferred():
            try:
                if member is not None and not stopped:  # a Ctrl-C left workers running: reap them
                    member.runtime.pipeline.close()     # (a second Ctrl-C is still obeyed at once)
                    stopped = True
                before_free()
                if stopped:
                    pool.leave(member)
            finally:
                try:
                    if member is not None:
                        member.installed.restore(threads, partial(_free_store, pool.backend))
                finally:
                    forget()


def _free_store(backend, unit) -> None:
    """A unit's parameters are back: its store goes, and (CUDA) the pinned memory nobody
    references any more is unpinned."""
    unit.store = None
    backend.clear_caches()
