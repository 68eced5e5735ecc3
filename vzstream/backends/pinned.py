"""Pinned host memory for the CUDA backend: the exact-size pinned heap for store arenas and
the round-robin staging ring that decode workers write into.

Mechanism only, and free of CUDA calls of its own: registering and unregistering are passed in,
events come from the fetches, so all of it is testable on CPU.
"""

from __future__ import annotations

import logging
import mmap
import threading
import weakref

import torch

from ..units import align

log = logging.getLogger("vzstream")

PAGE_NBYTES = mmap.PAGESIZE


class PinnedHeap:
    """Host buffers pinned in exact size (whole pages) with `cudaHostRegister` (`pin_memory=True`
    rounds each block up to a power of two): anonymous mmaps, page-aligned so the registered
    pages are their own and the storage base itself is pinned (`is_pinned()` checks the base),
    kept alive here until unpinned. A buffer
    nobody references any more is unpinned by `reclaim` once a fence recorded after it passed."""

    def __init__(self, register, unregister) -> None:
        self._register, self._unregister = register, unregister
        self._lock = threading.Lock()
        self._live: dict[int, tuple] = {}   # address -> (backing allocation, finalizer)
        self._orphans: list[int] = []       # addresses whose buffer was garbage-collected
        self._fenced: list[tuple] = []      # (fence event, addresses) waiting to be unpinned
        self.nbytes = 0                     # bytes registered right now

    def alloc(self, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        size = align(nbytes, PAGE_NBYTES)
        backing = torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)
        buf = backing[:nbytes]
        self._register(buf.data_ptr(), size)
        with self._lock:
            # list.append is atomic: safe from a finalizer running on any thread at any time.
            finalizer = weakref.finalize(buf, self._orphans.append, buf.data_ptr())
            self._live[buf.data_ptr()] = (backing, finalizer)
            self.nbytes += size
        return buf

    def reclaim(self, fence, wait: bool = False) -> None:
        """Unpin orphans whose fence passed; fence new orphans with `fence()` (a recorded event)."""
        with self._lock:
            fenced, self._fenced, passed = self._fenced, [], []
            for f in fenced:
                (passed if f[0].query() else self._fenced).append(f)   # query never blocks
            batch = []
            while self._orphans:          # pop one by one: a finalizer may append meanwhile
                batch.append(self._orphans.pop())
            if batch:
                done = fence()
                if wait:                 # off the hot path (pool lock held): unpin now
                    done.synchronize()
                    passed.append((done, batch))
                else:
                    self._fenced.append((done, batch))
        for _, ptrs in passed:
            self._drop(ptrs)

    def close(self) -> None:
        """Unpin everything (the caller synchronised every stream that reads these buffers)."""
        self._drop(list(self._live))
        self._orphans[:], self._fenced = [], []

    def _drop(self, ptrs: list[int]) -> None:
        for ptr in ptrs:
            with self._lock:
                entry = self._live.pop(ptr, None)
                if entry is None:
                    continue
                entry[1].detach()
                self.nbytes -= entry[0].numel()
            try:
                self._unregister(ptr)
            except Exception as exc:   # unpin the rest; the memory is freed anyway
                log.warning("vzstream: unpinning host memory at %#x failed: %r", ptr, exc)


class Fetch:
    """Backend state of one ticket, from `decode_jobs` to `release`. A fetch staged through the
    ring is linked to the slot's previous fetch (`prev`) until its jobs pass the gate."""

    __slots__ = ("ready", "used", "array", "buffer", "prev", "copied", "uploaded", "bound", "released", "lock",
                 "on_compute")

    def __init__(self, ready, used=None) -> None:
        # Nothing of the store: the staging ring keeps a fetch until the next one in its slot,
        # and an arena must be free to go once its unit's parameters are back.
        self.ready, self.used = ready, used     # used: the slot's `used` event
        self.buffer = self.array = self.prev = None   # staging buffer, as numpy; previous fetch of its ring slot
        self.copied = self.uploaded = None   # events, recorded by `upload`
        self.bound = False                   # the compute stream waited `uploaded`
        self.released = False                # released: nothing will read or write it again
        self.on_compute = False              # copied on the compute stream (a small raw image, inline)
        self.lock = threading.Lock()


class StagingRing:
    """A round-robin ring of pinned staging slots (docs/design.md, "Backends": staging reuse). `acquire` runs on
    the forward thread in the order fetches are submitted to the FIFO worker pool, so a fetch
    only ever gates on an *earlier* submission: gating cannot deadlock. A slot grows when a
    larger unit arrives; the heap reclaims the old buffer once nothing references it."""

    def __init__(self, num_slots: int, alloc) -> None:
        if num_slots < 1:
            raise ValueError(f"`staging_slots` must be >= 1; got {num_slots}.")
        self._alloc = alloc
        self._last: list[Fetch | None] = [None] * num_slots
        self._buffers: list[torch.Tensor | None] = [None] * num_slots
        self._arrays: list = [None] * num_slots      # numpy views of them, made once: each torch
        self._next = 0                               # call on the forward thread costs, per fetch

    def acquire(self, fetch: Fetch, nbytes: int) -> None:
        """Give `fetch` the next slot (>= nbytes) and link it to that slot's previous fetch."""
        i, self._next = self._next, (self._next + 1) % len(self._last)
        if self._arrays[i] is None or self._arrays[i].size < nbytes:
            # Grow every slot now: pinning is slow, and a slot reached only in a later pass
            # would otherwise pin on the forward thread in the steady state.
            self._buffers = [b if b is not None and b.numel() >= nbytes else self._alloc(nbytes)
                             for b in self._buffers]
            self._arrays = [b.numpy() for b in self._buffers]
        fetch.buffer, fetch.array = self._buffers[i], self._arrays[i]
        fetch.prev, self._last[i] = self._last[i], fetch

    def grow(self, num_slots: int) -> None:
        """At least `num_slots` slots (called between calls: no fetch in flight)."""
        extra = num_slots - len(self._last)
        if extra > 0:
            size = max((b.numel() for b in self._buffers if b is not None), default=0)
            self._last += [None] * extra
            self._buffers += [self._alloc(size) if size else None for _ in range(extra)]
            self._arrays += [None if b is None else b.numpy() for b in self._buffers[-extra:]]

    @staticmethod
    def gate(fetch: Fetch) -> None:
        """Block (a worker) until `fetch` may write its buffer. Every job of a fetch calls it;
        the lock keeps the others waiting until the first has passed."""
        with fetch.lock:
            prev = fetch.prev
            if prev is None:
                return
            while not prev.ready.wait(0.05):        # set once its upload is issued, or it failed
                if prev.released:                   # dropped before its jobs ever ran: it wrote
                    StagingRing.gate(prev)          # nothing, but what it waited for still holds
                    break
            else:
                if prev.copied is not None:         # None: it failed before uploading
                    prev.copied.synchronize()
            fetch.prev = None                       # passed: cut the chain, old fetches can go


