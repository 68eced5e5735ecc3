"""Sessions left open: one that becomes unreachable puts its model back, and
`vzstream.restore(model)` recovers a model whose session object was lost.

Each open session is watched here under its model by an `Orphan`: the way to close its parts,
which refers to no session, so the session can still be collected. A `weakref.finalize` on the
session then warns (ResourceWarning) and closes the parts, if it can take the pool's lock at
once. It never blocks: a finalizer runs on whatever thread triggered the collection, maybe in
the middle of a call that holds that lock, or on one of the session's own worker threads (which
closing would join). Then the close waits in `pool.pending` for the end of that session call,
the next session call or join on the pool, `vzstream.restore(model)`, or a new session on the
model (a direct `model(x)` does not run it).
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref

log = logging.getLogger("vzstream")
_watched: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()     # model -> Orphan


class Orphan:
    def __init__(self, session, pool, close_locked) -> None:
        self.session_ref, self.pool, self.close_locked = weakref.ref(session), pool, close_locked
        self.done = False
        self.finalizer = weakref.finalize(session, _collected, self)
        self.finalizer.atexit = False           # at exit the process ends anyway: no restore to wait for

    def run_locked(self) -> None:
        """Close the parts (the caller holds the pool's lock); once."""
        if not self.done:
            self.done = True
            self.close_locked()


def watch(session, model, pool, close_locked) -> None:
    """`close_locked()` puts `model` back; run it if `session` is collected while open."""
    _watched[model] = Orphan(session, pool, close_locked)


def unwatch(model) -> None:
    orphan = _watched.pop(model, None)
    if orphan is not None:
        orphan.done = True
        orphan.finalizer.detach()


def abandoned(model) -> bool:
    """Whether `model` is held by a session that no longer exists."""
    orphan = _watched.get(model)
    return orphan is not None and orphan.session_ref() is None


def restore(model) -> bool:
    """Put `model` back from a session whose object was lost (or collected before its close
    could run); True if there was one. Its session, if it still exists somewhere, is closed."""
    orphan = _watched.get(model)
    if orphan is None:
        return False
    session = orphan.session_ref()
    if session is not None:
        session.close()
    else:
        with orphan.pool.gate.held(None):
            orphan.run_locked()
    return True


def run_pending(pool) -> None:
    """Close what finalizers left for later (the caller holds the pool's lock)."""
    while pool.pending:
        orphan = pool.pending.pop()
        try:
            orphan.run_locked()
        except Exception:                       # one failed restore must not stop the pool
            log.exception("vzstream: putting back the model of a collected session failed")


def _collected(orphan: Orphan) -> None:
    if orphan.done:
        return
    message = ("vzstream: a session was collected while still open; putting its model back. Leave "
               "sessions with `with vzstream.session(model) as s:` or call `s.close()`.")
    warnings.warn(message, ResourceWarning, stacklevel=2)
    log.warning(message)
    on_worker = threading.current_thread().name.startswith("vzstream-")
    if on_worker or not orphan.pool.lock.acquire(blocking=False):
        orphan.pool.pending.append(orphan)
        return
    try:
        orphan.run_locked()
    except Exception:
        log.exception("vzstream: putting back the model of a collected session failed")
    finally:
        orphan.pool.lock.release()
