"""Session: the context manager users hold. It composes the layers below and owns nothing else.

`open`: options (already parsed) → units → the pool's joint plan → pack → install → runtime.
`close` runs it backwards: unhook, stop the runtime, free the ring, restore every parameter
bit-exactly on its original device, leave the pool. A failure half-way through `open` undoes
exactly what was done. Every call (`s(...)`, `generate`, `agenerate`, `stream`) holds the pool's
gate. Nothing reachable from the model refers to the session: hooks call the runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from functools import partial

import torch
from torch import nn

from .config import SessionConfig, available_cores, build_config, resolve_budget
from .errors import ConfigError, TraceError
from .generate import cancellable, close_in_thread, greedy, hf_generate_kwargs, open_in_thread, stream_tokens
from .install import Installed, interrupts_deferred
from .pipeline import Pipeline, gil_switch_interval
from .plan import Needs, SessionPlan, describe_plan, unit_nbytes
from .pool import DevicePool, Member
from .runtime import Counters, Streamer
from .stats import Stats, collect
from .store import Calibration, pack_all, pack_unit, return_freed_memory
from .units import find_units, nesting_depth

TRIM_NBYTES = 256 << 20      # weights freed while packing between two hand-backs to the OS
_open_models: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_open_params: "weakref.WeakValueDictionary[int, nn.Parameter]" = weakref.WeakValueDictionary()  # id -> param of an open session


def session(model: nn.Module, **options) -> "Session":
    """Stream `model`'s weights from compressed host RAM. Options: see `SessionConfig`."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    return Session(model, build_config(options))


class Session:
    def __init__(self, model: nn.Module, config: SessionConfig) -> None:
        self.model, self.config = model, config
        self.pool: DevicePool | None = None
        self.backend = None
        self.units: list = []
        self.member: Member | None = None
        self.calibration = Calibration()
        self.is_open = False
        self._cancels: set = set()   # cancel flags of running agenerate/stream calls
        self._final: tuple | None = None   # (Stats, SessionPlan) kept at close
        self._fit_pending = False    # activations to measure on the traced pass, then plan again

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "Session":
        await open_in_thread(self.open, self.close)
        return self

    async def __aexit__(self, *exc) -> None:
        await close_in_thread(self.close)

    def open(self) -> None:
        _check_not_open(self.model)
        self.pool = pool = _device_pool(self.config)      # fails before anything is allocated
        self.backend, self._final = pool.backend, None
        with pool.lock:
            try:
                self._open_locked(pool)
            except BaseException:
                self._close_locked()
                raise
        self.is_open = True

    def _open_locked(self, pool: DevicePool) -> None:
        cfg, backend = self.config, pool.backend
        self.units = find_units(self.model, cfg.units)
        needs = self._needs()
        plans = pool.plans([m.needs for m in pool.members] + [needs])      # a budget error: nothing done yet
        for unit in self.units:
            unit.streamed = unit.index not in plans[-1].resident
        _open_models.add(self.model)
        _open_params.update((id(p), p) for p in self.model.parameters())
        # Under a budget with no reserve given, the traced pass measures activations, and the
        # plan is made again with them (`_fit_activations`).
        budgeted = needs.cap is not None or pool.budget is not None
        self._fit_pending = budgeted and cfg.activation_reserve is None and backend.measures_activations
        runtime = Streamer(self.units, pool.gate, Pipeline(backend, cfg.workers, Counters(), cfg.codec == "nibble"),
                           prefetch=cfg.prefetch, cache=cfg.cache, measure=self._fit_pending)
        installed = Installed(self.model, self.units, backend)
        self.member = Member(self.units, installed, runtime, needs,
                             partial(pack_unit, backend=backend, level=cfg.level, coding=cfg.codec))
        self._pack(installed)
        pool.join(self.member, plans)                 # the others make room first
        for unit in self.units:
            if not unit.streamed:
                installed.move_resident(unit)
        installed.move_buffers()
        backend.prepare(cfg.prefetch, [u.store for u in self.units if u.streamed])
        installed.hook(runtime)

    def _needs(self) -> Needs:
        """What this session asks of the pool's plan."""
        cfg, backend = self.config, self.pool.backend
        sizes = tuple(unit_nbytes(u, backend.alignment) for u in self.units)
        return Needs(sizes, frozenset(u.index for u in self.units if u.streamed),
                     cfg.prefetch + 1 + nesting_depth(self.model, self.units), cfg.activation_reserve or 0,
                     backend.scratch_nbytes(self.units, cfg.codec),
                     _resolve_cap(cfg.vram_budget, backend), tuple(u.fqn for u in self.units), cfg.prefetch)

    def _pack(self, installed: Installed) -> None:
        """Pack the streamed units, freeing each one's parameters as its store arrives and
        handing the freed memory back as it goes (else RSS peaked at ~1.6x the model)."""
        cfg, freed = self.config, 0
        for unit, store in pack_all([u for u in self.units if u.streamed], self.backend, level=cfg.level,
                                    codec=cfg.codec, raw_fraction=cfg.raw_fraction, workers=cfg.workers,
                                    threads=self._host_threads(), calibration=self.calibration):
            installed.swap_out(unit, store)
            freed += unit.raw_nbytes
            if freed >= TRIM_NBYTES:
                return_freed_memory()
                freed = 0
        return_freed_memory()

    def close(self) -> None:
        """Restore the model exactly as it was. Safe to call twice, and after a failed open."""
        if self.pool is None:
            return
        if self.pool.gate.owner == threading.get_ident():
            raise TraceError("a vzstream session cannot be closed from inside a call on its pool "
                             "(a hook or callback); close it after the call returns.")
        for cancel in list(self._cancels):    # an abandoned stream must not hold the lock
            cancel.set()
        with self.pool.lock:
            self._close_locked()

    def _close_locked(self) -> None:
        member, stopped = self.member, False
        try:
            if member is not None:
                member.installed.unhook()
                member.runtime.close()
            stopped = True
        finally:
            # Putting the model back is not cut short by a Ctrl-C (held, raised at the end; a
            # second one is obeyed): half-way, parameters would be left empty with nothing to
            # restore them from. Stopping the workers stays interruptible, and so does waiting
            # for the pool lock in `close` (the session then stays open; call it again).
            with interrupts_deferred():
                try:
                    if self.is_open:        # what `stats()` and `plan` say after the session
                        self._final = (self.stats(), self.plan)
                    if stopped:             # else a worker may still write a slot: free it last
                        self.pool.leave(member)     # the ring goes first: a model from this device needs the room
                finally:
                    try:
                        if member is not None:
                            member.installed.restore(self._host_threads(), self._free_store)
                    finally:
                        self._forget()

    def _free_store(self, unit) -> None:
        """A unit's parameters are back: its store goes, and (CUDA) the pinned memory nobody
        references any more is unpinned."""
        unit.store = None
        self.backend.clear_caches()

    def _forget(self) -> None:
        """The session's own state first (it cannot fail), then the pool and backend."""
        member, self.member, self.is_open = self.member, None, False
        _open_models.discard(self.model)
        for p in self.model.parameters():
            _open_params.pop(id(p), None)
        try:
            self.pool.leave(member)
            self.pool.rebalance()                 # the others may keep more resident now
        finally:
            if self.config.pool is None:
                self.pool.backend.close()

    def _host_threads(self) -> int:
        """Threads for packing and restoring, while the model runs nothing: every core (≤ 16)."""
        return max(self.config.workers, min(16, available_cores()))

    # -- running ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _running(self):
        """Hold the pool for one call; tidy up after an exception; park if the pool is shared."""
        closed = TraceError("this vzstream session is not open; use it inside `with vzstream.session(model) as s:`.")
        if not self.is_open:
            raise closed
        if self.pool.gate.owner == threading.get_ident():
            raise TraceError(
                "a vzstream call was made from inside another call on the same pool (a hook, a callback, "
                "or another session's forward); a pool runs one call at a time. Make the call after the "
                "outer one returns, or give the two sessions separate `pool`s.")
        interval = self.config.gil_switch_interval if any(u.streamed for u in self.units) else None
        runtime = self.member.runtime
        with self.pool.gate.held(runtime), torch.no_grad(), gil_switch_interval(interval):
            if not self.is_open:                  # closed while this call waited for the lock
                raise closed
            try:
                yield
                if self._fit_pending and runtime.activation_nbytes is not None:
                    self._fit_activations(runtime.activation_nbytes)
            except BaseException:
                runtime.abort()  # KeyboardInterrupt skips always_call hooks: tidy up here
                raise
            finally:
                if self.pool.shared:
                    runtime.park()

    def _fit_activations(self, activation_nbytes: int) -> None:
        """Plan again, once, with the activation peak the traced pass measured."""
        self._fit_pending = False
        self.pool.replan(self.member, dataclasses.replace(self.member.needs, activation_reserve=activation_nbytes))

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

    def _generate_cancellable(self, input_ids, cancel, on_token=None, **kwargs):
        self._cancels.add(cancel)             # leaving the session cancels it
        try:
            if callable(getattr(self.model, "generate", None)):
                return self.generate(input_ids, **hf_generate_kwargs(cancel, on_token, kwargs))
            with self._running():
                return greedy(self.model, input_ids, on_token=on_token, cancel=cancel, **kwargs)
        finally:
            self._cancels.discard(cancel)

    async def agenerate(self, input_ids, **kwargs):
        """`generate` off the event loop; cancelling the awaiting task stops it at the next token."""
        return await cancellable(lambda cancel: self._generate_cancellable(input_ids, cancel, **kwargs))

    def stream(self, input_ids, **kwargs):
        """`async for new_ids in s.stream(ids, max_new_tokens=N)`: each step's tokens `[B, 1]`."""
        return stream_tokens(lambda cancel, on_token: self._generate_cancellable(input_ids, cancel, on_token, **kwargs))

    # -- what it did --------------------------------------------------------------------------
    @property
    def plan(self) -> SessionPlan:
        """Which units are resident or streamed and why (`print(s.plan)` for a table)."""
        if self.member is None:
            if self._final is not None:
                return self._final[1]
            raise TraceError("`plan` is known once the session is open: read it inside `with vzstream.session(model) as s:`.")
        runtime, plan = self.member.runtime, self.member.plan
        plan = dataclasses.replace(plan, num_slots=max(plan.num_slots, runtime.num_slots))
        return describe_plan(self.units, self.config.units, plan, self.backend.alignment, self._pool_line(),
                             runtime.slots_why)

    def _pool_line(self) -> str:
        if not self.pool.shared:
            return ""
        mine = sum(self.member.needs.sizes[u] for u in self.member.plan.resident)
        others = sum(m.needs.sizes[u] for m in self.pool.members if m is not self.member for u in m.plan.resident)
        budget = "no budget" if self.pool.budget is None else f"budget {self.pool.budget / 2**20:.1f} MiB"
        return (f"pool ({budget}) shared by {len(self.pool.members)} sessions: resident here "
                f"{mine / 2**20:.1f} MiB, in the others {others / 2**20:.1f} MiB")

    @property
    def stores(self) -> dict:
        """unit index -> its packed store, for every streamed unit (for tests and benchmarks)."""
        return {u.index: u.store for u in self.units if u.streamed and u.store is not None}

    def stats(self) -> Stats:
        """A snapshot of the session's counters (see `Stats`)."""
        if self.member is None and self._final is not None:
            return dataclasses.replace(self._final[0])
        runtime = self.member.runtime if self.member is not None else None
        return collect(self.units, runtime, self.calibration, self.backend)


def _check_not_open(model: nn.Module) -> None:
    if model in _open_models:
        raise TraceError(
            "`model` already has an open vzstream session; close it (leave its `with` block) "
            "before opening another on the same model.")
    shared = [n for n, p in model.named_parameters() if _open_params.get(id(p)) is p]
    if shared:
        raise TraceError(
            f"`model` shares parameters with a model that has an open vzstream session ({', '.join(shared[:3])}"
            f"{', ...' if len(shared) > 3 else ''}); close that session first, or open one session on a "
            f"module that contains both models.")


def _device_pool(cfg: SessionConfig) -> DevicePool:
    if cfg.pool is None:
        return DevicePool(cfg.device, backend=cfg.backend)
    if not isinstance(cfg.pool, DevicePool):
        raise ConfigError(f"`pool` must be a vzstream.DevicePool; got {type(cfg.pool).__name__}.")
    if cfg.backend is not None and cfg.backend is not cfg.pool.backend:
        raise ConfigError("`backend` and `pool` were both given; a pooled session uses the pool's backend.")
    return cfg.pool


def _resolve_cap(value, backend) -> int | None:
    return resolve_budget(value, backend.total_memory)
