"""Install: the reversible changes a session makes to the model, and how they are undone.

`Installed` owns every change: streamed parameters swapped out for refusing stand-ins (their
`Original`s kept on the unit), resident parameters and buffers moved to the device, the hooks
that bind and release units, and moving a unit between resident and streamed when the plan
changes. `restore()` puts everything back bit-exactly, on its original device; run it under
`interrupts_deferred` (as `assemble.close_member` does): half-way, parameters would be left
empty with nothing to restore them from.

Nothing here refers to a session: the hooks call the runtime they are given.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from . import hooks, standin
from .decode import decode
from .fromfile import put_back
from .errors import FormatError, VzstreamError
from .store import in_order, unpermute

log = logging.getLogger("vzstream")


class Installed:
    """What a session changed on `model`, unit by unit, and the way back."""

    def __init__(self, model, units: list, backend, swapped: list | None = None, keep: bool = False) -> None:
        self.model, self.units, self.backend = model, units, backend
        self.buffers: list = []      # (module, name, original device, placed)
        self.handles: list = []
        # Opened from a file: the meta tensors to put back (`fromfile.swap_in`), unless `keep`
        # (materialize=True): then the weights are decoded back and stay.
        self.swapped, self.keep = swapped or [], keep

    def swap_out(self, unit, store, devices: dict | None = None) -> None:
        """`unit` streams from `store`: free its parameters (remembering how to restore them).
        `devices`: id(param) -> where it came from, when that is not where it is now."""
        unit.store, unit.streamed = store, True
        for (name, p), packed, perm in zip(unit.params, store.packed, store.perms):
            device = p.device if devices is None else devices[id(p)]
            unit.originals.append(Original(p, packed, perm, device, unit.fqn, name))
            store.stand_ins.append(standin.adopt(p, name, self.backend.device))  # frees the original storage

    def move_resident(self, unit) -> None:
        for _, p in unit.params:
            device = p.device
            p.data = self.backend.to_device(p.data)
            unit.moved.append((p, device, p.data))      # what was placed: edits are undone to it

    def move_buffers(self) -> None:
        device = self.backend.device
        for mod in self.model.modules():
            for name, buf in mod._buffers.items():
                if buf is not None and buf.device != device:
                    mod._buffers[name] = buf.to(device)
                    self.buffers.append((mod, name, buf.device, mod._buffers[name]))

    def undo_edits(self, warn: bool = False) -> None:
        """Put back the resident tensors placed at open where something replaced them: a
        conversion (`model.half()`) refused part-way by a streamed stand-in converts the
        resident modules it reached first, and passes would then mix dtypes. Edits inside a
        session are not supported; `warn`: say so, naming them (at exit)."""
        changed = []
        for unit in self.units:
            for p, _, placed in unit.moved:
                if p.data_ptr() != placed.data_ptr() or p.dtype != placed.dtype or p.shape != placed.shape:
                    changed.append(p)
                    p.data = placed
        for mod, name, _, placed in self.buffers:
            if mod._buffers.get(name) is not placed:
                changed.append(name)
                mod._buffers[name] = placed
        if changed and warn:
            log.warning("vzstream: %d resident parameter(s) or buffer(s) were replaced inside the session (a "
                        "conversion or an edit); they are put back as they were at open: change the model "
                        "before the session opens or after it closes", len(changed))

    def evict(self, unit, store) -> None:
        """A resident unit streams from now on, from `store` (packed from its device copy)."""
        devices = {id(p): d for p, d, _ in unit.moved}
        self.backend.account(-sum(unit.param_nbytes))
        unit.moved = []
        self.swap_out(unit, store, devices)

    def admit(self, unit) -> None:
        """A streamed unit stays resident from now on: decoded onto the device, its store dropped.
        Every parameter is moved before any is bound, so a failure (out of memory) changes nothing."""
        values = []
        try:
            for orig in unit.originals:
                values.append(self.backend.to_device(unpermute(decode(orig.packed), orig.perm)))
        except BaseException:
            for value in values:                # the copies made so far are dropped
                self.backend.account(-value.numel() * value.element_size())
            raise
        for orig, value in zip(unit.originals, values):
            standin.disown(orig.param)
            orig.param.data = value
            unit.moved.append((orig.param, orig.device, value))
        unit.originals, unit.store, unit.streamed = [], None, False

    def hook(self, runtime) -> None:
        """Bind/release hooks on every streamed unit's modules, calling `runtime`."""
        self.handles = hooks.install(self.model, self.units, runtime)

    def unhook(self) -> None:
        hooks.remove(self.handles)

    def restore(self, threads: int, free) -> None:
        """Every parameter and buffer back; a corrupt unit does not stop the others. `free(unit)`
        is called once a streamed unit's parameters are back."""
        self.unhook()
        if self.swapped and not self.keep:
            self._discard(free)
            return
        try:
            failed = restore_all(self.units, threads, free)
        finally:                                 # even after a failed restore
            self.undo_edits(warn=True)
            for unit in self.units:
                for p, device, _ in unit.moved:
                    p.data = self.backend.from_device(p.data, device)
                unit.moved, unit.originals = [], []
            for mod, name, device, _ in self.buffers:
                mod._buffers[name] = mod._buffers[name].to(device)
            self.buffers = []
        if failed:
            names = ", ".join(f"`{o.name}` of unit `{o.unit_fqn}`" for o, _ in failed)
            raise FormatError(
                f"could not restore {len(failed)} parameter(s) from corrupt compressed data: {names} "
                f"(each left as a stand-in that refuses any use; every other parameter was restored). First error: {failed[0][1]}"
            ) from failed[0][1]


    def _discard(self, free) -> None:
        """Opened from a file: drop what was read from it and put the meta tensors back (the
        model is as it was built); nothing is decoded."""
        try:
            for unit in self.units:
                for orig in unit.originals:
                    standin.disown(orig.param)
                for _, _, placed in unit.moved:
                    self.backend.account(-placed.numel() * placed.element_size())
                streamed, unit.originals, unit.moved = bool(unit.originals), [], []
                if streamed:
                    free(unit)
            for mod, name, device, _ in self.buffers:   # buffers that were not meta go back as usual
                mod._buffers[name] = mod._buffers[name].to(device)
            self.buffers = []
        finally:
            put_back(self.swapped)
            self.swapped = []


class Original:
    """Where a streamed parameter came from, to put it back exactly."""

    __slots__ = ("param", "packed", "perm", "device", "unit_fqn", "name")

    def __init__(self, param, packed, perm, device, unit_fqn: str, name: str) -> None:
        self.param, self.packed, self.perm, self.device = param, packed, perm, device
        self.unit_fqn, self.name = unit_fqn, name

    def restore(self) -> None:
        try:
            value = decode(self.packed)
        except FormatError as exc:
            # Without tracebacks: decode's frames hold `packed`, and so its unit's arena, for
            # as long as the error lives (the messages name the unit, the tensor and the frame).
            cause = exc
            while cause is not None:
                cause.__traceback__, cause = None, cause.__cause__ or cause.__context__
            raise FormatError(f"unit `{self.unit_fqn}`, tensor `{self.name}`: {exc}") from exc
        # Packed in memory order: undoing the permutation gives back the original strides.
        standin.disown(self.param)
        try:
            moved = value.to(self.device)
        except Exception as exc:        # e.g. the device is out of memory: keep the weight, here
            self.param.data = unpermute(value, self.perm)
            raise VzstreamError(f"unit `{self.unit_fqn}`, tensor `{self.name}` could not be moved back to "
                                f"{self.device} ({type(exc).__name__}: {exc}); it was left on the CPU, intact: "
                                f"move the model (`model.to({str(self.device)!r})`) once there is room") from exc
        self.param.data = unpermute(moved, self.perm)


def restore_all(units: list, threads: int, free) -> list:
    """Put every streamed parameter of `units` back (`unit.originals`), on `threads` threads,
    unit by unit, calling `free(unit)` once a unit's are all back so its store can go: leaving
    then needs the model's size of host RAM plus a few units, not that plus every store. Threads
    because decoding is most of leaving, and much of it is fresh pages faulting in (~1 GB/s per
    thread on a VM); each also moves its tensors to their device, so host copies of a GPU model
    do not pile up. A FormatError leaves its parameter empty and is returned, [(Original,
    FormatError)]; any other exception is raised once every other parameter is back, with a note
    naming the corrupt ones. Run it under `interrupts_deferred`: a Ctrl-C half-way would leave
    the rest empty for good."""
    units, failed, errors = [u for u in units if u.originals], [], []
    with ThreadPoolExecutor(threads, thread_name_prefix="vzstream-restore") as pool:
        def submit(unit):
            return [_submit(pool, orig.restore) for orig in unit.originals]

        # A window of units in flight, so the threads never run further ahead of the frees.
        for unit, futures in in_order(units, submit, threads):
            for orig, future in zip(unit.originals, futures):
                exc = future.exception()
                if isinstance(exc, FormatError):
                    failed.append((orig, exc))      # it stays a stand-in, refusing any use, named so
                    standin.name_it(orig.param, f"{orig.name} (not restored: corrupt compressed data)")
                elif exc is not None:
                    errors.append(exc)
                orig.packed = None
            unit.originals = []
            try:
                free(unit)
            except Exception as exc:             # freeing early only saves RAM: restoring comes first
                errors.append(exc)
    if errors:
        raise _with_notes(errors[0], errors[1:], failed)
    return failed


def _with_notes(error: BaseException, others: list, failed: list) -> BaseException:
    """`error`, noting the other errors (each names its tensor) and the corrupt parameters, so
    none goes unreported (notes need Python >= 3.11; before, only `error` is shown)."""
    if hasattr(error, "add_note"):
        for exc in others:
            error.add_note(f"vzstream: also: {type(exc).__name__}: {exc}")
        if failed:
            error.add_note("vzstream: also not restored (stand-ins refusing any use), from corrupt compressed data: "
                           + ", ".join(f"`{o.name}` of unit `{o.unit_fqn}`" for o, _ in failed))
    return error


def _submit(pool: ThreadPoolExecutor, fn) -> Future:
    """`pool.submit(fn)`, or `fn` run here when no thread can start any more (a session left
    from an `atexit` handler: the interpreter refuses new work to pools by then)."""
    try:
        return pool.submit(fn)
    except RuntimeError:
        done: Future = Future()
        try:
            done.set_result(fn())
        except BaseException as exc:
            done.set_exception(exc)
        return done


@contextlib.contextmanager
def interrupts_deferred(what: str = "putting the model back"):
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise it (or run the handler that
    was installed): `what` must not stop half-way. A second Ctrl-C is obeyed at once (with the
    consequence said in the warning the first one logs), so a hang stays escapable. Only where
    Python's own handler or another Python handler is installed, and only on the main thread,
    which is where signals are handled; elsewhere the block runs as it is."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield
        return
    caught = []

    def hold(signum, frame):
        if caught:                              # the user insists: obey now
            caught.append(None)
            signal.signal(signal.SIGINT, previous)
            previous(signum, frame)
            return
        caught.append(frame)
        log.warning("vzstream: Ctrl-C while %s: finishing that first; press Ctrl-C again to stop "
                    "at once (what is not back by then is lost)", what)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if len(caught) == 1:                    # held, not yet obeyed
            previous(signal.SIGINT, caught[0])  # Python's own handler raises KeyboardInterrupt
