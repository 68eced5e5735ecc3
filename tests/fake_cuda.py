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

All host threads share one clock component. That is sound here: the log is kept in real-time
order under a lock, and an event that has completed has completed for every thread. Host-to-host
ordering (Python locks and events) is the pipeline's business, not the GPU's, and is not checked.

Accesses are logged by the test's wrappers around the backend's data operations (`access`), and
memory that is freed or recycled drops out of the log (`forget`, `recycle`).
"""

from __future__ import annotations

import contextlib
import threading
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
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


class FakeEvent:
    def __init__(self, cuda, blocking=False):
        self.cuda, self.blocking, self.stream, self.clock = cuda, blocking, None, {}

    def record(self, stream):
        with self.cuda._lock:
            stream.clock = _join(stream.clock, self.cuda.host)
            self.stream, self.clock = stream, dict(stream.clock)
            self.cuda._log("record", stream.name, self)

    def query(self):
        if self.stream is None:
            return False
        with self.cuda._lock:                  # a CPU "copy" is done once it is issued
            self.cuda.host = _join(self.cuda.host, self.clock)
        return True

    def synchronize(self):
        assert self.stream is not None, "synchronize() on an event never recorded passes at once"
        with self.cuda._lock:
            self.cuda.host = _join(self.cuda.host, self.clock)
            self.cuda._log("event.synchronize", None, self)


class FakeStream:
    def __init__(self, cuda, name):
        self.cuda, self.name, self.clock = cuda, name, {}

    def wait_event(self, event):
        assert event.stream is not None, "wait_event() on an event never recorded passes at once"
        assert event.stream is not self, "a stream waiting on its own event orders nothing"
        with self.cuda._lock:
            self.clock = _join(self.clock, self.cuda.host, event.clock)
            self.cuda._log("wait_event", self.name, event)

    def record_event(self, event=None):
        event = event or FakeEvent(self.cuda)
        event.record(self)
        return event

    def wait_stream(self, other):
        with self.cuda._lock:
            self.clock = _join(self.clock, self.cuda.host, other.clock)
            self.cuda._log("wait_stream", self.name, None)

    def synchronize(self):
        with self.cuda._lock:
            self.cuda.host = _join(self.cuda.host, self.clock)
            self.cuda._log("stream.synchronize", self.name, None)


class Access:
    __slots__ = ("start", "end", "write", "where", "clock", "what")

    def __init__(self, start, end, write, where, clock, what):
        self.start, self.end, self.write, self.where, self.clock, self.what = start, end, write, where, clock, what

    def before(self, other: Access) -> bool:
        """Happens-before, for `self` logged earlier than `other`."""
        if self.where == other.where == "host":
            return True
        return self.clock[self.where] <= other.clock.get(self.where, 0)

    def __repr__(self):
        return f"{'W' if self.write else 'R'} {self.what} on {self.where}"


class FakeCuda:
    """The torch.cuda names CudaBackend uses. `ops`: (thread id, op, stream name, event).
    `races`: (earlier access, later access) pairs that a GPU could run in either order."""

    STREAM_NAMES = ("copy", "merge")

    def __init__(self):
        self.ops, self.pinned, self._lock, self._local = [], {}, threading.RLock(), threading.local()
        self.host, self.accesses, self.races = {}, [], []
        self.compute = FakeStream(self, "compute")
        self.streams = []
        self.Event = lambda enable_timing=False, blocking=False: FakeEvent(self, blocking)
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
                self.host["host"] = self.host.get("host", 0) + 1
                where, clock = "host", dict(self.host)
            else:
                stream = self.current_stream()
                stream.clock = _join(stream.clock, self.host)
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

    def forget(self, t: torch.Tensor) -> None:
        """`t`'s memory was freed by an allocator that orders reuse itself (the device caching
        allocator with `record_stream`): its accesses leave the log."""
        start, end = _span(t)
        with self._lock:
            self.accesses = [a for a in self.accesses if a.end <= start or end <= a.start]

    def recycle(self, t: torch.Tensor) -> None:
        """`t` comes from torch's pinned caching allocator, which hands a block out again only
        once the events of the copies that read it have passed: the host is ordered after them."""
        start, end = _span(t)
        with self._lock:
            for a in self.accesses:
                if a.start < end and start < a.end:
                    self.host = _join(self.host, a.clock)
            self.accesses = [a for a in self.accesses if a.end <= start or end <= a.start]

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
            self.host["host"] = self.host.get("host", 0) + 1
            self._check(Access(ptr, ptr + nbytes, True, "host", dict(self.host), "unpin"))
            self.accesses = [a for a in self.accesses if a.end <= ptr or ptr + nbytes <= a.start]
        return 0

    def is_pinned(self, t: torch.Tensor) -> bool:
        start, end = _span(t)
        return any(p <= start and end <= p + n for p, n in self.pinned.items())
