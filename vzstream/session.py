"""Session: the context manager users hold (DESIGN §1, §5, §7).

On enter: pick the backend (or the pool's), find units, plan the resident set under the
budget, pack streamed units into host RAM (their original storage is freed), move resident
parameters and buffers to the device, install hooks. On exit — normal, exception or
KeyboardInterrupt — remove hooks, join workers, restore every parameter bit-exactly on its
original device, free slots and arenas. A failure half-way through enter undoes exactly what
was done. Every call (`s(...)`, `generate`, `agenerate`, `stream`) holds the pool's lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import weakref

import psutil
import torch
from torch import nn

from .config import SessionConfig, available_cores, build_config
from .errors import ConfigError, FormatError, TraceError
from .generate import AsyncGeneration, greedy
from .hooks import install, placeholder, remove
from .pipeline import Pipeline, gil_switch_interval
from .plan import MemoryPlan, SessionPlan, describe_plan, find_units, nesting_depth, plan_memory, unit_nbytes
from .pool import DevicePool, resolve_budget
from .stats import Stats
from .store import Original, interrupts_deferred, pack_all, restore_all, return_freed_memory
from .streamer import Streamer

log = logging.getLogger("vzstream")
TRIM_NBYTES = 256 << 20      # weights freed while packing between two hand-backs to the OS
_open_models: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_open_params: "weakref.WeakValueDictionary[int, nn.Parameter]" = weakref.WeakValueDictionary()  # id -> param of an open session


def session(model: nn.Module, **options) -> "Session":
    """Stream `model`'s weights from compressed host RAM. Options: see `SessionConfig`."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    return Session(model, build_config(options))


class Session(AsyncGeneration):
    def __init__(self, model: nn.Module, config: SessionConfig) -> None:
        self.model, self.config = model, config
        self.backend = None
        self.pool: DevicePool | None = None
        self.memory_plan: MemoryPlan | None = None
        self.units: list = []
        self.stores: dict = {}
        self._streamed: list = []    # Original of every streamed param, to restore on exit
        self._moved: list = []       # (param, original device) of resident params
        self._buffers: list = []     # (module, name, original device)
        self._handles: list = []
        self._pipeline = self._streamer = None
        self._stats = Stats()
        self._cancels: set = set()   # cancel flags of running agenerate/stream calls
        self._measure = False        # measure activations on the traced pass, then fit the budget
        self._spare: dict = {}       # packed copies of resident units, while `_measure`
        self.is_open = False

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if self.model in _open_models:
            raise TraceError(
                "`model` already has an open vzstream session; close it (leave its `with` block) "
                "before opening another on the same model."
            )
        shared = [n for n, p in self.model.named_parameters() if _open_params.get(id(p)) is p]
        if shared:
            raise TraceError(
                f"`model` shares parameters with a model that has an open vzstream session ({', '.join(shared[:3])}"
                f"{', ...' if len(shared) > 3 else ''}); close that session first, or open one session on a "
                f"module that contains both models.")
        self.pool = self._device_pool()               # fails before anything is allocated
        self._stats = Stats()
        self.backend = self.pool.backend
        with self.pool.lock:
            try:
                self.units = find_units(self.model, self.config.units)
                self.memory_plan = self._plan_memory()   # a budget error must close the backend too
                if self.memory_plan is not None:
                    for unit in self.units:
                        unit.streamed = unit.index not in self.memory_plan.resident
                # Measure activations on the traced pass when the user gave no reserve; resident
                # units are packed too, so the ones that then no longer fit can be evicted.
                self._measure = (self.memory_plan is not None and self.config.activation_reserve is None
                                 and self.backend.measures_activations)
                _open_models.add(self.model)
                _open_params.update((id(p), p) for p in self.model.parameters())
                self._pack_streamed()
                self._move_resident()
                self._start_streaming()
            except BaseException:
                self._close_locked()
                raise
        self.is_open = True

    def _device_pool(self) -> DevicePool:
        cfg = self.config
        if cfg.pool is None:
            return DevicePool(cfg.device, backend=cfg.backend)
        if not isinstance(cfg.pool, DevicePool):
            raise ConfigError(f"`pool` must be a vzstream.DevicePool; got {type(cfg.pool).__name__}.")
        if cfg.backend is not None and cfg.backend is not cfg.pool.backend:
            raise ConfigError("`backend` and `pool` were both given; a pooled session uses the pool's backend.")
        return cfg.pool

    def _plan_memory(self, activation_nbytes: int | None = None) -> MemoryPlan | None:
        """Under a budget every unit is a candidate; the planner decides which stay resident."""
        own, shared = resolve_budget(self.config.vram_budget, self.backend), self.pool.available(self)
        if own is None and shared is None:
            return None
        committed = 0
        if shared is not None and (own is None or shared < own):
            committed = self.pool.budget - shared   # the other members' resident units
            budget, what = shared, f"the pool's `budget` (with {committed} bytes resident for other sessions)"
        else:
            budget, what = own, "`vram_budget`"
        sizes = [unit_nbytes(u, self.backend.alignment) for u in self.units]
        # The ring: `prefetch` in flight, every unit that nesting can bind at once, one spare
        # (a unit held for reuse under cache="pass").
        num_slots = max(self.config.prefetch + 1 + nesting_depth(self.model, self.units), self.pool.ring_slots)
        act = self.config.activation_reserve if activation_nbytes is None else activation_nbytes
        # The merge scratch is one per backend, sized for the most demanding member of a pool:
        # count what it holds already if that is more than this session's own units need.
        held = self.backend.scratch_held
        scratch = max(self.backend.scratch_nbytes(self.units, self.config.codec), held)
        return plan_memory(sizes, budget, num_slots, act or 0, min_slot_nbytes=self.pool.ring.slot_nbytes,
                           what=what, committed_nbytes=committed, stream_reserve=scratch, held_reserve=held)

    def close(self) -> None:
        """Restore the model exactly as it was. Safe to call twice, and after a failed open."""
        if self.pool is None:
            return
        if self.pool.owner == threading.get_ident():
            raise TraceError("a vzstream session cannot be closed from inside a call on its pool "
                             "(a hook or callback); close it after the call returns.")
        for cancel in list(self._cancels):    # an abandoned stream must not hold the lock
            cancel.set()
        with self.pool.lock:
            self._close_locked()

    def _close_locked(self) -> None:
        stopped = False
        try:
            remove(self._handles)
            if self._streamer is not None:
                self._streamer.close()
            elif self._pipeline is not None:
                self._pipeline.close()
            stopped = True
        finally:
            # Putting the model back is not cut short by a Ctrl-C (held, raised at the end; a
            # second one is obeyed): half-way, parameters would be left empty with nothing to
            # restore them from. Stopping the workers stays interruptible, and so does waiting
            # for the pool lock in `close` (the session then stays open; call it again).
            with interrupts_deferred():
                try:
                    if stopped:             # else a worker may still write a slot: free it last
                        self._leave_pool()
                finally:
                    try:
                        self._restore()
                    finally:
                        self._forget()

    def _leave_pool(self) -> None:
        """The ring and merge scratch go first (when no other member uses them): a model that
        came from this device needs the room to be restored there. Cached slot views would keep
        the slots' memory alive. (A method of its own: a loop variable left in `_close_locked`'s
        frame would keep a store alive in the traceback of any error raised from there.)"""
        for store in self.stores.values():
            store.forget_slots()
        self.pool.leave(self)

    def _forget(self) -> None:
        """The session's own state first (it cannot fail), then the pool and backend, each
        freed even if the other fails."""
        self.stores.clear()
        self._spare.clear()
        self._pipeline = self._streamer = None
        _open_models.discard(self.model)
        for p in self.model.parameters():
            _open_params.pop(id(p), None)
        self.is_open = False
        try:
            self.pool.leave(self)
        finally:
            if self.config.pool is None:
                self.backend.close()

    def park(self) -> None:
        """Give every slot back to the pool (called by the pool when it becomes shared)."""
        if self._streamer is not None:
            self._streamer.park()

    def _pack_streamed(self) -> None:
        """Pack the streamed units (and, while measuring, the resident ones too) and free each
        one's parameters as its store arrives, handing the freed memory back as it goes."""
        units = [u for u in self.units if u.streamed or self._measure]
        freed = 0
        for unit, store in pack_all(units, self.backend, self.config, self._stats, self._host_threads()):
            if not unit.streamed:
                self._spare[unit.index] = store     # resident for now; evictable
                continue
            self._swap_out(unit, store, self.backend.device)
            freed += unit.raw_nbytes
            # Freed weights stay in the process's heap until trimmed, and with them RSS
            # peaked at ~1.6x the model on a second open (docs/benchmarks.md).
            if freed >= TRIM_NBYTES:
                return_freed_memory()
                freed = 0
        return_freed_memory()

    def _swap_out(self, unit, store, device, orig_devices=None) -> None:
        """`unit` streams from `store`: free its parameters (remembering how to restore them)."""
        self.stores[unit.index] = store
        for (name, p), packed, perm in zip(unit.params, store.packed, store.perms):
            orig = p.device if orig_devices is None else orig_devices[id(p)]
            self._streamed.append(Original(p, packed, perm, orig, unit.fqn, name))
            p.data = placeholder(p.dtype, device)  # frees the original storage

    def _fit_activations(self, activation_nbytes: int) -> None:
        """Re-plan with the activation peak measured on the traced pass; evict what no longer fits."""
        self._measure = False
        spare, self._spare = self._spare, {}
        try:
            plan = self._plan_memory(activation_nbytes)
        except ConfigError as exc:
            log.warning("vzstream: measured activations (%d bytes) do not fit the budget even fully "
                        "streamed; keeping the plan. %s", activation_nbytes, exc)
            return
        evict = [u for u in self.units if not u.streamed and u.index not in plan.resident]
        self.memory_plan = dataclasses.replace(plan, resident=frozenset(
            u.index for u in self.units if not u.streamed and u not in evict))
        if not evict:
            return
        log.info("vzstream: activations take %.1f MiB: evicting %d resident unit(s) to stay in budget",
                 activation_nbytes / 2**20, len(evict))
        self._streamer.park()
        remove(self._handles)
        evicted = {id(p) for u in evict for _, p in u.params}
        orig_devices = {id(p): d for p, d in self._moved if id(p) in evicted}
        self._moved = [(p, d) for p, d in self._moved if id(p) not in evicted]
        for unit in evict:
            unit.streamed = True
            self.backend.account(-sum(unit.param_nbytes))
            self._swap_out(unit, spare[unit.index], self.backend.device, orig_devices)
        self._join_pool()
        self._streamer.relearn_from_scratch(self.pool.ring_slots)
        self._handles = install(self.model, self.units, self._streamer)

    def _move_resident(self) -> None:
        device = self.backend.device
        for unit in self.units:
            if unit.streamed:
                continue
            for _, p in unit.params:
                self._moved.append((p, p.device))
                p.data = self.backend.to_device(p.data)
        for mod in self.model.modules():
            for name, buf in mod._buffers.items():
                if buf is not None and buf.device != device:
                    self._buffers.append((mod, name, buf.device))
                    mod._buffers[name] = buf.to(device)

    def _join_pool(self) -> bool:
        """(Re-)register with the pool; True when the ring is static (budgeted)."""
        slot_nbytes = max((s.slot_nbytes for s in self.stores.values()), default=0)
        # What the pool counts for this member: slot-aligned sizes, as the planner counted them.
        resident = sum(unit_nbytes(u, self.backend.alignment) for u in self.units if not u.streamed)
        fixed_ring = self.memory_plan is not None and bool(self.stores)
        # Unbudgeted, the ring starts with the one slot the traced pass fetches into and grows
        # to the learned schedule's count; budgeted, it is static from here on.
        self.pool.join(self, resident, slot_nbytes, self.memory_plan.num_slots if fixed_ring else int(bool(self.stores)))
        self.backend.prepare(self.config.prefetch, self.stores.values())
        self._update_stats()
        return fixed_ring

    def _start_streaming(self) -> None:
        cfg, stats = self.config, self._stats
        fixed_ring = self._join_pool()
        self._pipeline = Pipeline(self.backend, cfg.workers, stats, caller_uploads=cfg.codec == "nibble")
        max_slots = self.pool.ring_slots if fixed_ring else None
        self._streamer = Streamer(self.stores, self.pool, self._pipeline, cfg, stats, max_slots, owner=self,
                                  measure=self._measure)
        self._handles = install(self.model, self.units, self._streamer)

    def _update_stats(self) -> None:
        stats = self._stats
        stats.units_streamed = sum(u.streamed for u in self.units)
        stats.units_resident = len(self.units) - stats.units_streamed
        stats.packed_nbytes = sum(s.packed_nbytes for s in self.stores.values())
        stats.raw_nbytes = sum(s.raw_nbytes for s in self.stores.values())
        stats.uncompressed_nbytes = sum(s.raw_nbytes for s in self.stores.values() if not s.compressed)
        stats.resident_nbytes = sum(u.raw_nbytes for u in self.units if not u.streamed)

    def _host_threads(self) -> int:
        """Threads for packing and restoring, while the model runs nothing: every core (≤ 16)."""
        return max(self.config.workers, min(16, available_cores()))

    def _restore(self) -> None:
        """Every parameter and buffer back; a corrupt unit does not stop the others."""
        try:
            failed = self._restore_streamed()
        finally:                                 # even after a failed restore
            for p, device in self._moved:
                p.data = self.backend.from_device(p.data, device)
            for mod, name, device in self._buffers:
                mod._buffers[name] = mod._buffers[name].to(device)
            self._streamed, self._moved, self._buffers = [], [], []
        if failed:
            names = ", ".join(f"`{o.name}` of unit `{o.unit_fqn}`" for o, _ in failed)
            raise FormatError(
                f"could not restore {len(failed)} parameter(s) from corrupt compressed data: {names} "
                f"(left empty; every other parameter was restored). First error: {failed[0][1]}"
            ) from failed[0][1]

    def _restore_streamed(self) -> list:
        """Every streamed parameter back (`restore_all`), freeing each unit's store as soon as
        its parameters are. Returns [(Original, FormatError)] of the parameters left empty."""
        if not self._streamed:
            return []
        self._spare.clear()
        index = {u.fqn: u.index for u in self.units}

        def free(fqn: str) -> None:
            self.stores.pop(index[fqn], None)
            # Cached jobs and upload plans hold stores: dropped, then (CUDA) what nobody
            # references any more is unpinned and freed.
            self.backend.clear_caches()

        return restore_all(self._streamed, self._host_threads(), free)

    # -- running ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _running(self):
        """Hold the pool for one call; tidy up after an exception; park if the pool is shared."""
        closed = TraceError("this vzstream session is not open; use it inside `with vzstream.session(model) as s:`.")
        if not self.is_open:
            raise closed
        if self.pool.owner == threading.get_ident():
            raise TraceError(
                "a vzstream call was made from inside another call on the same pool (a hook, a callback, "
                "or another session's forward); a pool runs one call at a time. Make the call after the "
                "outer one returns, or give the two sessions separate `pool`s.")
        interval = self.config.gil_switch_interval if self.stores else None   # no workers: leave it
        with self.pool.lock, torch.no_grad(), gil_switch_interval(interval):
            if not self.is_open:                  # closed while this call waited for the lock
                raise closed
            self.pool.owner, self.pool.active = threading.get_ident(), self
            try:
                yield
                if self._measure and self._streamer.activation_nbytes is not None:
                    self._fit_activations(self._streamer.activation_nbytes)
            except BaseException:
                self._streamer.abort()  # KeyboardInterrupt skips always_call hooks: tidy up here
                raise
            finally:
                self.pool.owner = self.pool.active = None
                if self.pool.shared:
                    self._streamer.park()

    def __call__(self, *args, **kwargs):
        """The model's forward, streamed (under `torch.no_grad`)."""
        with self._running():
            return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """`model.generate(...)` for Hugging Face models; otherwise greedy decoding over logits."""
        with self._running():
            gen = getattr(self.model, "generate", None)
            if callable(gen):
                return gen(*args, **kwargs)
            return greedy(self.model, *args, **kwargs)

    @property
    def plan(self) -> SessionPlan:
        """Which units are resident or streamed and why (`print(s.plan)` for a table)."""
        if self.pool is None:
            raise TraceError("`plan` is known once the session is open: read it inside `with vzstream.session(model) as s:`.")
        sched = self._streamer.schedule if self._streamer else None
        slots = sched.num_slots if sched is not None else self.pool.ring_slots
        return describe_plan(self.units, self.config.units, self.memory_plan, self.backend.alignment, slots)

    def stats(self) -> Stats:
        """A snapshot of the session's counters (see `Stats`)."""
        out = self._stats.copy()
        if self._streamer is not None:
            out.trace_misses = self._streamer.tracer.misses
            out.activation_nbytes = self._streamer.activation_nbytes or 0
            out.slot_overflows = self.pool.ring.overflows
            sched = self._streamer.schedule
            if sched is not None:
                out.streamed_nbytes_per_pass = sum(self.stores[u].raw_nbytes for u in sched.fetch_units)
        out.peak_device_nbytes = self.backend.peak_device_nbytes if self.backend else 0
        out.host_rss_nbytes = psutil.Process().memory_info().rss
        return out

