"""`FakeCuda`: a CPU stand-in for the `torch.cuda` names `CudaBackend` uses, which logs every
stream and event operation and checks the memory ordering a real GPU would need.

On the CPU every "asynchronous" copy has finished when it returns, so outputs alone cannot show a
missing event wait. The fake therefore keeps vector clocks (one component per stream, one for the
host) and a log of memory accesses, and reports a race whenever two accesses to overlapping bytes,
at least one a write, are not ordered by happens-before as CUDA defines it:

- work enqueued on a stream follows earlier work on that stream, and whatever the host did before
  enqueuing it;
- `stream.wait_event(e)` orders the stream's later work after the work `e` was recorded behind;
- `e.synchronize()`, a `query()` that returns True, and `stream.synchronize()` order the host's
  later actions after that work.

Each host thread has its own clock component, so a wait that happened on one thread does not
order another thread's writes. `instrument` replaces the Python synchronisation the pipeline and
the backend use (`threading.Event`, `threading.Lock`, the decode pool's `submit`) with versions
that carry clocks too: `set` → `wait`, `release` → `acquire` and `submit` → the job are the only
host-to-host edges. A race is then found whatever the timing of the run that showed it: a missing
wait is reported even when the thread that skipped it happened to run late.

Accesses are logged by the test's wrappers around the backend's data operations (`access`), and
memory that is freed or recycled drops out of the log (`forget`, `recycle`).

Timing events (`enable_timing=True`) are read for figures only: their `query()` orders nothing
here, so a race that reading them would hide is still found. Each record keeps the host time
(`t`); `elapsed_time` answers 1 ms whatever happened, unless a test makes it read those.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from vzstream.backends.pinned import PAGE_NBYTES


def _join(*clocks: dict) -> dict:
    out: dict = {}
    for clock in clocks:
        for k, v in clock.items():
            if v > out.get(k, 0):
                out[k] = v
    return out


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes `t` touches, first to last (a strided view, such as a merge's every other byte,
    spans its whole extent)."""
    start = t.data_ptr()
    last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride())) if t.numel() else -1
    return start, start + (last + 1) * t.element_size()


class FakeEvent:
    def __init__(self, cuda, blocking=False, timing=False):
        self.cuda, self.blocking, self.timing, self.stream, self.clock, self.t = cuda, blocking, timing, None, {}, 0.0

    def record(self, stream):
        with self.cuda._lock:
            stream.clock = _join(stream.clock, self.cuda.clock())
            self.stream, self.clock, self.t = stream, dict(stream.clock), time.perf_counter()
            self.cuda._log("record", stream.name, self)

    def query(self):
        if self.stream is None:
            return False
        if not self.timing:
            self.cuda.observe(self.clock)      # a CPU "copy" is done once it is issued
        return True

    def synchronize(self):
        assert self.stream is not None, "synchronize() on an event never recorded passes at once"
        self.cuda.observe(self.clock)
        self.cuda.log("event.synchronize", None, self)

    def elapsed_time(self, other) -> float:
        assert self.stream is not None and other.stream is not None, "elapsed_time() needs two records"
        return 1.0                                # ms, whatever happened in between


class FakeStream:
    def __init__(self, cuda, name):
        self.cuda, self.name, self.clock = cuda, name, {}

    def wait_event(self, event):
        assert event.stream is not None, "wait_event() on an event never recorded passes at once"
        assert event.stream is not self, "a stream waiting on its own event orders nothing"
        with self.cuda._lock:
            self.clock = _join(self.clock, self.cuda.clock(), event.clock)
            self.cuda._log("wait_event", self.name, event)

    def record_event(self, event=None):
        event = event or FakeEvent(self.cuda)
        event.record(self)
        return event

    def wait_stream(self, other):
        with self.cuda._lock:
            self.clock = _join(self.clock, self.cuda.clock(), other.clock)
            self.cuda._log("wait_stream", self.name, None)

    def synchronize(self):
        with self.cuda._lock:
            self.cuda.observe(self.clock)
            self.cuda._log("stream.synchronize", self.name, None)


class Access:
    __slots__ = ("start", "end", "write", "where", "clock", "what")

    def __init__(self, start, end, write, where, clock, what):
        self.start, self.end, self.write, self.where, self.clock, self.what = start, end, write, where, clock, what

    def before(self, other: Access) -> bool:
        """Happens-before, for `self` logged earlier than `other`."""
        return self.clock[self.where] <= other.clock.get(self.where, 0)

    def __repr__(self):
        return f"{'W' if self.write else 'R'} {self.what} on {self.where}"


class FakeCuda:
    """The torch.cuda names CudaBackend uses. `ops`: (thread id, op, stream name, event).
    `races`: (earlier access, later access) pairs that a GPU could run in either order."""

    STREAM_NAMES = ("copy", "merge")

    def __init__(self):
        self.ops, self.pinned, self._lock, self._local = [], {}, threading.RLock(), threading.local()
        self.accesses, self.races, self._names = [], [], itertools.count(1)
        self.compute = FakeStream(self, "compute")
        self.streams = []
        self.Event = lambda enable_timing=False, blocking=False: FakeEvent(self, blocking, enable_timing)
        self.cudart = lambda: self
        self.get_device_properties = lambda device: SimpleNamespace(total_memory=16 << 30)
        self.device = lambda device: contextlib.nullcontext()   # torch.cuda.device(...)
        self.memory_allocated = self.max_memory_allocated = lambda device=None: 0
        self.reset_peak_memory_stats = lambda device=None: None

    def Stream(self, device=None, priority=0):  # noqa: N802 (torch.cuda.Stream)
        stream = FakeStream(self, self.STREAM_NAMES[len(self.streams)])
        stream.priority = priority
        self.streams.append(stream)
        return stream

    # -- host clocks ----------------------------------------------------------------------------
    def clock(self) -> dict:
        """The calling thread's vector clock."""
        if not hasattr(self._local, "clock"):
            self._local.clock, self._local.name = {}, f"host{next(self._names)}"
        return self._local.clock

    def observe(self, clock: dict) -> None:
        """The calling thread has seen everything `clock` covers (a sync, a wait, a lock)."""
        self._local.clock = _join(self.clock(), clock)

    def _tick(self) -> tuple[str, dict]:
        """A host action of the calling thread: its component and clock."""
        clock = self.clock()
        clock[self._local.name] = clock.get(self._local.name, 0) + 1
        return self._local.name, dict(clock)

    def instrument(self, monkeypatch) -> FakeCuda:
        """Clock the host synchronisation the streaming protocol relies on, and only that: a
        ticket's `ready` and `lock` (pipeline), a fetch's `lock` (the staging gate), and the
        decode pool's `submit` (submitter → job). Bookkeeping locks (the pinned heap's, the
        backend's upload lock) stay plain: as edges they would hide races. Before anything is
        created."""
        import vzstream.backends.pinned
        import vzstream.pipeline

        shim = SimpleNamespace(**{k: getattr(threading, k) for k in dir(threading) if not k.startswith("__")})
        shim.Event, shim.Lock = partial_cls(SyncEvent, self), partial_cls(SyncLock, self)
        monkeypatch.setattr(vzstream.pipeline, "threading", shim)
        fetch_init = vzstream.backends.pinned.Fetch.__init__

        def clocked_fetch(fetch, *args, **kwargs):
            fetch_init(fetch, *args, **kwargs)
            fetch.lock = SyncLock(self)

        monkeypatch.setattr(vzstream.backends.pinned.Fetch, "__init__", clocked_fetch)
        cuda = self

        submit = vzstream.pipeline.Workers.submit

        def clocked_submit(pool, fn, *args):
            clock = dict(cuda.clock())

            def job(*args):
                cuda.observe(clock)
                return fn(*args)

            return submit(pool, job, *args)

        monkeypatch.setattr(vzstream.pipeline.Workers, "submit", clocked_submit)
        return self

    def _log(self, op, stream, event):
        self.ops.append((threading.get_ident(), op, stream, event))

    def log(self, op, stream, event):
        with self._lock:
            self._log(op, stream, event)

    def current_stream(self, device=None):
        return getattr(self._local, "stream", self.compute)

    @contextmanager
    def stream(self, stream):
        prev, self._local.stream = self.current_stream(), stream
        try:
            yield
        finally:
            self._local.stream = prev

    # -- memory ordering ----------------------------------------------------------------------
    def access(self, what: str, reads=(), writes=(), host: bool = False) -> None:
        """One operation on the current stream (or on the host) reading and writing tensors."""
        with self._lock:
            if host:
                where, clock = self._tick()
            else:
                stream = self.current_stream()
                stream.clock = _join(stream.clock, self.clock())
                stream.clock[stream.name] = stream.clock.get(stream.name, 0) + 1
                where, clock = stream.name, dict(stream.clock)
            for tensors, write in ((reads, False), (writes, True)):
                for t in tensors:
                    if t.numel():
                        self._check(Access(*_span(t), write, where, clock, what))

    def _check(self, new: Access) -> None:
        kept = []
        for old in self.accesses:
            overlap = old.start < new.end and new.start < old.end
            ordered = old.before(new)
            if overlap and (old.write or new.write) and not ordered:
                self.races.append((old, new))
            # A later ordered access over all of `old` stands in for it from now on (a read only
            # for reads): whatever is ordered after `new` is after `old`, and whatever races
            # with `old` races with `new` too.
            covered = ordered and new.start <= old.start and old.end <= new.end
            if not (covered and (new.write or not old.write)):
                kept.append(old)
        kept.append(new)
        self.accesses = kept

    def _drop(self, start: int, end: int) -> None:
        """Accesses to [start, end) leave the log (the caller holds the lock)."""
        self.accesses = [a for a in self.accesses if a.end <= start or end <= a.start]

    def forget(self, t: torch.Tensor) -> None:
        """`t`'s memory was freed by an allocator that orders reuse itself (the device caching
        allocator with `record_stream`): its accesses leave the log."""
        with self._lock:
            self._drop(*_span(t))

    def recycle(self, t: torch.Tensor) -> None:
        """`t` comes from torch's pinned caching allocator, which hands a block out again only
        once the events of the copies that read it have passed: the caller is ordered after them."""
        start, end = _span(t)
        with self._lock:
            for a in self.accesses:
                if a.start < end and start < a.end:
                    self.observe(a.clock)
            self._drop(start, end)

    # -- pinning (torch.cuda.cudart()) --------------------------------------------------------
    def cudaHostRegister(self, ptr, nbytes, flags):  # noqa: N802
        assert ptr % PAGE_NBYTES == 0 and nbytes % PAGE_NBYTES == 0 and flags == 0
        with self._lock:
            assert all(ptr + nbytes <= p or p + n <= ptr for p, n in self.pinned.items()), "pages pinned twice"
            self.pinned[ptr] = nbytes
        return 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        with self._lock:
            nbytes = self.pinned.pop(ptr, None)
            if nbytes is None:
                return 712
            # Unpinning (then unmapping) is a host write: every copy that read the pages must be done.
            self._check(Access(ptr, ptr + nbytes, True, *self._tick(), "unpin"))
            self._drop(ptr, ptr + nbytes)
        return 0

    def is_pinned(self, t: torch.Tensor) -> bool:
        start, end = _span(t)
        return any(p <= start and end <= p + n for p, n in self.pinned.items())


def partial_cls(cls, cuda):
    return lambda *args, **kwargs: cls(cuda, *args, **kwargs)


class SyncEvent:
    """`threading.Event` whose `set` happens-before a `wait` or `is_set` that sees it set."""

    def __init__(self, cuda) -> None:
        self._cuda, self._event, self._clock = cuda, threading.Event(), {}

    def set(self) -> None:
        with self._cuda._lock:
            self._clock = _join(self._clock, self._cuda.clock())
        self._event.set()

    def is_set(self) -> bool:
        if self._event.is_set():
            self._cuda.observe(self._clock)
            return True
        return False

    def wait(self, timeout=None) -> bool:
        if self._event.wait(timeout):
            self._cuda.observe(self._clock)
            return True
        return False

    def clear(self) -> None:
        self._event.clear()


class SyncLock:
    """`threading.Lock` whose `release` happens-before the next `acquire`."""

    def __init__(self, cuda) -> None:
        self._cuda, self._lock, self._clock = cuda, threading.Lock(), {}

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking, timeout):
            self._cuda.observe(self._clock)
            return True
        return False

    def release(self) -> None:
        self._clock = _join(self._clock, self._cuda.clock())
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# -- the whole of torch.cuda, for code that is not a backend (benchmarks, GPU tests) ----------------
class TimedEvent:
    """torch.cuda.Event on CPU: 1 ms between any two records, never pending."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 1.0


def fake_gpu(mp) -> list[FakeCuda]:
    """Patch torch (with `mp`, a pytest MonkeyPatch) so code written for one CUDA GPU runs on the
    CPU: `torch.cuda.is_available()` is True, `.cuda()` / `.to("cuda")` leave tensors and modules
    on the CPU, synchronisation is a no-op, allocator statistics read 0, events time 1 ms, and
    `device="cuda"` sessions run the real CudaBackend on a fresh FakeCuda each (returned, in
    order: their op logs; no memory access is logged here, so no race is checked). Numbers
    measured this way mean nothing; errors do. The backend's upload probe answers 25 GB/s."""
    import vzstream.backends.cuda as cuda_mod
    from torch import nn

    fakes, real_backend = [], cuda_mod.CudaBackend

    def fake_backend(device="cuda"):
        fakes.append(FakeCuda())
        backend = real_backend("cpu", cuda=fakes[-1])
        backend.upload_gbps = lambda: 25.0     # the probe pins memory (needs a GPU); outruns a CPU decode
        return backend

    def stays(to):
        def to_cpu(self, *args, **kwargs):
            device = kwargs.get("device", args[0] if args else None)
            if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
                return self
            return to(self, *args, **kwargs)
        return to_cpu

    for name, value in [("is_available", lambda: True), ("synchronize", lambda device=None: None),
                        ("reset_peak_memory_stats", lambda device=None: None),
                        ("max_memory_allocated", lambda device=None: 0), ("memory_allocated", lambda device=None: 0),
                        ("empty_cache", lambda: None), ("get_device_name", lambda device=None: "Fake GPU"),
                        ("set_sync_debug_mode", lambda mode: None), ("Event", TimedEvent)]:
        mp.setattr(torch.cuda, name, value)
    mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    mp.setattr(nn.Module, "cuda", lambda self, *a, **k: self)
    mp.setattr(nn.Module, "to", stays(nn.Module.to))
    mp.setattr(cuda_mod, "CudaBackend", fake_backend)          # what make_backend imports
    return fakes
