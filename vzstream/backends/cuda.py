"""CUDA backend: pinned host memory, a pinned staging ring, a copy stream and events (DESIGN §5, §6).

Mechanism only: the pipeline decides which unit is fetched into which device slot, and when.
Per fetch (one `Ticket`):

  decode   workers decode the unit's compressed planes into a pinned staging slot (a
           round-robin ring). Before writing, each job gates on the slot's previous user: first
           its ticket's `ready` flag (set only after its upload was issued, so its `copied` event
           has been recorded by then), then `copied.synchronize()`, on the worker thread.
  upload   the worker that finished the last job, on the copy stream: wait the device slot's
           `used` event, copy each plane host→device (compressed planes from staging, raw planes
           straight from the pinned store arena), interleave the planes into the slot with one
           copy kernel per tensor, record `copied` (staging reusable) and `uploaded` (slot full).
  bind     forward thread: the compute stream waits `uploaded`. The host does not wait.
  release  forward thread: record `used` on the compute stream; the next upload into that slot
           makes the copy stream wait on it before overwriting the slot.

Invariants:
- The forward thread never blocks on the GPU: bind and release only enqueue a stream wait or an
  event record. Host waits on events happen on worker threads only.
- Every event is recorded before anything waits on it: a wait on a never-recorded CUDA event
  passes at once, silently. Hence the host-side `ready` gate in front of `copied`.
- Every host buffer a copy reads is pinned, in exact (page-rounded) size: a non-blocking copy
  from pageable memory silently synchronises, which kills overlap.
- The device scratch is allocated and used on the copy stream only, so stream order makes its
  reuse safe; uploads are serialised by a lock so two workers never interleave on it.
- Importing this module does not initialise CUDA; constructing a `CudaBackend` does.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import threading
from functools import partial

import numpy as np
import torch
from torch.profiler import record_function

from .. import codec
from ..errors import FormatError
from .base import Backend, chunk_jobs

log = logging.getLogger("vzstream")

PAGE_NBYTES = mmap.PAGESIZE
STAGING_ALIGNMENT = 64      # plane offsets in a staging slot: whole cache lines per plane


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# -- pure planning: which planes go through staging, and where ----------------------------------
@dataclasses.dataclass(frozen=True)
class PlaneCopy:
    index: int          # which byte of each element the plane holds (0 = least significant)
    nbytes: int
    staged: bool        # True: a worker writes it into staging; False: raw, in the pinned arena
    offset: int         # byte offset in the staging slot (staged) or in the store's arena


@dataclasses.dataclass(frozen=True)
class TensorUpload:
    name: str
    slot_offset: int    # byte offset of the tensor in the device slot
    numel: int
    itemsize: int
    planes: tuple[PlaneCopy, ...]   # one plane: copied straight into the slot; else interleaved

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclasses.dataclass(frozen=True)
class UploadPlan:
    tensors: tuple[TensorUpload, ...]   # one per parameter of the unit, in store order
    staging_nbytes: int                 # staging bytes one fetch of the unit needs
    merge_nbytes: int                   # device scratch for the largest multi-plane tensor
    last_staged: int                    # index of the last tensor reading staging (-1: none)


def arena_offset(arena: torch.Tensor, buf) -> int | None:
    """Byte offset of buffer `buf` inside the host tensor `arena`, or None if it lies elsewhere."""
    view = np.frombuffer(buf, dtype=np.uint8)
    addr, base = view.__array_interface__["data"][0], arena.data_ptr()
    if view.size and base <= addr and addr + view.size <= base + arena.numel():
        return addr - base
    return None


def plan_upload(store) -> UploadPlan:
    """Where each plane of `store` comes from: staging (compressed, or raw outside the pinned
    arena, which a worker copies in) or the arena itself (raw planes, uploaded in place)."""
    tensors, staging, merge, last_staged = [], 0, 0, -1
    for (name, _), packed, slot_offset in zip(store.unit.params, store.packed, store.offsets):
        planes = []
        for i, plane in enumerate(packed.planes if packed.numel else ()):
            offset = None if plane.compressed else arena_offset(store.arena, plane.raw)
            staged = offset is None
            if staged:
                offset = staging
                staging = _align(staging + plane.nbytes, STAGING_ALIGNMENT)
            planes.append(PlaneCopy(plane.index, plane.nbytes, staged, offset))
            if plane.index != i:
                raise FormatError(f"tensor `{name}`: plane {i} claims index {plane.index}")
        if len(planes) not in (0, 1, packed.itemsize):
            raise FormatError(f"tensor `{name}`: {len(planes)} planes for itemsize {packed.itemsize}")
        if len(planes) > 1:
            merge = max(merge, packed.raw_nbytes)
        if any(p.staged for p in planes):
            last_staged = len(tensors)
        tensors.append(TensorUpload(name, slot_offset, packed.numel, packed.itemsize, tuple(planes)))
    return UploadPlan(tuple(tensors), staging, merge, last_staged)


def staging_items(store, plan: UploadPlan) -> list[tuple[int, str, object, int]]:
    """(nbytes, tensor name, source, staging offset) for every piece a worker writes into
    staging: each frame of a compressed plane, or a whole raw plane outside the arena."""
    items = []
    for t, packed in zip(plan.tensors, store.packed):
        for pc, plane in zip(t.planes, packed.planes):
            if not pc.staged:
                continue
            if plane.compressed:
                items.extend((f.nbytes, t.name, f, pc.offset + f.start) for f in plane.frames)
            else:
                items.append((pc.nbytes, t.name, plane.raw, pc.offset))
    return items


def stage_into(source, dst: torch.Tensor) -> None:
    """Write one staging item into `dst` (a uint8 slice of a staging slot, exactly its size)."""
    if isinstance(source, codec.Frame):
        codec.decode_frame_into(source, dst)
    else:
        dst.numpy()[:] = np.frombuffer(source, dtype=np.uint8)


def merge_planes(dst: torch.Tensor, planes: list[torch.Tensor], scratch: torch.Tensor | None,
                 numel: int, itemsize: int) -> None:
    """Write byte planes (plane i = byte i of each little-endian element) into `dst`, a uint8
    view of `numel * itemsize` bytes. Several planes go through `scratch` in planar layout
    `[itemsize, numel]`, then one strided copy interleaves them; on CUDA that is one kernel."""
    if len(planes) == 1:
        dst.copy_(planes[0], non_blocking=True)
        return
    planar = scratch[: numel * itemsize]
    for i, src in enumerate(planes):
        planar[i * numel : (i + 1) * numel].copy_(src, non_blocking=True)
    dst.view(numel, itemsize).copy_(planar.view(itemsize, numel).t())


# -- host memory ---------------------------------------------------------------------------------
class PinnedHeap:
    """Host buffers pinned in exact size (whole pages) with `cudaHostRegister`.

    `torch.empty(..., pin_memory=True)` goes through the pinned caching allocator, which rounds
    each block up to a power of two: up to 2x the host RAM. Here each buffer is a plain CPU
    allocation padded so the registered range covers whole pages no other allocation shares
    (registering a page twice fails). The backing tensors live here until unregistered: freeing
    registered memory would hand pinned pages back to malloc.
    """

    def __init__(self, register, unregister) -> None:
        self._register, self._unregister = register, unregister
        self._lock = threading.Lock()
        self._live: dict[int, torch.Tensor] = {}     # registered address -> backing allocation
        self.nbytes = 0                              # bytes registered right now

    def alloc(self, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        size = _align(nbytes, PAGE_NBYTES)
        backing = torch.empty(size + PAGE_NBYTES, dtype=torch.uint8)
        start = _align(backing.data_ptr(), PAGE_NBYTES) - backing.data_ptr()
        buf = backing[start : start + size]
        self._register(buf.data_ptr(), size)
        with self._lock:
            self._live[buf.data_ptr()] = backing
            self.nbytes += size
        return buf[:nbytes]

    def free(self, buf: torch.Tensor) -> None:
        with self._lock:
            backing = self._live.pop(buf.data_ptr(), None)
            if backing is None:
                return
            self.nbytes -= _align(buf.numel(), PAGE_NBYTES)
        self._unregister(buf.data_ptr())

    def close(self) -> None:
        with self._lock:
            ptrs, self._live, self.nbytes = list(self._live), {}, 0
        for ptr in ptrs:
            try:
                self._unregister(ptr)
            except Exception as exc:  # keep unregistering the rest; the memory is freed anyway
                log.warning("vzstream: unpinning host memory at %#x failed: %r", ptr, exc)


class StagingUse:
    """One fetch's use of one staging slot, linked to the slot's previous use until gated."""

    __slots__ = ("buffer", "ready", "copied", "prev", "retired", "lock")

    def __init__(self, buffer, ready, prev, retired) -> None:
        self.buffer, self.ready, self.prev, self.retired = buffer, ready, prev, retired
        self.copied = None           # event recorded after the last copy reading `buffer`
        self.lock = threading.Lock()


class StagingRing:
    """A round-robin ring of pinned staging slots (DESIGN §6, "staging reuse").

    `acquire` runs on the forward thread, in the order fetches are submitted to the worker pool
    (FIFO): a use only ever gates on an *earlier* submission, so gating cannot deadlock.
    A slot grows when a larger unit arrives; its old buffer is freed by the new use's gate, once
    the previous use's copies from it have finished.
    """

    def __init__(self, num_slots: int, alloc, free) -> None:
        if num_slots < 1:
            raise ValueError(f"`staging_slots` must be >= 1; got {num_slots}.")
        self._alloc, self._free = alloc, free
        self._uses: list[StagingUse | None] = [None] * num_slots
        self._buffers: list[torch.Tensor | None] = [None] * num_slots
        self._next = 0

    def acquire(self, nbytes: int, ready) -> StagingUse:
        """The next slot, for a fetch whose ticket sets `ready` after its upload is issued."""
        i, self._next = self._next, (self._next + 1) % len(self._uses)
        buf, retired = self._buffers[i], None
        if buf is None or buf.numel() < nbytes:
            retired, buf = buf, self._alloc(nbytes)
            self._buffers[i] = buf
        use = StagingUse(buf, ready, self._uses[i], retired)
        self._uses[i] = use
        return use

    def gate(self, use: StagingUse) -> None:
        """Block (a worker) until `use` may write its buffer; idempotent across a fetch's jobs."""
        with use.lock:
            prev, use.prev = use.prev, None          # cut the chain: old uses can be collected
            if prev is not None:
                prev.ready.wait()                    # its upload was issued: `copied` recorded
                if prev.copied is not None:          # None: it failed before uploading
                    prev.copied.synchronize()
            if use.retired is not None:
                self._free(use.retired)
                use.retired = None


# -- the torch.cuda calls, in one place ------------------------------------------------------------
class CudaRuntime:
    """Every torch.cuda call the backend makes. Tests substitute a CPU fake with this surface."""

    def __init__(self, device: str) -> None:
        dev = torch.device(device)
        if dev.index is None:        # workers must not fall back to *their* current device (0)
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev

    def stream(self):
        return torch.cuda.Stream(self.device)

    def event(self, blocking: bool = False):
        return torch.cuda.Event(blocking=blocking)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def use_stream(self, stream):
        return torch.cuda.stream(stream)    # also makes the stream's device current on this thread

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)

    def register(self, ptr: int, nbytes: int) -> None:
        rc = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
        if rc != 0:
            raise RuntimeError(f"cudaHostRegister({ptr:#x}, {nbytes}) failed with cudaError {rc}")

    def unregister(self, ptr: int) -> None:
        rc = int(torch.cuda.cudart().cudaHostUnregister(ptr))
        if rc != 0:
            raise RuntimeError(f"cudaHostUnregister({ptr:#x}) failed with cudaError {rc}")


class _Fetch:
    """Backend state of one ticket, from `decode_jobs` to `release`."""

    __slots__ = ("plan", "staging", "used", "uploaded")

    def __init__(self, plan: UploadPlan, staging: StagingUse | None, used) -> None:
        self.plan, self.staging, self.used = plan, staging, used
        self.uploaded = None


def _nothing() -> None:
    pass


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, device: str = "cuda", *, staging_slots: int = 3, runtime=None) -> None:
        super().__init__()
        self.runtime = runtime if runtime is not None else CudaRuntime(device)
        self.device = self.runtime.device
        self.copy_stream = self.runtime.stream()
        self.heap = PinnedHeap(self.runtime.register, self.runtime.unregister)
        self.staging_slots = staging_slots
        self.staging = StagingRing(staging_slots, self.heap.alloc, self.heap.free)
        self._plans: dict = {}            # UnitStore -> UploadPlan, computed at its first fetch
        self._fetches: dict = {}          # Ticket -> _Fetch
        self._used: dict[int, object] = {}   # slot index -> `used` event of its latest release
        self._scratch: torch.Tensor | None = None
        self._upload_lock = threading.Lock()

    # -- memory -----------------------------------------------------------------------------
    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return self.heap.alloc(nbytes)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        buf = super().device_buffer(nbytes)
        # The allocator may hand out a block whose last compute-stream user has not run yet;
        # the copy stream will write into it, so it must start after that work.
        self.copy_stream.wait_stream(self.runtime.current_stream())
        return buf

    def free_device_buffer(self, buf: torch.Tensor) -> None:
        # A drained prefetch may still be writing the slot on the copy stream: keep the block
        # from being reused until that work is done.
        self.runtime.record_stream(buf, self.copy_stream)
        super().free_device_buffer(buf)

    def _scratch_for(self, nbytes: int) -> torch.Tensor:
        """Device scratch of >= nbytes. Call on the copy stream: the block then belongs to it,
        so freeing a smaller one and reusing memory is ordered by the stream itself."""
        old = self._scratch.numel() if self._scratch is not None else 0
        if old < nbytes:
            self._scratch = None
            self._scratch = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self.account(nbytes - old)
        return self._scratch

    # -- the five ops -------------------------------------------------------------------------
    def decode_jobs(self, ticket) -> list:
        store, fqn = ticket.store, ticket.store.unit.fqn
        plan = self._plans.get(store)
        if plan is None:
            plan = self._plans[store] = plan_upload(store)
        staging = self.staging.acquire(plan.staging_nbytes, ticket.ready) if plan.staging_nbytes else None
        self._fetches[ticket] = _Fetch(plan, staging, self._used.get(ticket.slot.index))
        if staging is None:
            return [[(fqn, _nothing)]]   # one job, so the upload is issued on a worker, not here
        items = [
            (nbytes, name, partial(self._stage, fqn, staging, source, offset, nbytes))
            for nbytes, name, source, offset in staging_items(store, plan)
        ]
        return [[(fqn, partial(self.staging.gate, staging))] + job for job in chunk_jobs(items)]

    @staticmethod
    def _stage(fqn: str, staging: StagingUse, source, offset: int, nbytes: int) -> None:
        with record_function(f"vzstream.decode:{fqn}"):
            stage_into(source, staging.buffer[offset : offset + nbytes])

    def upload(self, ticket) -> None:
        fetch = self._fetches[ticket]
        rt = self.runtime
        with record_function(f"vzstream.upload:{ticket.store.unit.fqn}"), self._upload_lock, \
                rt.use_stream(self.copy_stream):
            if fetch.used is not None:
                self.copy_stream.wait_event(fetch.used)    # the slot's last reader is done
            copied = self._copy_planes(ticket, fetch)
            uploaded = rt.event()
            uploaded.record(self.copy_stream)
        fetch.uploaded = uploaded
        if fetch.staging is not None:
            fetch.staging.copied = copied     # before the pipeline sets ticket.ready: see gate

    def _copy_planes(self, ticket, fetch: _Fetch):
        """Enqueue every plane copy and merge on the copy stream; the `copied` event (or None)."""
        plan, arena, slot = fetch.plan, ticket.store.arena, ticket.slot.tensor
        staged = fetch.staging.buffer if fetch.staging is not None else None
        scratch = self._scratch_for(plan.merge_nbytes) if plan.merge_nbytes else None
        copied = None
        for i, t in enumerate(plan.tensors):
            if t.planes:
                sources = [(staged if p.staged else arena)[p.offset : p.offset + p.nbytes] for p in t.planes]
                dst = slot[t.slot_offset : t.slot_offset + t.nbytes]
                merge_planes(dst, sources, scratch, t.numel, t.itemsize)
            if i == plan.last_staged:
                # Blocking: the worker that waits on it sleeps instead of spinning a decode core.
                copied = self.runtime.event(blocking=True)
                copied.record(self.copy_stream)
        return copied

    def wait(self, ticket) -> None:
        fetch = self._fetches[ticket]
        with record_function(f"vzstream.bind:{ticket.store.unit.fqn}"):
            if fetch.uploaded is not None:
                self.runtime.current_stream().wait_event(fetch.uploaded)

    def release(self, ticket) -> None:
        self._fetches.pop(ticket, None)
        with record_function(f"vzstream.release:{ticket.store.unit.fqn}"):
            used = self.runtime.event()
            used.record(self.runtime.current_stream())
            self._used[ticket.slot.index] = used

    def close(self) -> None:
        try:
            self.copy_stream.synchronize()    # nothing may still read memory unpinned below
        finally:
            self.heap.close()
            self.staging = StagingRing(self.staging_slots, self.heap.alloc, self.heap.free)
            if self._scratch is not None:
                self.account(-self._scratch.numel())
                self._scratch = None
            self._fetches.clear()
            self._plans.clear()
            self._used.clear()
