"""Session: the context manager users hold (DESIGN §1, §7).

On enter: pick the backend, find units, pack streamed units into host RAM (their original
storage is freed), move resident parameters and buffers to the device, install hooks.
On exit — normal, exception or KeyboardInterrupt — remove hooks, join workers, restore every
parameter bit-exactly on its original device, free slots and arenas. A failure half-way
through enter undoes exactly what was done.
"""

from __future__ import annotations

import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import psutil
import torch
from torch import nn

from . import codec
from .backends import make_backend
from .config import SessionConfig, build_config
from .errors import TraceError
from .hooks import install, placeholder, remove
from .pipeline import Pipeline, SlotPool, Streamer
from .plan import find_units
from .stats import Stats
from .store import pack_unit

log = logging.getLogger("vzstream")
_open_models: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def session(model: nn.Module, **options) -> "Session":
    """Stream `model`'s weights from compressed host RAM. Options: see `SessionConfig`."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    return Session(model, build_config(options))


class Session:
    def __init__(self, model: nn.Module, config: SessionConfig) -> None:
        self.model, self.config = model, config
        self.backend = None
        self.units: list = []
        self.stores: dict = {}
        self._streamed: list = []    # (param, packed, original device) to restore
        self._moved: list = []       # (param, original device) of resident params
        self._buffers: list = []     # (module, name, original device)
        self._handles: list = []
        self._pool = self._pipeline = self._streamer = None
        self._stats = Stats()
        self.is_open = False

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "Session":
        return self.__enter__()

    async def __aexit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if self.model in _open_models:
            raise TraceError(
                "`model` already has an open vzstream session; close it (leave its `with` block) "
                "before opening another on the same model."
            )
        self.backend = make_backend(self.config)      # fails before anything is allocated
        self.units = find_units(self.model, self.config.units)
        _open_models.add(self.model)
        try:
            self._pack_streamed()
            self._move_resident()
            self._start_streaming()
        except BaseException:
            self.close()
            raise
        self.is_open = True

    def close(self) -> None:
        """Restore the model exactly as it was. Safe to call twice, and after a failed open."""
        try:
            remove(self._handles)
            if self._streamer is not None:
                self._streamer.close()
            elif self._pipeline is not None:
                self._pipeline.close()
        finally:
            self._restore()
            if self._pool is not None:
                self._pool.close()
            if self.backend is not None:
                self.backend.close()
            self.stores.clear()
            self._pool = self._pipeline = self._streamer = None
            _open_models.discard(self.model)
            self.is_open = False

    def _pack_streamed(self) -> None:
        streamed = [u for u in self.units if u.streamed]
        device = self.backend.device
        t0, done = time.perf_counter(), 0
        with ThreadPoolExecutor(self.config.workers, thread_name_prefix="vzstream-pack") as pool:
            # A window of units in flight bounds the extra host RAM while packing.
            window = max(2, self.config.workers)
            futures = [pool.submit(pack_unit, u, self.backend, self.config.level) for u in streamed[:window]]
            for i, unit in enumerate(streamed):
                store = futures[i].result()
                if i + window < len(streamed):
                    futures.append(pool.submit(pack_unit, streamed[i + window], self.backend, self.config.level))
                self.stores[unit.index] = store
                for (_, p), packed in zip(unit.params, store.packed):
                    self._streamed.append((p, packed, p.device))
                    p.data = placeholder(p.dtype, device)  # frees the original storage
                done += 1
                _progress("pack", done, len(streamed), t0)

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

    def _start_streaming(self) -> None:
        cfg, stats = self.config, self._stats
        slot_nbytes = max((s.slot_nbytes for s in self.stores.values()), default=0)
        self._pool = SlotPool(self.backend, slot_nbytes)
        self._pipeline = Pipeline(self.backend, cfg.workers, stats)
        self._streamer = Streamer(self.stores, self.backend, self._pool, self._pipeline, cfg, stats)
        self._handles = install(self.model, self.units, self._streamer)
        stats.units_streamed = sum(u.streamed for u in self.units)
        stats.units_resident = len(self.units) - stats.units_streamed
        stats.packed_nbytes = sum(s.packed_nbytes for s in self.stores.values())
        stats.raw_nbytes = sum(s.raw_nbytes for s in self.stores.values())
        stats.resident_nbytes = sum(u.raw_nbytes for u in self.units if not u.streamed)

    def _restore(self) -> None:
        for p, packed, device in self._streamed:
            p.data = codec.decode(packed).to(device)
        for p, device in self._moved:
            p.data = self.backend.from_device(p.data, device)
        for mod, name, device in self._buffers:
            mod._buffers[name] = mod._buffers[name].to(device)
        self._streamed, self._moved, self._buffers = [], [], []

    # -- running ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self.is_open:
            raise TraceError("this vzstream session is not open; use it inside `with vzstream.session(model) as s:`.")

    def __call__(self, *args, **kwargs):
        """The model's forward, streamed (under `torch.no_grad`)."""
        self._check_open()
        with torch.no_grad():
            return self._guarded(self.model, *args, **kwargs)

    def generate(self, *args, **kwargs):
        """`model.generate(...)` for Hugging Face models; otherwise greedy decoding over logits."""
        self._check_open()
        gen = getattr(self.model, "generate", None)
        with torch.no_grad():
            if callable(gen):
                return self._guarded(gen, *args, **kwargs)
            return self._guarded(greedy, self.model, *args, **kwargs)

    def _guarded(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException:
            self._streamer.abort()      # KeyboardInterrupt skips always_call hooks: tidy up here
            raise

    def stats(self) -> Stats:
        """A snapshot of the session's counters (see `Stats`)."""
        out = self._stats.copy()
        out.trace_misses = self._streamer.tracer.misses if self._streamer else out.trace_misses
        out.peak_device_nbytes = self.backend.peak_device_nbytes if self.backend else 0
        out.host_rss_nbytes = psutil.Process().memory_info().rss
        sched = self._streamer.schedule if self._streamer else None
        if sched is not None:
            out.streamed_nbytes_per_pass = sum(self.stores[u].raw_nbytes for u in sched.fetch_units)
        return out


def greedy(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 16, **_ignored) -> torch.Tensor:
    """Greedy decoding for a model mapping `input_ids [B, S]` to logits `[B, S, V]`."""
    ids = input_ids
    for _ in range(max_new_tokens):
        out = model(ids)
        logits = getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)  # [B, S, V]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


_last_progress = [0.0]


def _progress(stage: str, done: int, total: int, t0: float) -> None:
    """At most one INFO line a second while packing, and one at the end."""
    now = time.perf_counter()
    if done == total or now - _last_progress[0] >= 1.0:
        _last_progress[0] = now
        log.info("vzstream: %s %d/%d units (%.1f s)", stage, done, total, now - t0)
