"""The runtime's machinery: decode workers and in-flight tickets (`runtime.py` walks the
schedule with them, over the ring of `ring.py`).

Invariants:
- A slot is owned by exactly one of: the free list, one in-flight ticket, one held unit.
- Workers only run decode jobs and the upload that follows the last job of a ticket.
- A ticket is ready once its upload was issued (or it failed); `wait` re-raises its error on
  the caller, naming the unit.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
import weakref

from . import ranges
from .errors import FormatError, VzstreamError
from .timing import Timing, stall_spans

log = logging.getLogger("vzstream")


class Ticket:
    """One fetch of one unit into one slot, from decode request to release."""

    __slots__ = ("store", "slot", "ready", "error", "pending", "lock", "decode_s", "position", "deferred", "inline",
                 "timing", "bound_at", "decoded_at", "uploaded_at")

    def __init__(self, store, slot, timing=None) -> None:
        self.store, self.slot = store, slot
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.pending = 0
        self.lock = threading.Lock()
        self.decode_s = 0.0
        self.position = -1          # trace position of the latest bind (for the release rule)
        self.deferred = None        # jobs of a small unit, run on the forward thread at wait
        self.inline = False         # decoded on the forward thread: no worker ever writes its slot
        self.timing = timing        # its device timing record (CUDA, on plan), else None: timed on the host
        self.bound_at = 0.0         # when its bind ended (host clock)
        self.decoded_at = 0.0       # when its last decode job ended (0: nothing to decode)
        self.uploaded_at = 0.0      # when its upload was issued (host clock)


class Workers:
    """Threads running `submit`ted calls in FIFO order. A put and a get on a `SimpleQueue` are C
    calls; `ThreadPoolExecutor` spends ~10 us of Python per job (a Future, its condition, a work
    item), all of it holding the GIL that the forward thread and the uploader wait for.

    Like the executor's, the threads are joined before the interpreter shuts down (a session
    left open at exit): a daemon thread still inside a torch call then would abort the process."""

    around = None       # None, or a context manager factory every job runs inside (tests count
                        # the torch calls of the workers with it)

    def __init__(self, num_threads: int, name: str) -> None:
        if num_threads < 1:
            raise ValueError(f"`num_threads` must be >= 1; got {num_threads}")
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._num_threads, self._name = num_threads, name
        self._threads: list | None = []     # started by the first submit; None once shut down
        self._stopping: list = []           # told to end, not yet joined

    @property
    def num_threads(self) -> int:
        return self._num_threads

    def submit(self, fn, *args) -> None:
        """Queue `fn(*args)`. Called from one thread at a time (the pool's lock holder)."""
        if self._threads is None:       # a job queued now would never run: its ticket would hang
            raise RuntimeError("vzstream: decode workers were shut down")
        if not self._threads:           # a session that streams nothing starts no thread
            self._threads = [threading.Thread(target=self._loop, name=f"{self._name}_{i}",
                                              daemon=_register_atexit is None)
                             for i in range(self._num_threads)]
            _live_workers.add(self)
            for t in self._threads:
                t.start()
        self._queue.put((fn, args))

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args = item
            try:
                if self.around is None:
                    fn(*args)
                else:
                    with self.around():
                        fn(*args)
            except BaseException:       # a job reports its own errors; never lose the thread
                log.exception("vzstream: a decode worker's job raised")
            # An idle worker must not keep its last job alive: the ticket holds a slot and, on
            # CUDA, pinned staging, which would then outlive a ring rebuild.
            item = fn = args = None

    def shutdown(self) -> None:
        """Run what was submitted, then join every thread. Interrupted (a Ctrl-C while joining),
        calling it again joins what is left."""
        if self._threads is not None:   # the first call: no new job, each thread told to end
            self._stopping, self._threads = self._threads, None
            for _ in self._stopping:
                self._queue.put(None)
        while self._stopping:
            self._stopping[-1].join()
            self._stopping.pop()
        _live_workers.discard(self)


_live_workers: "weakref.WeakSet[Workers]" = weakref.WeakSet()


def _shutdown_live_workers() -> None:
    for workers in list(_live_workers):
        workers.shutdown()


# What concurrent.futures uses: runs before the interpreter joins non-daemon threads. Where it
# is missing, the threads are daemons instead (an exit must not wait on idle workers forever).
_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_shutdown_live_workers)


class Pipeline:
    """Decode workers. `submit` returns at once; `wait` blocks the caller until ready.

    Units smaller than `inline_nbytes` are decoded on the forward thread at `wait`: handing a
    ~10 us decode to a worker costs more (submit, wake-up, GIL hand-over) than it saves.

    A fetch with nothing to decode (a wire image on CUDA) is uploaded by a worker too: its
    upload is a few calls per 32 MiB chunk, so the forward thread's work per unit stays one
    event wait, the binding and one event record, however large the unit (issue 14; the
    forward thread issued them itself when an upload cost dozens of calls per unit).
    """

    inline_nbytes = 64 << 10

    def __init__(self, backend, workers: int, counters, verify: bool = False) -> None:
        self.backend, self.counters, self.verify = backend, counters, verify
        self.workers = Workers(workers, "vzstream-decode")
        self.timing = Timing()          # spans of decode, upload and stall; the runtime adds compute

    def resize(self, workers: int) -> None:
        """`workers` decode threads from now on (`workers="auto"`); nothing may be in flight."""
        self.workers.shutdown()
        self.workers = Workers(workers, "vzstream-decode")

    def submit(self, store, slot, timing=None) -> Ticket:
        """Queue the fetch of `store` into `slot`; `timing`: its device timing record, if any."""
        ticket = Ticket(store, slot, timing)
        jobs = self.backend.decode_jobs(ticket)
        if self.verify:                 # `verify="stream"`: its jobs end before the upload is issued
            jobs = jobs + store.verify_jobs()
        self.counters.decodes += 1
        if store.raw_nbytes < self.inline_nbytes:
            ticket.deferred, ticket.inline = jobs, True
        elif not jobs:
            jobs = [[]]                 # an empty job: the worker that runs it uploads
        ticket.pending = len(jobs)
        for job in () if ticket.deferred is not None else jobs:
            self.workers.submit(self._run, ticket, job)
        return ticket

    def _run(self, ticket: Ticket, job) -> None:
        t0 = time.perf_counter()
        try:
            if ticket.error is None and job:
                if ranges.on():
                    with ranges.stage_range("decode", ticket.store.unit.fqn):
                        _run_job(job)
                else:
                    _run_job(job)
        except BaseException as exc:  # surfaced on the forward thread at bind
            ticket.error = ticket.error or exc
        t1 = time.perf_counter()
        if job:                         # an empty job only uploads
            self.timing.span("decode", threading.current_thread().name, ticket.store.unit.fqn, t0, t1)
        with ticket.lock:
            ticket.decode_s += t1 - t0
            ticket.pending -= 1
            last = ticket.pending == 0
        if last:
            if job:                     # the last job to end ends the decode
                ticket.decoded_at = t1
            self._finish(ticket)

    def _run_inline(self, ticket: Ticket) -> None:
        """A small unit's jobs, then its upload, here on the forward thread: no other thread
        touches the ticket, so no lock; the same errors as from workers. Compute waits for all
        of it: a stall (`inline`), unless the device times this fetch (CUDA)."""
        jobs, ticket.deferred = ticket.deferred, None
        fqn = ticket.store.unit.fqn
        t0 = time.perf_counter()
        try:
            if ranges.on():
                with ranges.stage_range("decode", fqn):
                    for job in jobs:
                        _run_job(job)
            else:
                for job in jobs:
                    _run_job(job)
        except BaseException as exc:
            ticket.error = exc
        t1 = time.perf_counter()
        ticket.decode_s, ticket.pending = t1 - t0, 0
        if jobs:
            ticket.decoded_at = t1
            self.timing.span("decode", "forward", fqn, t0, t1)
        self._finish(ticket)
        if ticket.timing is None:
            self.timing.span("stall", "inline", fqn, t0, time.perf_counter())

    def _finish(self, ticket: Ticket) -> None:
        if ticket.timing is not None:   # the device's stall splits at the host's decode end
            ticket.timing.decoded_at = ticket.decoded_at
        try:
            if ticket.error is None:
                try:
                    self._upload(ticket)
                except BaseException as exc:
                    ticket.error = exc
        finally:                        # even if interrupted: nothing may wait forever on it
            self.counters.add_decode_s(ticket.decode_s)
            ticket.ready.set()

    def _upload(self, ticket: Ticket) -> None:
        """The backend's upload, timed on the host unless the device times it (CUDA, where the
        host only issues it) or it does nothing (the CPU backend's)."""
        fqn, timed = ticket.store.unit.fqn, ticket.timing is None and self.backend.times_uploads
        t0 = time.perf_counter() if timed else ticket.decoded_at
        if ranges.on():
            with ranges.stage_range("upload", fqn):
                self.backend.upload(ticket)
        else:
            self.backend.upload(ticket)
        ticket.uploaded_at = time.perf_counter() if timed else t0
        if timed:
            self.timing.span("upload", "upload", fqn, t0, ticket.uploaded_at)

    def wait(self, ticket: Ticket) -> None:
        """Block until `ticket` is decoded and its upload issued; re-raise a worker's error."""
        if ticket.deferred is not None:
            self._run_inline(ticket)
        if not ticket.ready.is_set():
            self._block(ticket)
        if ticket.error is not None:
            fqn, exc = ticket.store.unit.fqn, ticket.error
            if not isinstance(exc, Exception):  # KeyboardInterrupt during an inline decode
                raise exc
            if isinstance(exc, FormatError):
                raise FormatError(f"unit `{fqn}`: {exc}") from exc
            raise VzstreamError(f"decoding unit `{fqn}` failed: {exc!r}") from exc

    def _block(self, ticket: Ticket) -> None:
        """Wait for a unit not yet ready: the `wait` range covers exactly this. While its upload
        ran the stall is upload's, else decode's (`timing.stall_spans`). (CUDA, on plan: the
        device's clock says how long compute waited, `DeviceTimer`.)"""
        t0 = time.perf_counter()
        if ranges.on():
            with ranges.stage_range("wait", ticket.store.unit.fqn):
                ticket.ready.wait()
        else:
            ticket.ready.wait()
        if ticket.timing is None:
            t1 = time.perf_counter()
            for span in stall_spans(ticket.store.unit.fqn, t0, t1, ticket.decoded_at, ticket.uploaded_at):
                self.timing.span(*span)

    def settle(self, ticket: Ticket) -> None:
        """Let an unwanted ticket finish (workers may be writing its slot) or never start."""
        ticket.deferred = None
        if not ticket.inline:
            ticket.ready.wait()

    def close(self) -> None:
        self.workers.shutdown()


_switch = {"lock": threading.Lock(), "users": 0, "saved": None, "set": None}


@contextlib.contextmanager
def gil_switch_interval(seconds: float | None):
    """While any streaming call runs, CPython's GIL switch interval is at most `seconds`.

    A decode worker needs the GIL for a moment after each frame. While the forward thread runs
    model Python, it keeps the GIL until the switch interval (5 ms by default) forces a hand-over,
    so each frame waits up to 5 ms: on an H100's 16-core host, 8 workers beside a busy Python
    thread decoded 2.1 GB/s instead of 15 (docs/benchmarks.md). When the last call that lowered it
    ends, the previous interval comes back, unless something else set its own meanwhile. None
    leaves the interval alone.
    """
    if seconds is None:
        yield
        return
    with _switch["lock"]:
        current = sys.getswitchinterval()
        # CPython keeps whole microseconds: never ask for less than one (0 raises ValueError).
        wanted = max(1e-6, min(seconds, current))
        sys.setswitchinterval(wanted)
        if _switch["users"] == 0:
            _switch["saved"] = current
        _switch["users"] += 1
        _switch["set"] = sys.getswitchinterval()
    try:
        yield
    finally:
        with _switch["lock"]:
            _switch["users"] -= 1
            if _switch["users"] == 0 and sys.getswitchinterval() == _switch["set"]:
                # A sub-microsecond setting reads back as 0.0, which cannot be set; any value
                # under 1 us gives back that same state.
                sys.setswitchinterval(_switch["saved"] or 1e-7)


def _run_job(job) -> None:
    for name, work in job:
        _run_named(name, work)


def _run_named(what: str, work) -> None:
    """`work()`; a FormatError says `what` it was decoding (the tensors a frame covers)."""
    try:
        work()
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from exc
