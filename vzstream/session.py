"""Session: the context manager users hold. It composes the layers below and owns nothing else.

`open`: options (already parsed) → units → the pool's joint plan → pack → install → runtime.
`close` runs it backwards: unhook, stop the runtime, free the ring, restore every parameter
bit-exactly on its original device, leave the pool. A failure half-way through `open` undoes
exactly what was done. Every call (`s(...)`, `generate`, `agenerate`, `stream`) holds the pool's
gate. Nothing reachable from the model refers to the session: hooks call the runtime.
"""

from __future__ import annotations

import dataclasses
import weakref
from functools import partial

from torch import nn

from .assemble import close_member, install_member, needs_of, new_member
from .checks import check_model, check_module
from .config import SessionConfig, available_cores, build_config
from . import fromfile, orphans
from .errors import ConfigError, TraceError
from .generate import cancellable, close_in_thread, greedy, hf_generate_kwargs, open_in_thread, stream_tokens
from .headroom import kv_growth_nbytes
from .plan import SessionPlan
from .pool import DevicePool, Member, budget_text
from .stats import Stats, collect
from .store import Calibration
from .units import find_units

_open_models: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_open_params: "weakref.WeakValueDictionary[int, nn.Parameter]" = weakref.WeakValueDictionary()  # id -> param of an open session


def session(model: nn.Module, **options) -> "Session":
    """Stream `model`'s weights from compressed host RAM. Options: see `SessionConfig`."""
    check_module(model)
    return Session(model, build_config(options))


class Session:
    def __init__(self, model: nn.Module, config: SessionConfig) -> None:
        self.model, self.config, self.calibration = model, config, Calibration()
        self.pool: DevicePool | None = None
        self.member: Member | None = None
        self.backend, self.units, self.is_open = None, [], False
        self._cancels: set = set()   # cancel flags of running agenerate/stream calls
        self._final: tuple | None = None   # (Stats, SessionPlan, Timing) kept at close

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed" if self.backend is not None else "not opened yet"
        where = f"on {self.backend.device}" if self.backend is not None else f"device {self.config.device}"
        streamed = (f", {sum(u.streamed for u in self.units)} of {len(self.units)} units streamed"
                    if self.is_open else "")
        return (f"<vzstream.Session {type(self.model).__name__} {where}, {state}{streamed}, "
                f"{budget_text(self.config.vram_budget)}, codec {self.config.codec.value}>")

    @property
    def device(self):
        """The `torch.device` the model computes on (CUDA: with its index): put inputs there,
        `input_ids.to(s.device)`. Known once the session is open, and kept after it closes."""
        if self.backend is None:
            raise TraceError("`device` is known once the session is open: read it inside "
                             "`with vzstream.session(model) as s:`.")
        return self.backend.device

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        if not self.is_open:                  # `vzstream.load` returns an open session
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
        packed, self.config = fromfile.open_weights(self.config)     # the file's codec and units
        check_model(self.model, self.config.units, meta_ok=packed is not None)   # layouts, meta, lazy, units
        self.pool = pool = _device_pool(self.config)      # fails before anything is allocated
        self.backend, self._final = pool.backend, None
        self.config = dataclasses.replace(self.config, codec=self.config.codec.resolve(pool.backend.name))
        with pool.gate.held(None):
            try:
                self._open_locked(pool, packed)
            except BaseException:
                self._close_locked()
                raise
        self.is_open = True
        orphans.watch(self, self.model, pool, partial(_close_parts, self.model, self.member, pool,
                                                      self.config.pool is None, self._host_threads(), None))

    def _open_locked(self, pool: DevicePool, packed) -> None:
        cfg = self.config
        swapped = fromfile.swap_in(self.model, packed) if packed is not None else []
        try:
            self.units = find_units(self.model, cfg.units)
            if packed is not None:
                fromfile.check_units(self.units, packed)
            needs = needs_of(self.model, self.units, cfg, pool.backend)
            plans = pool.plans([m.needs for m in pool.members] + [needs])      # a budget error: nothing done yet
            for unit in self.units:
                unit.streamed = unit.index not in plans[-1].resident
            self.member = new_member(self.model, self.units, needs, cfg, pool, swapped)
        except BaseException:
            fromfile.put_back(swapped)
            raise
        _open_models.add(self.model)
        _open_params.update((id(p), p) for p in self.model.parameters())
        install_member(self.member, pool, plans, cfg, self.calibration, self._host_threads(), packed)

    def close(self) -> None:
        """Restore the model exactly as it was. Safe to call twice, and after a failed open."""
        if self.pool is None:
            return
        self.pool.gate.refuse_reentry("a vzstream session cannot be closed from inside a call on its pool "
                                      "(a hook or callback); close it after the call returns.")
        for cancel in list(self._cancels):    # an abandoned stream must not hold the lock
            cancel.set()
        with self.pool.gate.held(None):
            self._close_locked()

    def _close_locked(self) -> None:
        _close_parts(self.model, self.member, self.pool, self.config.pool is None, self._host_threads(), self)

    def _keep_final(self) -> None:
        """What `stats()` and `plan` say after the session."""
        if self.is_open:
            self._final = (self.stats(), self.plan, self.member.runtime.timing)


    def _host_threads(self) -> int:
        """Threads for packing and restoring, while the model runs nothing: every core (≤ 16)."""
        return max(self.config.max_workers, min(16, available_cores()))

    # -- running ----------------------------------------------------------------------------
    def _running(self):
        """Hold the pool for one call (see `DevicePool.call`)."""
        self._check_open()
        interval = self.config.gil_switch_interval if any(u.streamed for u in self.units) else None
        return self.pool.call(self.member, interval, self._check_open)

    def _check_open(self) -> None:
        if not self.is_open:
            raise TraceError("this vzstream session is not open; use it inside `with vzstream.session(model) as s:`.")

    def __call__(self, *args, **kwargs):
        """The model's forward, streamed (under `torch.no_grad`)."""
        with self._running():
            return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """`model.generate(...)` for Hugging Face models; otherwise greedy decoding over logits."""
        with self._running():
            gen = getattr(self.model, "generate", None)
            if callable(gen):
                ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
                growth = kv_growth_nbytes(self.model, ids, kwargs)
                self.pool.expect_growth(self.member, growth, f"generating up to {kwargs.get('max_new_tokens')} new "
                                                            f"tokens for {getattr(ids, 'shape', ['?'])[0]} sequence(s)")
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
            raise TraceError("`plan` is known once the session is open: read it inside "
                             "`with vzstream.session(model) as s:`.")
        return self.pool.describe(self.member, self.config.units)

    @property
    def stores(self) -> dict:
        """unit index -> its packed store, for every streamed unit (for tests and benchmarks)."""
        return {u.index: u.store for u in self.units if u.streamed and u.store is not None}

    def stats(self) -> Stats:
        """A snapshot of the session's counters and where each pass's time went (see `Stats`;
        `print(s.stats())` for a table ending with advice)."""
        if self.member is None and self._final is not None:
            return dataclasses.replace(self._final[0])
        runtime = self.member.runtime if self.member is not None else None
        return collect(self.units, runtime, self.calibration, self.backend)

    def timeline(self, path: str, passes: int = 2) -> None:
        """Draw the last `passes` passes into the image `path` (PNG): a lane per decode worker,
        the copy lane, the expansion lane (CUDA) and the compute lane with its stalls. Needs
        matplotlib (`pip install vzstream[plot]`); docs/guide.md, "Profiling", shows how to read it."""
        from .plot import draw_timeline       # matplotlib only when drawing

        if passes < 1:
            raise ConfigError(f"`passes` must be at least 1; got {passes}.")
        if self.member is not None:
            timing = self.member.runtime.timing
        elif self._final is not None:
            timing = self._final[2]
        else:
            raise TraceError("`timeline` draws passes a session ran: call it inside "
                             "`with vzstream.session(model) as s:`, after running the model.")
        draw_timeline(timing, path, passes, title=f"vzstream {type(self.model).__name__} on {self.backend.device}")


def _close_parts(model, member, pool: DevicePool, own_pool: bool, threads: int, session) -> None:
    """Close a session's parts (the caller holds the pool's lock). `session` is None when it was
    collected while open (`orphans`): its parts alone put the model back."""
    close_member(member, pool, threads, session._keep_final if session is not None else _nothing,
                 partial(_forget, model, member, pool, own_pool, session))


def _forget(model, member, pool: DevicePool, own_pool: bool, session) -> None:
    """The session's own state first (it cannot fail), then the pool and backend."""
    if session is not None:
        session.member, session.is_open = None, False
    orphans.unwatch(model)
    _open_models.discard(model)
    for p in model.parameters():
        _open_params.pop(id(p), None)
    try:
        pool.leave(member)
        pool.rebalance()                  # the others may keep more resident now
    finally:
        if own_pool:
            pool.backend.close()


def _nothing() -> None:
    pass


def _check_not_open(model: nn.Module) -> None:
    if orphans.abandoned(model):          # its session was collected before it could close
        orphans.restore(model)
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
