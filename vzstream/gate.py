"""The gate: a pool's lock, and which thread and runtime hold it for a call."""

from __future__ import annotations

import contextlib
import sys
import threading

from .errors import TraceError


class Gate:
    """The pool's lock, and which thread and runtime hold it for a call.

    A session call holds it around the call (`held`). A direct `model(x)` takes it in the root
    pre-hook and gives it back in the end hooks; a KeyboardInterrupt skips those, so such a hold
    is *stale* once the frame that entered the forward has left its thread's stack. Whoever
    next needs the lock (that thread or another) then takes it back: the interrupted pass is
    aborted first, so no call ever computes on another call's weights."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None          # thread id holding `lock` for a call (re-entry check)
        self.active = None                     # the runtime whose call holds `lock`
        self.entry = None                      # a direct call's entering frame (None: a session call)
        self.shared = False                    # several runtimes use the ring: hand slots back after a call
        self._reclaim = threading.Lock()

    def acquire(self, runtime, entry=None) -> None:
        """Take the lock for a call of `runtime` (waiting, and taking back a stale hold)."""
        self.reclaim_stale()
        while not self.lock.acquire(timeout=0.05):
            self.reclaim_stale()
        with self._reclaim:                    # a reclaim never sees half of this
            self.owner, self.active, self.entry = threading.get_ident(), runtime, entry

    def release(self) -> None:
        with self._reclaim:
            self._release()

    def _release(self) -> None:
        self.owner = self.active = self.entry = None
        self.lock.release()

    def refuse_reentry(self, message: str = "a vzstream session was opened, closed or called from inside a "
                       "call on the same pool (a hook or callback); do it after that call returns.") -> None:
        """Raise TraceError(`message`) if this thread holds the lock: waiting would never end. A
        hold a Ctrl-C cut short is taken back first."""
        self.reclaim_stale()
        if self.owner == threading.get_ident():
            raise TraceError(message)

    @contextlib.contextmanager
    def held(self, runtime, reentry: str | None = None):
        """Hold the lock for one call of `runtime` (None: opening or closing a session);
        `reentry`: the error to raise from inside a call on this pool."""
        self.refuse_reentry(*([reentry] if reentry else []))
        self.acquire(runtime)
        try:
            yield
        finally:
            self.release()

    def reclaim_stale(self) -> None:
        """Abort and release a direct call's hold that a KeyboardInterrupt left behind."""
        with self._reclaim:
            entry, owner, runtime = self.entry, self.owner, self.active
            if entry is None or _on_stack(owner, entry):
                return
            runtime.abort()
            self._release()


def _on_stack(thread_id: int | None, frame) -> bool:
    """Whether `frame` is still running on thread `thread_id`."""
    f = sys._current_frames().get(thread_id)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False
