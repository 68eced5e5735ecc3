"""CUDA backend: pinned host memory, a pinned staging ring, a copy stream, a merge stream and
events (docs/design.md, "Memory" and "Backends").

Mechanism only: the pipeline decides which unit goes into which device slot, and when. Every
unit is a wire image (`image.py`). Per fetch:

  decode   zstd: workers decode the top planes' frames into a pinned staging slot of a ring.
           Each job first gates on the slot's previous fetch: its ticket's `ready` (set once its
           upload was issued, so its `copied` event is recorded by then), then
           `copied.synchronize()`. Nibble and raw images have nothing to decode.
  upload   a worker (the one that ran the last job), on the copy stream: wait the slot's `used`
           event, copy the raw area into the slot, then each chunk into a landing buffer (nibble:
           its bytes as stored; zstd: its low planes from the arena and its top plane from
           staging, then `copied` after the last). The merge stream expands (nibble) or merges
           (zstd) each landed chunk into the slot while the next one crosses the bus; a landing
           buffer is refilled after its `free` event. `uploaded` is recorded on the merge stream,
           after every write of the fetch. A small raw image fetched inline is one copy on the
           compute stream instead, in stream order (no event).
  bind     forward thread: the compute stream waits `uploaded`. The host does not wait.
  release  forward thread: record `used` on the compute stream, for the slot's next upload (a
           fetch dropped unbound: on the merge stream, after every write to the slot).

Every event but zstd's `copied` is made once and re-recorded (per slot: `uploaded`, `used`; per
landing buffer: `landed`, `free`): an Event's destructor hands the GIL over. A fetch on plan also
marks its timing events (`timer.py`) before and after its copies and kernels; they order nothing.

Invariants: the forward thread never blocks on the GPU (event waits happen on workers; staging
of at most 1 MiB, which the pipeline may decode on the forward thread, comes from torch's pinned
caching allocator, which recycles a block only once its copies are done: no gate). Every event
is recorded before anything waits on it: waiting on a never-recorded event passes at once. Every
host buffer a copy reads is pinned: a non-blocking copy from pageable memory silently
synchronises, which kills overlap. Importing this module never initialises CUDA.
"""

from __future__ import annotations

import logging
import threading
from functools import partial

import torch

from ..codec import Codec
from ..image import PAIRS_NBYTES as PAIRS_AT, landing_nbytes, lane_itemsize
from ..units import align
from .base import Backend, chunk_jobs
# The torch calls that move bytes, imported by name: tests patch them here, on this module.
from .device_ops import stage_into, upload_many
from .expand import expand as expand_chunk, merge_planes
from .pinned import PAGE_NBYTES, Fetch, PinnedHeap, StagingRing  # noqa: F401 (re-exported)
from .timer import COPIED, EXPAND, MERGED, START, DeviceTimer

log = logging.getLogger("vzstream")

SMALL_STAGING_NBYTES = 1 << 20    # up to this much staging: a caching-allocator block, no ring
UPLOAD_PROBE_NBYTES = 64 << 20   # one copy this large runs at full PCIe speed (~1 ms on Gen5)
_UPLOAD_GBPS: dict = {}          # (cuda module, device) -> measured GB/s, once per process
LANDING_BUFFERS = 2               # wire images: one chunk lands while the one before is expanded


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, device: str = "cuda", *, staging_slots: int = 3, cuda=None) -> None:
        super().__init__()
        self.cuda = torch.cuda if cuda is None else cuda   # tests pass a CPU stand-in
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Workers must not fall back to *their* current device, which is always 0.
            self.device = torch.device("cuda", self.cuda.current_device())
        self.copy_stream = self.cuda.Stream(self.device)
        # High priority: a merge frees a scratch region the copy engine waits for; queued behind
        # compute kernels that fill every SM, it would leave PCIe idle.
        self.merge_stream = self.cuda.Stream(self.device, priority=-1)
        self.heap = PinnedHeap(lambda ptr, nbytes: self._cudart("cudaHostRegister", ptr, nbytes, 0),
                               lambda ptr: self._cudart("cudaHostUnregister", ptr))
        self.staging = StagingRing(staging_slots, self.heap.alloc)
        self._fetches: dict = {}             # Ticket -> Fetch
        # Per slot index, made once and re-recorded: `used` after its latest reader (recorded at
        # release; absent until then), `uploaded` after a fetch's last write into it.
        self._used: dict[int, object] = {}
        self._uploaded: dict[int, object] = {}
        self._used_on: dict[int, object] = {}    # the stream each slot's `used` was last recorded on
        self._compute_streams: set = set()       # streams inline copies read pinned arenas on
        self._landing: list[torch.Tensor] = []   # wire images: device buffers chunks land in
        self._landed = [self.cuda.Event() for _ in range(LANDING_BUFFERS)]   # copy -> expand
        self._landing_free: list = [None] * LANDING_BUFFERS                  # expand -> next copy
        self._next_landing = 0
        self._image_views: dict = {}             # (store, slot index) -> (slot tensor, raw copy, chunks)
        self._frames: dict = {}                  # store -> [(staging offset, zstd frame, its tensors)]
        # Events re-recorded rather than made per use: an Event's destructor hands the GIL over
        # (torch/csrc/cuda/Event.cpp), one more wait per use beside a busy forward thread. Safe
        # because each is re-recorded only after every wait on its previous record was enqueued
        # (a wait captures the record current when it is called), all under `_upload_lock`.
        self._handoff = self.cuda.Event()        # copy stream -> merge stream, waited at once
        self._upload_lock = threading.Lock()

    measures_activations = True

    def begin_measure(self) -> None:
        # Host-side allocator queries: no GPU synchronisation. The peak is reset on the traced
        # pass, and on every pass under a budget (`Headroom`): a user's own peak reading across
        # a pass is moved by it.
        self._measure_base = self.cuda.memory_allocated(self.device)
        self.cuda.reset_peak_memory_stats(self.device)

    def end_measure(self) -> int | None:
        return max(0, self.cuda.max_memory_allocated(self.device) - self._measure_base)

    def in_use(self) -> int | None:
        return self.cuda.memory_allocated(self.device)

    def total_memory(self) -> int:
        return self.cuda.get_device_properties(self.device).total_memory

    def upload_gbps(self) -> float | None:
        """Pinned host→device GB/s on the copy stream: the fastest of 3 timed 64 MiB copies after
        a warm-up (a host delay can only make a copy look slower), measured once per device per
        process. Under the upload lock, so no fetch's copies share the stream meanwhile; the
        source comes from the exact-size heap, so it is unpinned, not cached, afterwards."""
        key = (self.cuda, self.device)
        if key not in _UPLOAD_GBPS:
            src = self.host_buffer(UPLOAD_PROBE_NBYTES)
            with self._upload_lock, self.cuda.device(self.device):
                dst = torch.empty(UPLOAD_PROBE_NBYTES, dtype=torch.uint8, device=self.device)
                self.copy_stream.wait_stream(self.cuda.current_stream(self.device))  # as device_buffer
                times = []
                with self.cuda.stream(self.copy_stream):
                    for _ in range(4):                  # the first is warm-up
                        start, end = self.cuda.Event(enable_timing=True), self.cuda.Event(enable_timing=True)
                        self.copy_stream.record_event(start)
                        dst.copy_(src, non_blocking=True)
                        self.copy_stream.record_event(end)
                        end.synchronize()               # so `dst` and `src` are free to go
                        times.append(start.elapsed_time(end) / 1e3)
            _UPLOAD_GBPS[key] = UPLOAD_PROBE_NBYTES / min(times[1:]) / 1e9
        return _UPLOAD_GBPS[key]

    def scratch_nbytes(self, units, codec: str = Codec.ZSTD) -> int:
        """Device memory the uploads of `units` need besides the slots: two landing buffers of
        the largest chunk a unit's lane can have (`image.landing_nbytes`)."""
        # param_nbytes, not p.numel(): streamed params are empty placeholders after packing.
        largest = 0
        for u in units:
            k = lane_itemsize([(p.dtype, n) for (_, p), n in zip(u.params, u.param_nbytes)], codec)
            lane = sum(align(n, self.alignment) for (_, p), n in zip(u.params, u.param_nbytes)
                       if p.dtype.is_floating_point and p.element_size() == k)
            largest = max(largest, landing_nbytes(codec, k, lane // k) if k else 0)
        return LANDING_BUFFERS * largest

    @property
    def scratch_held(self) -> int:
        return sum(buf.numel() for buf in self._landing)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        # Runs on pack threads, whose current device is 0: without this, a session on cuda:1
        # would create a context (hundreds of MiB) on GPU 0.
        with self.cuda.device(self.device):
            self.heap.reclaim(self._fence)
            return self.heap.alloc(nbytes)

    def _fence(self):
        """An event after every copy issued so far: on the copy stream, and on the streams that
        inline copies ran on (`_upload_on_compute`), which read arenas too."""
        for stream in list(self._compute_streams):
            self.copy_stream.wait_stream(stream)
        return self.copy_stream.record_event()

    def _cudart(self, name: str, *args) -> None:
        with self.cuda.device(self.device):
            rc = int(getattr(self.cuda.cudart(), name)(*args))
        if rc != 0:
            raise RuntimeError(f"{name}{args} failed with cudaError {rc}")

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        buf = super().device_buffer(nbytes)
        # The allocator may hand out a block whose last compute-stream user has not run yet;
        # the copy stream writes into it, so it must start after that work.
        self.copy_stream.wait_stream(self.cuda.current_stream(self.device))
        return buf

    def free_device_buffer(self, buf: torch.Tensor) -> None:
        # A drained prefetch may still be writing the slot (or merging out of a scratch region):
        # keep the block from being handed out again until that work is done.
        if buf.is_cuda:
            buf.record_stream(self.copy_stream)
            buf.record_stream(self.merge_stream)
        super().free_device_buffer(buf)

    def _grow_landing(self, size: int) -> None:
        """Landing buffers of at least `size` bytes (a wire image's largest chunk)."""
        if self._landing and self._landing[0].numel() >= size:
            return
        for buf in self._landing:
            self.free_device_buffer(buf)
        self._landing = [self.device_buffer(size) for _ in range(LANDING_BUFFERS)]
        self._image_views.clear()                # they view the old buffers

    def _pinned_block(self, nbytes: int) -> torch.Tensor:
        """Small staging from torch's pinned caching allocator, which recycles a block only once
        the copies that read it are done: no gate needed."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    # -- the five ops -------------------------------------------------------------------------
    def decode_jobs(self, ticket) -> list:
        """zstd: a job per frame of the top planes, each decoded into the fetch's staging at the
        frame's lane offset (its first job gates on the staging slot's previous fetch). Nibble
        and raw images: nothing for the host."""
        store = ticket.store
        fetch = self._fetches[ticket] = Fetch(ticket.ready, self._used.get(ticket.slot.index))
        frames = self._frames.get(store)
        if frames is None:
            frames = self._frames[store] = _frames_of(store)
        if not frames:
            return []                      # nothing to decode: the pipeline picks the thread that uploads
        nbytes = store.image.coded_nbytes // store.image.itemsize   # the top plane: a byte per lane element
        gate = []
        if nbytes > SMALL_STAGING_NBYTES:
            self.staging.acquire(fetch, nbytes)
            gate = [(store.unit.fqn, partial(self._gate, fetch))]
        else:
            fetch.buffer = self._pinned_block(nbytes)
            fetch.array = fetch.buffer.numpy()
        dst, fqn = fetch.array, store.unit.fqn                      # numpy: see stage_into
        work = [(f.nbytes, what, partial(stage_into, dst, at, f.nbytes, f, fqn)) for at, f, what in frames]
        return [gate + job for job in chunk_jobs(work)]

    def _gate(self, fetch: Fetch) -> None:
        with self.cuda.device(self.device):            # the event wait runs on a worker thread
            StagingRing.gate(fetch)

    def prepare(self, prefetch: int, stores=()) -> None:
        """A staging slot per fetch in flight, plus one, so decoding runs `prefetch` ahead; the
        landing buffers for `stores`, allocated here on the forward thread from the compute
        stream's pool (not on a worker in the middle of a pass)."""
        self.staging.grow(prefetch + 1)
        landing = max((_landing_need(s.image) for s in stores), default=0)
        if landing:
            self._grow_landing(landing)

    def device_timer(self, num_fetches: int, prefetch: int) -> DeviceTimer:
        return DeviceTimer(self.cuda, self.device, num_fetches, prefetch)

    def upload(self, ticket) -> None:
        fetch, timed = self._fetches[ticket], ticket.timing     # timed: its DeviceTimer record, or None
        if ticket.inline and not ticket.store.image.chunks:
            return self._upload_on_compute(ticket, fetch)
        # torch.cuda.device first: leaving `stream(...)` alone would restore device 0's stream
        # on this worker and so create a context on GPU 0.
        with self._upload_lock, self.cuda.device(self.device), self.cuda.stream(self.copy_stream):
            try:
                if fetch.used is not None:
                    self.copy_stream.wait_event(fetch.used)    # the slot's last reader is done
                if timed is not None:
                    timed.mark(START, self.copy_stream)
                self._copy_image(ticket, fetch)
            finally:
                # Also after a failure: whatever was enqueued must finish before the staging
                # is decoded into again, and before the slot's `used` passes.
                if fetch.buffer is not None and fetch.copied is None:
                    fetch.copied = self.copy_stream.record_event(self.cuda.Event(blocking=True))
                if timed is not None:
                    timed.mark(COPIED, self.copy_stream)
                    timed.mark(MERGED, self.merge_stream)
                self.merge_stream.wait_event(self.copy_stream.record_event(self._handoff))
                fetch.uploaded = self.merge_stream.record_event(self._slot_event(self._uploaded, ticket.slot.index))
        # Both are set before the pipeline sets ticket.ready, which is what the gate waits for.

    def _upload_on_compute(self, ticket, fetch) -> None:
        """A small all-raw image fetched inline (on the forward thread, at its bind): one copy on
        the compute stream, which orders it after the slot's last reader and before the unit's
        compute by itself; no event to record or wait (but its timing marks), unless the slot's
        last `used` was recorded on another stream (a drained prefetch's writes)."""
        compute, index, timed = self.cuda.current_stream(self.device), ticket.slot.index, ticket.timing
        with self.cuda.device(self.device):
            if fetch.used is not None and self._used_on.get(index) != compute:
                compute.wait_event(fetch.used)
            if timed is not None:
                timed.mark(START, compute)
            raw, _ = self._views_of_image(ticket.store, ticket.slot)
            if raw is not None:
                self._compute_streams.add(compute)       # the heap's fence must cover it
                upload_many([raw])
            if timed is not None:
                timed.mark(COPIED, compute)
                timed.mark(MERGED, compute)
            fetch.on_compute = True

    def _slot_event(self, events: dict, index: int):
        event = events.get(index)
        if event is None:
            event = events[index] = self.cuda.Event()
        return event

    def _copy_image(self, ticket, fetch: Fetch) -> None:
        """A wire image into its slot: the raw area in one copy, then each chunk into a landing
        buffer (the copy stream: its bytes from the arena, and for zstd its decoded top plane
        from staging) and expanded or merged from there into the slot (the merge stream) while
        the next chunk crosses the bus. A landing buffer is refilled only after the kernel that
        read it (its `free` event); every view and event was made before, but zstd's `copied`
        (the staging gate's fence, after the last copy out of staging)."""
        raw, chunks = self._views_of_image(ticket.store, ticket.slot)
        if raw is not None:
            upload_many([raw])
        staged = fetch.buffer                    # zstd's decoded top planes; None: nothing staged
        for i, (copies, per_landing) in enumerate(chunks):
            k, self._next_landing = self._next_landing, (self._next_landing + 1) % LANDING_BUFFERS
            into, kernel, args = per_landing[k]
            if self._landing_free[k] is not None:
                self.copy_stream.wait_event(self._landing_free[k])
            upload_many([(into[0], copies[0])] if staged is None else
                         [(into[0], copies[0]), (into[1], staged[copies[1] : copies[1] + into[1].numel()])])
            if staged is not None and i == len(chunks) - 1:
                fetch.copied = self.copy_stream.record_event(self.cuda.Event(blocking=True))
            self.merge_stream.wait_event(self.copy_stream.record_event(self._landed[k]))
            if i == 0 and ticket.timing is not None:
                ticket.timing.mark(EXPAND, self.merge_stream)
            try:
                with self.cuda.stream(self.merge_stream):
                    kernel(*args)
            finally:                             # also when interrupted: after what was enqueued
                if self._landing_free[k] is None:
                    self._landing_free[k] = self.cuda.Event()
                self.merge_stream.record_event(self._landing_free[k])

    def _views_of_image(self, store, slot) -> tuple:
        """(raw area (slot view, arena view) or None, per chunk ((arena view, staging offset),
        per landing buffer (its views to copy into, the kernel, its arguments))), made once per
        (store, slot)."""
        entry = self._image_views.get((store, slot.index))
        if entry is None or entry[0] is not slot.tensor:
            image, dst = store.image, slot.tensor
            if image.chunks:
                self._grow_landing(_landing_need(image))        # a no-op after `prepare`
            raw = None
            if image.raw_nbytes:
                raw = (dst[image.coded_nbytes : image.coded_nbytes + image.raw_nbytes],
                       image.arena[image.raw_offset : image.raw_offset + image.raw_nbytes])
            chunks = [_chunk_views(image, c, dst, self._landing) for c in image.chunks]
            entry = self._image_views[(store, slot.index)] = (slot.tensor, raw, chunks)
        return entry[1], entry[2]

    def wait(self, ticket) -> None:
        fetch = self._fetches[ticket]
        fetch.bound = True
        if fetch.on_compute:                                 # in stream order already
            return
        self.cuda.current_stream(self.device).wait_event(fetch.uploaded)   # the pipeline saw it issued

    def release(self, ticket) -> None:
        fetch = self._fetches.pop(ticket, None)
        if fetch is None or fetch.bound or fetch.on_compute:
            stream = self.cuda.current_stream(self.device)
        else:
            # Dropped unbound: nothing read the slot. Its last writes end on the merge stream;
            # with no upload, the slot's previous `used` (maybe a drained merge) still stands.
            stream = self.merge_stream if fetch.uploaded is not None else None
        if stream is not None:
            stream.record_event(self._slot_event(self._used, ticket.slot.index))
            self._used_on[ticket.slot.index] = stream
        if fetch is not None:
            fetch.released = True

    def clear_caches(self) -> None:
        # The caches hold their stores: drop them so a leaving session's arenas can be reclaimed.
        # `_used` stays: the events order the ring's slots for whichever session uses them next.
        self._image_views.clear()
        self._frames.clear()
        with self.cuda.device(self.device):
            self.heap.reclaim(self._fence, wait=True)

    def close(self) -> None:
        try:
            for stream in (self.copy_stream, self.merge_stream, *self._compute_streams):
                stream.synchronize()         # nothing may still read memory unpinned or freed below
        finally:
            self.heap.close()
            self.staging = None                        # its buffers are unpinned now
            self.free_scratch()
            for state in (self._fetches, self._used, self._used_on, self._uploaded, self._image_views, self._frames,
                          self._compute_streams):
                state.clear()

    def free_scratch(self) -> None:
        """Free the merge scratch and landing buffers (nothing streams any more); `prepare`
        allocates them again."""
        for buf in self._landing:
            self.free_device_buffer(buf)         # record_stream: pending merges finish first
        self._landing, self._landing_free, self._next_landing = [], [None] * LANDING_BUFFERS, 0
        self._image_views.clear()


def _frames_of(store) -> list:
    """(staging offset: its first lane element, frame, the tensors it codes) of every zstd frame."""
    image, k = store.image, store.image.itemsize
    return [(c.start + f.start, f, store.tensors_in((c.start + f.start) * k, (c.start + f.start + f.nbytes) * k))
            for c in image.chunks for f in c.frames]


def _landing_need(image) -> int:
    """Landing bytes the largest chunk of `image` needs (nibble: as stored; zstd: decoded)."""
    k = image.itemsize
    return max((c.nbytes(k) if image.coding == Codec.NIBBLE else k * c.numel for c in image.chunks), default=0)


def _chunk_views(image, c, slot: torch.Tensor, landing: list) -> tuple:
    """Chunk `c`'s copy sources ((its arena bytes, or zstd's low planes), its staging offset)
    and, per landing buffer, (what the copies write, the kernel, its arguments into `slot`)."""
    k, n = image.itemsize, c.numel
    out = slot[c.start * k : (c.start + n) * k]
    if image.coding == Codec.NIBBLE:
        src = image.arena[c.offset : c.offset + c.nbytes(k)]
        return (src, 0), [_nibble_views(land[: c.nbytes(k)], c, out) for land in landing]
    src = image.arena[c.offset : c.offset + (k - 1) * n]            # the low planes, as stored
    return (src, c.start), [_zstd_views(land[: k * n], k, n, out) for land in landing]


def _nibble_views(wire: torch.Tensor, c, out: torch.Tensor) -> tuple:
    at = c.patch_at
    args = (wire[PAIRS_AT : c.codes_at], wire[c.codes_at : c.codes_at + c.codes_nbytes], wire[:PAIRS_AT],
            wire[at : at + 8 * c.patches].view(torch.int64), wire[at + 8 * c.patches : c.nbytes(2)], out.view(torch.int16))
    return (wire,), expand_chunk, args


def _zstd_views(wire: torch.Tensor, k: int, n: int, out: torch.Tensor) -> tuple:
    """The low planes land in [0, (k-1) n), the decoded top plane after them; the merge writes
    plane i to byte i of every element: one kernel (`merge_planes`)."""
    planes = tuple(wire[i * n : (i + 1) * n] for i in range(k))
    return (wire[: (k - 1) * n], wire[(k - 1) * n :]), merge_planes, (planes, out.view(n, k))
