"""backends/cuda.py on a machine without a GPU: importing it leaves CUDA alone, device="cuda"
fails cleanly, the pure helpers (upload plan, staging layout, plane merge, pinned heap, staging
ring gate) are right, and the whole backend runs a real session on CPU against `FakeCuda`, a
stand-in for `torch.cuda` whose streams and events log and check every operation."""

import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import vzstream
from vzstream import codec, image
from vzstream.backends import CpuBackend
from vzstream.backends import cuda as cuda_mod
from vzstream.backends.cuda import PAGE_NBYTES, CudaBackend, Fetch, PinnedHeap, StagingRing
from vzstream.units import Unit
from vzstream.store import pack_unit
from fake_cuda import FakeCuda, FakeEvent
from models import Stack, TinyLM, build, build_hf, hf_inputs

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


# -- import and availability ------------------------------------------------------------------------
def test_import_does_not_initialise_cuda():
    code = "import torch, vzstream.backends.cuda, vzstream.bench.gpu; assert not torch.cuda.is_initialized()"
    subprocess.run([sys.executable, "-c", code], check=True)


@NO_GPU
def test_session_on_cuda_without_gpu_raises_and_leaves_model_alone(snapshot):
    model = build(Stack)
    snap = snapshot(model)
    with pytest.raises(vzstream.BackendUnavailableError, match="needs a CUDA GPU"):
        with vzstream.session(model, device="cuda"):
            pass
    snap.check(model)
    assert not torch.cuda.is_initialized()


# -- pure helpers -------------------------------------------------------------------------------------
def _packed_unit(tensors: dict, backend=None, coding: str = "zstd"):
    params = [(name, nn.Parameter(t, requires_grad=False)) for name, t in tensors.items()]
    unit = Unit(0, "unit", [], params)
    return pack_unit(unit, backend or CpuBackend(), None, coding=coding), tensors


def _mixed(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "big.bf16": (torch.randn(codec.FRAME_NBYTES | 4097, generator=g) * 0.02).to(torch.bfloat16),  # two frames
        "w.fp16": torch.randn(300, 7, generator=g).to(torch.float16),
        "w.fp32": torch.randn(1000, generator=g),
        "ids.int64": torch.arange(-50, 50, dtype=torch.int64),
        "mask.bool": torch.rand(33, generator=g) > 0.5,
        "empty.bf16": torch.empty(0, 4, dtype=torch.bfloat16),
        "one.fp8": torch.randn(5000, generator=g).to(torch.float8_e4m3fn),
    }


def test_a_zstd_image_lands_in_two_copies_a_chunk_and_one_merge(monkeypatch):
    """zstd on the wire image: the lane (here the 2-byte floats) in chunks, each landing as its
    low plane from the arena and its top plane, decoded frame by frame into staging at its lane
    offset, from there; one merge kernel a chunk; every other tensor in one copy of the raw area.
    However many tensors the unit has."""
    tensors = _mixed()                                  # before: its sizes follow FRAME_NBYTES
    _chunks(monkeypatch, 300000, frame=40000)
    store, tensors = _packed_unit(tensors, coding="zstd")
    img = store.image
    assert img.coding == "zstd" and img.itemsize == 2 and len(img.chunks) > 3 and img.raw_nbytes
    assert all(len(c.frames) == -(-c.numel // 40000) for c in img.chunks)
    copies, merges = [], []
    upload_many, merge_planes = cuda_mod.upload_many, cuda_mod.merge_planes
    monkeypatch.setattr(cuda_mod, "upload_many", lambda pairs: copies.append(len(pairs)) or upload_many(pairs))
    monkeypatch.setattr(cuda_mod, "merge_planes", lambda planes, out: merges.append(len(planes)) or merge_planes(planes, out))
    backend = CudaBackend("cpu", cuda=FakeCuda())
    slot = torch.zeros(store.slot_nbytes, dtype=torch.uint8)
    _fetch_on_fake_cuda(backend, store, slot)
    assert copies == [1] + [2] * len(img.chunks) and merges == [2] * len(img.chunks)
    for (name, expected), got in zip(tensors.items(), store.views(SimpleNamespace(index=0, tensor=slot))):
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name
    assert backend.scratch_nbytes([store.unit], "zstd") == cuda_mod.LANDING_BUFFERS * 300000
    backend.close()


@pytest.mark.parametrize("coding", ["zstd", "nibble"])
def test_a_steady_state_fetch_makes_no_event_but_a_staging_fence(coding, monkeypatch):
    """An Event's destructor hands the GIL over too: the handoff, the landing buffers' events
    and each slot's `uploaded` and `used` are made once and re-recorded; only zstd's `copied`
    (a blocking fence the staging gate waits on) is new per fetch."""
    _chunks(monkeypatch, 300004)                                      # several chunks
    store, _ = _packed_unit(_mixed(), coding=coding)
    backend = CudaBackend("cpu", cuda=FakeCuda())
    slot = torch.empty(store.slot_nbytes, dtype=torch.uint8)
    _fetch_on_fake_cuda(backend, store, slot)                        # the first makes the events
    assert len(store.image.chunks) > 2
    made = []
    init = FakeEvent.__init__
    monkeypatch.setattr(FakeEvent, "__init__", lambda self, *a, **k: made.append(1) or init(self, *a, **k))
    for _ in range(2):
        made.clear()
        _fetch_on_fake_cuda(backend, store, slot)
        assert len(made) == (1 if coding == "zstd" else 0)
    backend.close()


class _Ticket:
    """What the backend reads of a pipeline ticket."""

    def __init__(self, store, index: int, tensor: torch.Tensor) -> None:
        self.store, self.slot, self.ready = store, SimpleNamespace(index=index, tensor=tensor), threading.Event()
        self.inline = False                     # fetched by a worker (the pipeline's default)
        self.timing = None                      # no device timing record (the runtime's, on plan)


def _fetch_on_fake_cuda(backend: CudaBackend, store, slot: torch.Tensor, index: int = 0, bind: bool = True,
                        threads: bool = False) -> None:
    """One fetch of `store` into `slot` through the backend's own five ops; `bind=False`: dropped
    after its upload, never bound (a drained prefetch). Jobs run inline, or with `threads` each
    on a thread of its own (one after the other), with only the pipeline's happens-before edges
    between them: submit → job, every job → the upload on the last job's thread."""
    ticket = _Ticket(store, index, slot)
    jobs = backend.decode_jobs(ticket) or [[]]      # nothing to decode: as the pipeline, one empty job
    if not threads:
        for job in jobs:
            for _, work in job:
                work()
        backend.upload(ticket)
    else:
        _run_on_threads(backend.cuda, jobs, lambda: backend.upload(ticket))
    ticket.ready.set()
    if bind:
        backend.wait(ticket)
    backend.release(ticket)


def _run_on_threads(fake: FakeCuda, jobs: list, upload) -> None:
    submitted, done = dict(fake.clock()), []

    def run(job, last: bool) -> None:
        fake.observe(submitted)
        for _, work in job:
            work()
        done.append(dict(fake.clock()))         # the pipeline's ticket.lock: each job's end
        if last:                                # happens before the last job's upload
            for clock in done:
                fake.observe(clock)
            upload()

    for i, job in enumerate(jobs):
        worker = threading.Thread(target=run, args=(job, i == len(jobs) - 1))
        worker.start()
        worker.join()                           # no edge back: the pipeline never joins a worker


CHUNKS = [pytest.param("zstd", image.CHUNK_NBYTES, None, id="whole"), pytest.param("zstd", 65542, 10001, id="odd"),
          pytest.param("zstd", 16384, 3000, id="16k"), pytest.param("nibble", image.CHUNK_NBYTES, None, id="nibble-whole"),
          pytest.param("nibble", 300004, None, id="nibble-300k")]


def _chunks(monkeypatch, chunk_nbytes: int, frame: int | None = None) -> None:
    """Cut wire images into chunks of `chunk_nbytes` of output, and zstd top planes into frames
    of `frame` elements."""
    monkeypatch.setattr(image, "CHUNK_NBYTES", chunk_nbytes)
    if frame is not None:
        monkeypatch.setattr(codec, "FRAME_NBYTES", frame)


@pytest.mark.parametrize("coding, chunk, frame", CHUNKS)
@pytest.mark.parametrize("seed", [0, 1])
def test_staging_and_merge_reproduce_every_tensor_bit_exactly(seed, coding, chunk, frame, monkeypatch):
    """Every dtype, in wire images of either code, in chunks that wrap the landing buffers many
    times (65542: not a multiple of 4 or 8), zstd frames cut across chunks, and no race."""
    _chunks(monkeypatch, chunk, frame)
    store, tensors = _packed_unit(_mixed(seed), coding=coding)
    assert store.image.coding == coding and store.image.chunks
    fake = FakeCuda()
    backend = logged_backend(CudaBackend("cpu", cuda=fake), fake, monkeypatch)
    slots = [torch.full((store.slot_nbytes,), 0xCD, dtype=torch.uint8) for _ in range(2)]
    for i in range(3):                             # the second use of slot 0 follows its release
        _fetch_on_fake_cuda(backend, store, slots[i % 2], i % 2)
    for slot in slots:
        views = store.views(SimpleNamespace(index=0, tensor=slot))
        for (name, expected), got in zip(tensors.items(), views):
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name
    assert fake.races == []
    backend.close()


def _mutant(name: str, backend: CudaBackend, monkeypatch) -> None:
    """Break one ordering rule of `backend` (each is needed on a GPU; a CPU cannot tell)."""
    if name == "no-used-wait":          # upload overwrites a slot the forward may still read
        decode_jobs = backend.decode_jobs

        def no_used(ticket):
            jobs = decode_jobs(ticket)
            backend._fetches[ticket].used = None
            return jobs

        backend.decode_jobs = no_used
    elif name == "no-landing-wait":     # the copy stream refills a landing buffer an expansion still reads
        copy_image = backend._copy_image

        def unordered(ticket, fetch):
            backend._landing_free = [None] * cuda_mod.LANDING_BUFFERS
            copy_image(ticket, fetch)

        backend._copy_image = unordered
    elif name == "no-staging-gate":     # a worker decodes into staging a copy still reads
        monkeypatch.setattr(StagingRing, "gate", staticmethod(lambda fetch: None))
    elif name == "no-gate-lock":        # a fetch's later jobs pass once the first took the link
        def unlocked(fetch):
            prev, fetch.prev = fetch.prev, None
            if prev is not None:
                prev.ready.wait()
                if prev.copied is not None:
                    prev.copied.synchronize()

        monkeypatch.setattr(StagingRing, "gate", staticmethod(unlocked))
    elif name == "no-bind-wait":        # the forward reads the slot before its upload is done
        backend.wait = lambda ticket: setattr(backend._fetches[ticket], "bound", True)
    elif name == "drop-records-on-compute":   # a drained fetch's `used` misses its merges
        release = backend.release

        def as_if_bound(ticket):
            if ticket in backend._fetches:
                backend._fetches[ticket].bound = True
            release(ticket)

        backend.release = as_if_bound


MUTANTS = ["no-used-wait", "no-landing-wait", "no-staging-gate", "no-gate-lock", "no-bind-wait",
           "drop-records-on-compute"]


RACE_CASES = [pytest.param("zstd", m, id=f"zstd-{m}") for m in [None, *MUTANTS]]
RACE_CASES += [pytest.param("nibble", m, id=f"nibble-{m}") for m in [None, *MUTANTS] if "gate" not in str(m)]   # no staging


@pytest.mark.parametrize("coding, mutant", RACE_CASES)
def test_race_check_passes_the_backend_and_catches_each_missing_order(coding, mutant, monkeypatch):
    """Fetches through two slots: reuse after a bound use, a drained fetch followed by another
    unit whose plain copy overwrites every byte the drained merges wrote, one staging slot, many
    merge chunks, each decode job on its own thread. The backend as written has no race; removing
    any one of these waits or events, or the gate's lock, makes one, whatever the timing. (Not
    covered: the allocator's side, `wait_stream` at allocation and `record_stream` at free.)
    Nibble-coded units stage nothing: their copies, expansions and merges are checked alike."""
    tensors = _mixed()                                  # before: its sizes follow FRAME_NBYTES
    _chunks(monkeypatch, 300004, frame=40000)           # 28 chunks, 4 frames each
    monkeypatch.setattr(cuda_mod, "SMALL_STAGING_NBYTES", 0)
    monkeypatch.setattr(cuda_mod, "chunk_jobs", lambda work: [[(name, fn)] for _, name, fn in work])  # a job per frame
    mixed, _ = _packed_unit(tensors, coding=coding)
    flat = _flat_store_over(mixed)
    fake = FakeCuda().instrument(monkeypatch)
    backend = CudaBackend("cpu", cuda=fake, staging_slots=1)
    if mutant is not None:
        _mutant(mutant, backend, monkeypatch)
    backend = logged_backend(backend, fake, monkeypatch)
    slots = [torch.zeros(max(mixed.slot_nbytes, flat.slot_nbytes), dtype=torch.uint8) for _ in range(2)]
    for store, index, bind in [(mixed, 0, True), (mixed, 1, True), (mixed, 0, True), (mixed, 1, False), (flat, 1, True)]:
        _fetch_on_fake_cuda(backend, store, slots[index], index, bind, threads=True)
    backend.close()
    if mutant is None:
        assert fake.races == []
    else:
        assert fake.races, f"{mutant}: no race reported"


def _flat_store_over(store):
    """A unit of one int8 tensor as large as `store`'s slot: its plain copy overwrites every byte
    that `store`'s merges wrote."""
    flat, _ = _packed_unit({"bytes.int8": torch.randint(-128, 127, (store.slot_nbytes,), dtype=torch.int8)})
    return flat


def test_a_drop_that_never_uploaded_keeps_the_slots_last_writer(monkeypatch):
    """A drained fetch's merges, then a fetch into the same slot dropped before it ever ran
    (an inline prefetch, or a failed decode): the slot's `used` must still follow those merges."""
    tensors = _mixed()
    _chunks(monkeypatch, 300004, frame=40000)
    mixed, _ = _packed_unit(tensors)
    flat = _flat_store_over(mixed)
    fake = FakeCuda()
    backend = logged_backend(CudaBackend("cpu", cuda=fake, staging_slots=1), fake, monkeypatch)
    slot = torch.zeros(max(mixed.slot_nbytes, flat.slot_nbytes), dtype=torch.uint8)
    _fetch_on_fake_cuda(backend, mixed, slot, 1, bind=False)       # uploaded, drained unbound
    never_ran = _Ticket(mixed, 1, slot)
    backend.decode_jobs(never_ran)
    backend.release(never_ran)
    _fetch_on_fake_cuda(backend, flat, slot, 1)
    backend.close()
    assert fake.races == []


def test_a_staging_gate_inherits_the_wait_of_a_fetch_dropped_before_it_ran(monkeypatch):
    """Ring slot: x (uploaded), y (dropped before its jobs ran), z. z must still wait for x's
    copies, which y would have waited for."""
    monkeypatch.setattr(cuda_mod, "SMALL_STAGING_NBYTES", 0)
    mixed, _ = _packed_unit(_mixed())
    fake = FakeCuda()
    backend = logged_backend(CudaBackend("cpu", cuda=fake, staging_slots=1), fake, monkeypatch)
    slots = [torch.zeros(mixed.slot_nbytes, dtype=torch.uint8) for _ in range(3)]
    x, y = _Ticket(mixed, 0, slots[0]), _Ticket(mixed, 1, slots[1])
    x_jobs = backend.decode_jobs(x)
    backend.decode_jobs(y)                                          # y's jobs never run
    for job in x_jobs:
        for _, work in job:
            work()
    backend.upload(x)
    x.ready.set()
    backend.release(y)
    _fetch_on_fake_cuda(backend, mixed, slots[2], 2)
    backend.close()
    assert fake.races == []


def test_every_job_of_a_fetch_waits_at_the_gate_not_only_the_first():
    """The jobs of one fetch run on several workers: while the first waits for the previous
    fetch's copies, the others must wait too (the race check above sees only the interleaving
    that happened to run, so this is checked directly)."""
    ring = StagingRing(1, lambda n: torch.empty(n, dtype=torch.uint8))
    prev, fetch = Fetch(threading.Event()), Fetch(threading.Event())
    for f in (prev, fetch):
        ring.acquire(f, 10)
    passed = []
    workers = [threading.Thread(target=lambda i=i: (StagingRing.gate(fetch), passed.append(i))) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(0.3)
    assert passed == [], "a job passed the gate before the previous fetch of its slot was copied"
    prev.copied = FakeEvent(FakeCuda())
    prev.copied.record(FakeCuda().compute)
    prev.ready.set()
    for w in workers:
        w.join(5)
    assert sorted(passed) == [0, 1, 2] and fetch.prev is None


def test_prepare_allocates_the_landing_buffers_on_the_calling_thread(monkeypatch):
    mixed, _ = _packed_unit(_mixed())
    fake = FakeCuda()
    backend = CudaBackend("cpu", cuda=fake)
    backend.prepare(2, [mixed])
    landing = list(backend._landing)
    assert len(landing) == cuda_mod.LANDING_BUFFERS and backend.device_nbytes == backend.scratch_nbytes([mixed.unit])
    assert fake.streams[1].priority < fake.streams[0].priority == 0    # merges ahead of compute's queue
    _fetch_on_fake_cuda(backend, mixed, torch.zeros(mixed.slot_nbytes, dtype=torch.uint8))
    assert [r.data_ptr() for r in backend._landing] == [r.data_ptr() for r in landing]   # no allocation mid-pass
    backend.close()
    assert backend.device_nbytes == 0


def test_a_shared_pool_frees_the_scratch_when_its_last_member_leaves(snapshot):
    backend = CudaBackend("cpu", cuda=FakeCuda())
    pool = vzstream.DevicePool("cpu", backend=backend)
    model = build(Stack, dtype=torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    snap = snapshot(model)
    with vzstream.session(model, pool=pool, prefetch=1) as s:
        s(x)
        assert backend.scratch_held > 0 and backend.device_nbytes > 0     # codec "auto": landing buffers
    assert backend.scratch_held == 0 and backend.device_nbytes == 0
    with vzstream.session(model, pool=pool, prefetch=1) as s:     # and the pool streams again
        s(x)
        s(x)
    snap.check(model)
    backend.close()


def test_pinned_heap_pins_whole_private_pages_and_reclaims_after_a_fence():
    fake = FakeCuda()
    heap = PinnedHeap(lambda p, n: fake.cudaHostRegister(p, n, 0), fake.cudaHostUnregister)
    bufs = [heap.alloc(n) for n in (1, PAGE_NBYTES - 1, PAGE_NBYTES, 3 * PAGE_NBYTES + 5)]
    assert [b.numel() for b in bufs] == [1, PAGE_NBYTES - 1, PAGE_NBYTES, 3 * PAGE_NBYTES + 5]
    assert all(fake.is_pinned(b) and b.data_ptr() % PAGE_NBYTES == 0 for b in bufs)
    assert heap.nbytes == sum(fake.pinned.values()) == 7 * PAGE_NBYTES
    assert heap.alloc(0).numel() == 0 and len(fake.pinned) == 4
    fences = []

    def fence():
        fences.append(FakeEvent(fake))
        return fences[-1]

    del bufs[0]                                    # dropped: unpinned only once a fence passed
    heap.reclaim(fence)
    assert len(fake.pinned) == 4 and len(fences) == 1
    heap.reclaim(fence)
    assert len(fake.pinned) == 4                   # the fence has not passed yet
    fences[0].record(fake.compute)
    heap.reclaim(fence)
    assert len(fake.pinned) == 3 and heap.nbytes == 6 * PAGE_NBYTES
    heap.close()
    assert not fake.pinned and heap.nbytes == 0


def test_staging_ring_gates_each_slot_on_its_previous_fetch():
    fake = FakeCuda()
    ring = StagingRing(2, lambda n: torch.empty(n, dtype=torch.uint8))
    fetches = [Fetch(threading.Event()) for _ in range(5)]
    for f in fetches:
        ring.acquire(f, 100)
    assert [f.prev for f in fetches] == [None, None, fetches[0], fetches[1], fetches[2]]
    assert fetches[2].buffer is fetches[0].buffer and fetches[3].buffer is fetches[1].buffer
    bigger = Fetch(threading.Event())
    ring.acquire(bigger, 300)                      # slot 1 grows; its previous fetch keeps the old one
    assert bigger.buffer.numel() == 300 and fetches[3].buffer.numel() == 100
    StagingRing.gate(fetches[0])                   # first use of its slot: no wait
    passed = threading.Event()
    worker = threading.Thread(target=lambda: (StagingRing.gate(fetches[2]), passed.set()))
    worker.start()
    assert not passed.wait(0.2), "gated before the previous fetch of its slot issued its upload"
    fetches[0].copied = FakeEvent(fake)
    fetches[0].copied.record(fake.compute)         # what upload does, then the pipeline sets ready
    fetches[0].ready.set()
    worker.join(5)
    assert passed.is_set() and fetches[2].prev is None
    assert [op for _, op, _, ev in fake.ops if ev is fetches[0].copied] == ["record", "event.synchronize"]


def test_staging_ring_gate_passes_a_previous_fetch_that_failed_or_was_dropped():
    ring = StagingRing(1, lambda n: torch.empty(n, dtype=torch.uint8))
    failed, dropped, after_failed, after_dropped = (Fetch(threading.Event()) for _ in range(4))
    for f in (failed, after_failed):
        ring.acquire(f, 10)
    failed.ready.set()                             # ready without an upload: copied stays None
    StagingRing.gate(after_failed)
    after_failed.copied = FakeEvent(FakeCuda())    # it uploaded; its copy is recorded
    after_failed.copied.record(FakeCuda().compute)
    after_failed.ready.set()
    ring.acquire(dropped, 10)
    ring.acquire(after_dropped, 10)
    dropped.released = True                        # settled by the pipeline before it ever ran
    StagingRing.gate(after_dropped)                # waits what `dropped` would have: after_failed
    assert after_dropped.prev is None and dropped.prev is None


# -- the whole backend in a real session, on CPU ------------------------------------------------------
@pytest.fixture(params=["ring", "small"])
def staging(request, monkeypatch):
    """"ring": every fetch stages through the pinned ring (as units with > 1 MiB of compressed
    planes do); "small": through fresh blocks of torch's pinned caching allocator."""
    if request.param == "ring":
        monkeypatch.setattr(cuda_mod, "SMALL_STAGING_NBYTES", 0)
    return request.param


def logged_backend(backend: CudaBackend, fake: FakeCuda, monkeypatch, pinned: bool = False) -> CudaBackend:
    """Log every memory access of `backend`'s data operations with `fake`, which reports races
    (see fake_cuda.py). `pinned`: assert that every host→device copy reads pinned memory."""
    upload_many, merge_planes, stage_into = cuda_mod.upload_many, cuda_mod.merge_planes, cuda_mod.stage_into
    expand_chunk = cuda_mod.expand_chunk

    def logged_upload(pairs):
        for dst, src in pairs:
            assert not pinned or fake.is_pinned(src), "a copy reads pageable memory"
            fake.access("copy", reads=[src], writes=[dst])
        upload_many(pairs)

    def logged_merge(planes, out):
        fake.access("merge", reads=list(planes), writes=[out])
        merge_planes(planes, out)

    def logged_expand(lo, codes, pairs, at, values, out):
        fake.access("expand", reads=[lo, codes, pairs, at, values], writes=[out])
        expand_chunk(lo, codes, pairs, at, values, out)

    def logged_stage(buffer, offset, nbytes, source, fqn=""):
        stage_into(buffer, offset, nbytes, source, fqn)
        fake.access("decode", writes=[torch.from_numpy(buffer[offset : offset + nbytes])], host=True)   # after: done

    monkeypatch.setattr(cuda_mod, "upload_many", logged_upload)
    monkeypatch.setattr(cuda_mod, "merge_planes", logged_merge)
    monkeypatch.setattr(cuda_mod, "expand_chunk", logged_expand)
    monkeypatch.setattr(cuda_mod, "stage_into", logged_stage)
    wait, device_buffer, free_device_buffer = backend.wait, backend.device_buffer, backend.free_device_buffer
    pinned_block = backend._pinned_block

    def logged_wait(ticket):                  # then the forward reads the unit's bytes in the slot
        wait(ticket)
        fake.access("forward", reads=[ticket.slot.tensor[: ticket.store.slot_nbytes]])

    def logged_device_buffer(nbytes):         # the caching allocators order reuse themselves
        buf = device_buffer(nbytes)
        fake.forget(buf)
        return buf

    def logged_free(buf):
        fake.forget(buf)
        free_device_buffer(buf)

    def logged_pinned_block(nbytes):
        buf = pinned_block(nbytes)
        fake.recycle(buf)
        return buf

    backend.wait, backend.device_buffer, backend.free_device_buffer = logged_wait, logged_device_buffer, logged_free
    backend._pinned_block = logged_pinned_block
    return backend


def checked_backend(fake: FakeCuda, staging: str, monkeypatch, **kwargs) -> CudaBackend:
    """A CudaBackend on `fake` whose ops check the event discipline as they run (see below),
    with every memory access logged for the race check."""
    backend = logged_backend(CudaBackend("cpu", cuda=fake, **kwargs), fake, monkeypatch, pinned=staging == "ring")
    latest, expected = {}, {}                 # slot -> `used` of its latest release; ticket -> it
    backend.upload_threads = []               # the thread that issued each upload
    decode_jobs, upload, wait, release = backend.decode_jobs, backend.upload, backend.wait, backend.release

    def mine(start):                          # timing events (backends/timer.py) order nothing
        return [op[1:] for op in fake.ops[start:] if op[0] == threading.get_ident() and not getattr(op[3], "timing", 0)]

    def checked_decode_jobs(ticket):
        expected[ticket] = latest.get(ticket.slot.index)
        return decode_jobs(ticket)

    def checked_upload(ticket):               # waits the slot's latest `used`, ends on the merge stream
        backend.upload_threads.append(threading.get_ident())
        start = len(fake.ops)
        upload(ticket)
        ops, want = mine(start), expected.pop(ticket)
        if backend._fetches[ticket].on_compute:      # a small raw image inline: in compute-stream order
            assert ops in ([], [("wait_event", "compute", want)])
            return
        assert want is None or ops[0] == ("wait_event", "copy", want)
        assert ops[-2][:2] == ("wait_event", "merge") and ops[-1][:2] == ("record", "merge")

    def checked_wait(ticket):                 # the compute stream waits; nothing else happens
        start = len(fake.ops)
        on_compute = backend._fetches[ticket].on_compute
        wait(ticket)
        assert [op[:2] for op in mine(start)] == ([] if on_compute else [("wait_event", "compute")])

    def checked_release(ticket):
        fetch, before = backend._fetches.get(ticket), backend._used.get(ticket.slot.index)
        start = len(fake.ops)
        release(ticket)
        ops, used = mine(start), backend._used.get(ticket.slot.index)
        if fetch is None or fetch.bound:      # records `used` on the compute stream, nothing else
            assert ops == [("record", "compute", used)]
        elif fetch.uploaded is not None:      # dropped unbound: after its last write
            assert ops == [("record", "merge", used)]
        else:                                 # never uploaded: the slot's last writer stands
            assert ops == [] and used is before
        latest[ticket.slot.index] = used

    backend.decode_jobs, backend.upload, backend.wait, backend.release = (
        checked_decode_jobs, checked_upload, checked_wait, checked_release)
    return backend


@pytest.mark.parametrize("name, units, prefetch, raw_fraction, codec", [
    ("llama", "blocks", 1, 0.0, "zstd"), ("llama", "leaves", 2, 0.0, "zstd"), ("gpt2", "blocks", 4, 0.0, "zstd"),
    ("gpt2", "leaves", 1, 0.0, "zstd"),
    ("llama", "blocks", 2, 0.5, "zstd"),      # every other block raw: uploaded from the arena, no staging
    ("llama", "blocks", 2, "auto", "zstd"),   # a bus far faster than decode: all raw but the measured block
    ("llama", "blocks", 2, 0.0, "nibble"),    # the device expands codes: nothing staged
    ("gpt2", "blocks", 4, 0.0, "nibble")])
def test_hf_session_on_fake_cuda_is_bit_exact_and_never_syncs_the_forward_thread(
        name, units, prefetch, raw_fraction, codec, staging, hf_reference, snapshot, monkeypatch):
    monkeypatch.setattr(vzstream.pipeline.Pipeline, "inline_nbytes", 0)   # every unit on workers
    monkeypatch.setattr(CudaBackend, "upload_gbps", lambda self: 1e6)     # its probe needs real pinning
    ref_logits, ref_tokens = hf_reference(name)
    model = build_hf(name)
    ids, gen_kwargs = hf_inputs()
    snap, fake = snapshot(model), FakeCuda().instrument(monkeypatch)
    backend = checked_backend(fake, staging, monkeypatch, staging_slots=2)
    with vzstream.session(model, backend=backend, prefetch=prefetch, units=units, workers=3,
                          raw_fraction=raw_fraction, codec=codec) as s:
        first = s.generate(ids, **gen_kwargs)
        start = len(fake.ops)
        second = s.generate(ids, **gen_kwargs)       # the learned schedule: the steady state
        syncs = [op for op in fake.ops[start:] if op[0] == threading.get_ident() and "synchronize" in op[1]]
        logits = s(ids).logits
        kept_raw = s.stats().raw_fraction
    assert torch.equal(first, ref_tokens) and torch.equal(second, ref_tokens)
    if raw_fraction == "auto":
        assert 0 < kept_raw < 1
    else:                       # 2 blocks: 0.5 is one of them; units under 4 KiB (norms) stay raw too
        assert raw_fraction <= kept_raw < raw_fraction + 0.01
    assert torch.equal(logits, ref_logits)
    assert syncs == [] and fake.races == []
    # Nothing to decode with nibble codes, and yet workers issue every upload (none is inline here).
    forward = threading.get_ident()
    assert forward not in backend.upload_threads
    if staging == "ring" and codec == "zstd":        # workers gated on the ring: the log shows it
        assert any(op[1] == "event.synchronize" for op in fake.ops)
    assert not fake.pinned, "pinned host memory left registered after exit"
    assert backend.device_nbytes == 0 and backend.heap.nbytes == 0
    backend.close()                                  # a second close is harmless
    assert backend.total_memory() == 16 << 30
    snap.check(model)


def test_upload_probe_times_the_copy_stream_once_and_unpins_its_buffer(monkeypatch):
    """`upload_gbps` (raw_fraction="auto"): the copy stream first waits for the compute stream
    (the device buffer may come from its pool), records around each copy, waits for the end on
    the host; measured once per device; its pinned source is unpinned, not left cached."""
    fake = FakeCuda()
    backend = CudaBackend("cpu", cuda=fake)
    copies = []
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False: copies.append(
        (fake.current_stream().name, non_blocking, fake.is_pinned(src))) or self)
    rate = backend.upload_gbps()
    assert rate == pytest.approx(cuda_mod.UPLOAD_PROBE_NBYTES / 1e-3 / 1e9)     # fake events: 1 ms apart
    ops = [(op, stream) for _, op, stream, _ in fake.ops]
    assert ops == [("wait_stream", "copy")] + [("record", "copy"), ("record", "copy"), ("event.synchronize", None)] * 4
    assert copies == [("copy", True, True)] * 4
    assert backend.upload_gbps() == rate and len(fake.ops) == len(ops)          # once per device
    backend.host_buffer(0)                                                     # the next allocation reclaims
    backend.clear_caches()
    assert backend.heap.nbytes == 0 and not fake.pinned
    backend.close()


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "workers"])
def test_toy_lm_on_fake_cuda_with_one_staging_slot(inline, staging, monkeypatch, snapshot):
    """The tightest ring (one slot) with prefetch 4, decoded on the forward thread or on workers:
    no deadlock, exact outputs over repeated calls."""
    monkeypatch.setattr(vzstream.pipeline.Pipeline, "inline_nbytes", 1 << 62 if inline else 0)
    model = build(TinyLM, dtype=torch.bfloat16, tied=True)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    snap, fake = snapshot(model), FakeCuda().instrument(monkeypatch)
    backend = checked_backend(fake, staging, monkeypatch, staging_slots=1)
    with vzstream.session(model, backend=backend, prefetch=4, units="leaves", workers=3) as s:
        for _ in range(3):
            assert torch.equal(s(ids), ref)
    assert not fake.pinned and fake.races == []
    snap.check(model)


@pytest.mark.parametrize("codec_name", ["zstd", "nibble"])
def test_leaving_unpins_each_units_arena_once_its_parameters_are_back(codec_name, monkeypatch, snapshot):
    """Host RAM while leaving a CUDA session: each unit's pinned arena is unpinned and freed as
    soon as its parameters are decoded back, after every copy that read it (race-checked)."""
    from vzstream.session import Session
    from vzstream.install import Original

    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    snap, fake = snapshot(model), FakeCuda().instrument(monkeypatch)
    monkeypatch.setattr(cuda_mod, "SMALL_STAGING_NBYTES", 0)            # stage through the pinned ring
    # Logged for the race check (checked_backend's own bookkeeping would keep tickets, and so
    # stores, alive).
    backend = logged_backend(CudaBackend("cpu", cuda=fake), fake, monkeypatch, pinned=True)
    monkeypatch.setattr(Session, "_host_threads", lambda self: 1)     # restore in order
    pinned_at, restored, restore = {}, [], Original.restore

    def recording_restore(orig):
        pinned_at.setdefault(orig.unit_fqn, backend.heap.nbytes)
        restored.append(orig)
        restore(orig)

    monkeypatch.setattr(Original, "restore", recording_restore)
    with vzstream.session(model, backend=backend, prefetch=2, codec=codec_name) as s:
        for _ in range(2):
            assert torch.equal(s(ids), ref)
        arenas = [store.arena.numel() for store in s.stores.values()]
    readings = list(pinned_at.values())
    assert len(readings) == len(model.blocks) == len(arenas)
    # Before unit k is restored, the arenas of units 0..k-1 are unpinned (whole pages each).
    drops = [a - b for a, b in zip(readings, readings[1:])]
    assert all(drop >= arena for drop, arena in zip(drops, arenas))
    assert restored and all(orig.packed is None for orig in restored)   # no view keeps an arena alive
    assert not fake.pinned and fake.races == []
    snap.check(model)


@pytest.mark.parametrize("coding", ["zstd", "nibble"])
def test_profiler_sees_every_stage(coding, monkeypatch):
    """decode and upload run on worker threads: the profiler records them with profile_all_threads
    (a wire image has nothing to decode on the host)."""
    try:
        all_threads = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except TypeError:
        pytest.skip("this torch's profiler cannot record other threads")
    monkeypatch.setattr(vzstream.pipeline.Pipeline, "inline_nbytes", 0)
    model = build(Stack, dtype=torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with vzstream.session(model, backend=CudaBackend("cpu", cuda=FakeCuda()), prefetch=1, codec=coding) as s:
        s(x)
        cpu = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=cpu, experimental_config=all_threads) as prof:
            s(x)
    names = {e.name for e in prof.events()}
    for stage in ("decode", "upload", "bind", "release")[coding == "nibble":]:
        assert f"vzstream.{stage}:blocks.1" in names, stage


@pytest.mark.parametrize("chunk", [image.CHUNK_NBYTES, 300004, 131072])
def test_wire_image_chunks_tile_the_coded_region_and_fit_the_planned_landing(chunk, monkeypatch):
    """A wire image: the 2-byte floats first in the slot, chunks back to back over them (even
    sizes: a code byte is never shared), patches inside their chunk, every chunk within the
    landing buffers the planner reserved before packing (`scratch_nbytes(..., "nibble")`), even
    where patches crowd one; fp32 and the rest ride along raw. One upload reproduces every tensor."""
    _chunks(monkeypatch, chunk)
    tensors = _mixed()
    crowded = (torch.randn(40000, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    wild = torch.exp(torch.linspace(-80, 80, 2000))      # top bytes over a wide range: patches
    crowded[:2000] = wild[torch.randperm(2000, generator=torch.Generator().manual_seed(6))].to(torch.bfloat16)
    tensors["crowded.bf16"] = crowded
    store, _ = _packed_unit(tensors, coding="nibble")
    img = store.image
    assert sum(c.patches for c in img.chunks) >= 1500
    two_byte = [t for t in store.packed if t.dtype.itemsize == 2 and t.dtype.is_floating_point]
    assert all(t.slot_offset < img.coded_nbytes for t in two_byte)
    assert all(t.slot_offset >= img.coded_nbytes for t in store.packed if t not in two_byte)
    assert [c.start for c in img.chunks] == [sum(c.numel for c in img.chunks[:i]) for i in range(len(img.chunks))]
    assert sum(c.numel for c in img.chunks) * 2 == img.coded_nbytes and all(c.numel % 2 == 0 for c in img.chunks)
    for c in img.chunks:
        _, _, _, at, _ = img.nibble_views(c)
        assert c.offset % 64 == 0 and (at.size == 0 or (0 <= at.min() and at.max() < c.numel))
    backend = CudaBackend("cpu", cuda=FakeCuda())
    backend.prepare(2, [store])
    assert 0 < backend.device_nbytes <= backend.scratch_nbytes([store.unit], "nibble")
    slot = torch.zeros(store.slot_nbytes, dtype=torch.uint8)
    _fetch_on_fake_cuda(backend, store, slot)
    for (name, expected), got in zip(tensors.items(), store.views(SimpleNamespace(index=0, tensor=slot))):
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name
    backend.close()


def test_ctrl_c_inside_a_nibble_upload_leaves_no_race(staging, hf_reference, monkeypatch):
    """A KeyboardInterrupt inside a wire image's upload, after a chunk's expansion was enqueued
    (a tiny unit's upload runs on the forward thread): it is raised in that call, and the next
    calls are exact and race-free."""
    monkeypatch.setattr(vzstream.pipeline.Pipeline, "inline_nbytes", 0)
    ref_logits, ref_tokens = hf_reference("llama")
    ids, gen_kwargs = hf_inputs()
    fake = FakeCuda().instrument(monkeypatch)
    backend = checked_backend(fake, staging, monkeypatch, staging_slots=2)
    expand = cuda_mod.expand_chunk                          # the logged one
    state = {"expanded": 0, "fire": None}

    def interrupted_expand(*args):
        expand(*args)
        state["expanded"] += 1
        if state["expanded"] == state["fire"]:
            raise KeyboardInterrupt                 # expansion enqueued, its `free` not yet

    monkeypatch.setattr(cuda_mod, "expand_chunk", interrupted_expand)
    with vzstream.session(build_hf("llama"), backend=backend, prefetch=2, workers=2, codec="nibble") as s:
        assert torch.equal(s.generate(ids, **gen_kwargs), ref_tokens)
        state["fire"] = state["expanded"] + 3
        outcomes = []
        for _ in range(3):
            try:
                outcomes.append(torch.equal(s.generate(ids, **gen_kwargs), ref_tokens))
            except KeyboardInterrupt:
                outcomes.append("interrupted")
    assert outcomes == ["interrupted", True, True] and fake.races == []


def test_an_upload_interrupted_after_an_expansion_still_frees_its_landing_after_it(monkeypatch):
    """Ctrl-C inside a wire image's upload, right after a chunk's expansion was enqueued: the
    landing buffer's `free` must still follow that expansion, or the next fetch's chunk into it
    (a fresh slot: no `used` to wait for) would overwrite it while the expansion still reads it."""
    _chunks(monkeypatch, 300004)                            # several chunks per unit
    store, tensors = _packed_unit(_mixed(), coding="nibble")
    fake = FakeCuda()
    backend = logged_backend(CudaBackend("cpu", cuda=fake), fake, monkeypatch)
    expand = cuda_mod.expand_chunk                          # the logged one
    state = {"expanded": 0, "armed": True}

    def interrupted_expand(*args):
        expand(*args)
        state["expanded"] += 1
        if state["armed"] and state["expanded"] == 2:
            state["armed"] = False
            raise KeyboardInterrupt

    monkeypatch.setattr(cuda_mod, "expand_chunk", interrupted_expand)
    slots = [torch.zeros(store.slot_nbytes, dtype=torch.uint8) for _ in range(2)]
    assert len(store.image.chunks) > 3
    with pytest.raises(KeyboardInterrupt):
        _fetch_on_fake_cuda(backend, store, slots[0], 0)
    _fetch_on_fake_cuda(backend, store, slots[1], 1)
    views = store.views(SimpleNamespace(index=1, tensor=slots[1]))
    for (name, expected), got in zip(tensors.items(), views):
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name
    assert fake.races == []
    backend.close()
