"""Per-unit compressed storage in host RAM (DESIGN §5).

`pack_unit` packs every parameter of a unit with the codec, then copies all of its frames and
raw planes into ONE host buffer from the backend (pinned on CUDA, in exact size: the pinned
caching allocator would round each small block up to a power of two). The `Packed` records are
rebuilt to point into that arena, so the store holds nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import calibrate, codec, nibble
from .errors import ConfigError, FormatError, VzstreamError
from .plan import Unit, align, param_offsets, unit_nbytes

log = logging.getLogger("vzstream")


@dataclass(eq=False)
class UnitStore:
    """The compressed form of one unit plus where each tensor sits inside a slot."""

    unit: Unit
    packed: list[codec.Packed]
    offsets: list[int]          # byte offset of each tensor in a slot (aligned)
    slot_nbytes: int
    arena: torch.Tensor         # uint8 host buffer holding every frame and raw plane
    perms: list                 # per tensor: dim order it was packed in (storage order), or None
    _views: dict = dataclasses.field(default_factory=dict, repr=False)

    def targets(self, slot) -> list[torch.Tensor]:
        """Contiguous tensors inside `slot` in packed layout: what decode and upload write."""
        return self._cached(slot)[0]

    def views(self, slot) -> list[torch.Tensor]:
        """The same memory shaped and strided like each parameter: what bind points at."""
        return self._cached(slot)[1]

    def forget_slots(self) -> None:
        """Drop cached views (the ring was rebuilt: the old slots must be freed)."""
        self._views.clear()

    def _cached(self, slot):
        entry = self._views.get(slot.index)
        if entry is None or entry[0] is not slot.tensor:
            targets = slot_views(slot.tensor, self.packed, self.offsets)
            entry = (slot.tensor, (targets, [unpermute(t, p) for t, p in zip(targets, self.perms)]))
            self._views[slot.index] = entry
        return entry[1]

    @property
    def packed_nbytes(self) -> int:
        return self.arena.numel()

    @property
    def raw_nbytes(self) -> int:
        return sum(p.raw_nbytes for p in self.packed)

    @property
    def compressed(self) -> bool:
        """Whether fetching the unit decodes anything (False: every plane is stored raw)."""
        return any(plane.compressed for p in self.packed for plane in p.planes)

    @property
    def wire_nbytes(self) -> int:
        """Bytes one upload of the unit moves host→device on CUDA: nibble-coded planes as stored
        (the device expands them), every other plane at its decoded size."""
        return sum(nibble.nbytes(plane.nibbles) if plane.nibbles is not None else plane.nbytes
                   for p in self.packed for plane in p.planes)


def slot_views(slot: torch.Tensor, packed: list, offsets: list[int]) -> list[torch.Tensor]:
    """Views of a uint8 `slot` shaped like each packed tensor, at its aligned offset."""
    return [
        slot[off : off + p.raw_nbytes].view(p.dtype).view(p.shape) for p, off in zip(packed, offsets)
    ]


def storage_order(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """`t` permuted so its memory is contiguous (a transposed weight packs in memory order),
    and that permutation; (t, None) when `t` is contiguous or not a dense permutation."""
    order = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    if t.is_contiguous() or order == tuple(range(t.dim())) or not t.permute(order).is_contiguous():
        return t, None
    return t.permute(order), order


def unpermute(t: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """Undo `storage_order`: the original shape and strides over the same memory."""
    if order is None:
        return t
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return t.permute(inverse)


def _buffers(packed: codec.Packed) -> list:
    return [b for plane in packed.planes for b in plane.buffers()]


def _rebased(packed: codec.Packed, views: list) -> codec.Packed:
    """`packed` with each buffer replaced, in `_buffers` order, by the matching arena view."""
    it = iter(views)
    planes = []
    for plane in packed.planes:
        if plane.raw is not None:
            planes.append(dataclasses.replace(plane, raw=next(it)))
        elif plane.nibbles is not None:
            codes, pairs, at, values = (next(it) for _ in plane.nibbles.buffers())
            planes.append(dataclasses.replace(plane, nibbles=nibble.Nibbles(codes, pairs, at, values)))
        else:
            frames = tuple(dataclasses.replace(f, data=next(it)) for f in plane.frames)
            planes.append(dataclasses.replace(plane, frames=frames))
    return dataclasses.replace(packed, planes=tuple(planes))


def pack_unit(unit: Unit, backend, level: int | None, compress: bool = True, coding: str = "zstd") -> UnitStore:
    """Pack `unit`'s parameters into one arena (every plane raw unless `compress`), with zstd
    frames or, for `coding="nibble"`, with nibble codes sharing one table per dtype. Does not
    touch the parameters themselves."""
    ordered = [storage_order(p.detach()) for _, p in unit.params]
    tables = codec.nibble_tables(t for t, _ in ordered) if compress and coding == "nibble" else None
    packed = []
    for (name, _), (t, _) in zip(unit.params, ordered):
        try:
            packed.append(codec.pack(t, level=level, compress=compress, coding=coding, tables=tables))
        except ConfigError as exc:
            raise ConfigError(f"unit `{unit.fqn}`, parameter `{name}`: {exc}") from exc
    buffers = [_buffers(p) for p in packed]
    # Each buffer 8-byte aligned: numpy reads a misaligned int64 array (nibble patch indices)
    # through a copy on every search, and the arena costs at most 7 bytes more per buffer.
    total = sum(align(memoryview(b).nbytes, 8) for bufs in buffers for b in bufs)
    arena = backend.host_buffer(total)
    flat = arena.numpy()
    rebased, off = [], 0
    for p, bufs in zip(packed, buffers):
        views = []
        for b in bufs:
            n = memoryview(b).nbytes
            flat[off : off + n] = np.frombuffer(b, dtype=np.uint8)
            views.append(memoryview(flat[off : off + n]))
            off += align(n, 8)
        rebased.append(_rebased(p, views))
    offsets = param_offsets(unit, backend.alignment)
    return UnitStore(unit, rebased, offsets, unit_nbytes(unit, backend.alignment), arena, [o for _, o in ordered])


def pack_all(units: list[Unit], backend, config, stats, threads: int):
    """Yield (unit, its UnitStore) for each of `units`, in order, packed on `threads` threads
    (the model computes nothing while a session opens, and zstd releases the GIL), a window
    of them in flight: that bounds the extra host RAM while packing (~1 GiB). The units kept
    raw follow `config.raw_fraction` over those that stream (`unit.streamed`); "auto" packs its
    sample unit first, compressed, and measures on it (`calibrate.auto_raw_fraction`, which
    fills `stats`)."""
    planned = [u for u in units if u.streamed]
    t0, largest = time.perf_counter(), max((u.raw_nbytes for u in units), default=1)
    with ThreadPoolExecutor(threads, thread_name_prefix="vzstream-pack") as pool:
        def submit(u, compress=True):
            return pool.submit(pack_unit, u, backend, config.level, compress, config.codec)

        # Of the units planned to stream: a unit kept resident for now (measured, evictable)
        # and evicted to streaming later stays compressed, so under a budget the share is
        # approximate.
        fraction, sample = config.raw_fraction, {}
        if fraction == "auto":
            fraction, sample = calibrate.auto_raw_fraction(planned, submit, backend, config, stats)
        raw = calibrate.raw_units(planned, fraction, keep=sample)

        def next_store(u):
            return sample.pop(u.index, None) or submit(u, u.index not in raw)

        window = max(2, min(threads, (1 << 30) // max(largest, 1)))
        for i, (unit, future) in enumerate(in_order(units, next_store, window)):
            yield unit, future.result()
            progress("pack", i + 1, len(units), t0)


def in_order(items: list, submit, window: int):
    """Yield (item, submit(item)) in order, submitting each item only once the one `window`
    places before it was handed out and dealt with (the caller asked for the next): at most
    `window` are in flight, so the work never runs further ahead of the caller than that."""
    pending = [submit(item) for item in items[:window]]
    for i, item in enumerate(items):
        yield item, pending[i]
        if i + window < len(items):
            pending.append(submit(items[i + window]))


class Original:
    """Where a streamed parameter came from, to put it back exactly."""

    __slots__ = ("param", "packed", "perm", "device", "unit_fqn", "name")

    def __init__(self, param, packed, perm, device, unit_fqn: str, name: str) -> None:
        self.param, self.packed, self.perm, self.device = param, packed, perm, device
        self.unit_fqn, self.name = unit_fqn, name

    def restore(self) -> None:
        try:
            value = codec.decode(self.packed)
        except FormatError as exc:
            # Without tracebacks: decode's frames hold `packed`, and so its unit's arena, for
            # as long as the error lives (the messages name the unit, tensor, plane and frame).
            cause = exc
            while cause is not None:
                cause.__traceback__, cause = None, cause.__cause__ or cause.__context__
            raise FormatError(f"unit `{self.unit_fqn}`, tensor `{self.name}`: {exc}") from exc
        # Packed in memory order: undoing the permutation gives back the original strides.
        try:
            moved = value.to(self.device)
        except Exception as exc:        # e.g. the device is out of memory: keep the weight, here
            self.param.data = unpermute(value, self.perm)
            raise VzstreamError(f"unit `{self.unit_fqn}`, tensor `{self.name}` could not be moved back to "
                                f"{self.device} ({type(exc).__name__}: {exc}); it was left on the CPU, intact: "
                                f"move the model (`model.to({str(self.device)!r})`) once there is room") from exc
        self.param.data = unpermute(moved, self.perm)


def restore_all(originals: list[Original], threads: int, free) -> list:
    """Put every parameter of `originals` back, on `threads` threads, unit by unit (they come
    grouped by unit, as the session packed them), calling `free(unit_fqn)` once a unit's are all
    back so its store can go: leaving then needs the model's size of host RAM plus a few units,
    not that plus every store. Threads because decoding is most of leaving, and much of it is
    fresh pages faulting in (~1 GB/s per thread on a VM); each also moves its tensors to their
    device, so host copies of a GPU model do not pile up. A FormatError leaves its parameter
    empty and is returned, [(Original, FormatError)]; any other exception is raised once every
    other parameter is back, with a note naming the corrupt ones. Run it under
    `interrupts_deferred`: a Ctrl-C half-way would leave the rest empty for good."""
    by_unit: dict[str, list[Original]] = {}
    for orig in originals:
        by_unit.setdefault(orig.unit_fqn, []).append(orig)
    units, failed, errors = list(by_unit.items()), [], []
    with ThreadPoolExecutor(threads, thread_name_prefix="vzstream-restore") as pool:
        def submit(unit):
            return [_submit(pool, orig.restore) for orig in unit[1]]

        # A window of units in flight, so the threads never run further ahead of the frees.
        for (fqn, origs), futures in in_order(units, submit, threads):
            for orig, future in zip(origs, futures):
                exc = future.exception()
                if isinstance(exc, FormatError):
                    failed.append((orig, exc))
                elif exc is not None:
                    errors.append(exc)
                orig.packed = None
            try:
                free(fqn)
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
            error.add_note("vzstream: also left empty, from corrupt compressed data: "
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


def return_freed_memory() -> None:
    """Hand the freed original weights back to the OS (glibc keeps freed heap otherwise, and
    RSS would hide what packing saved). Best effort: a no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_last_progress = [0.0]


def progress(stage: str, done: int, total: int, t0: float) -> None:
    """At most one INFO line a second while packing, and one at the end."""
    now = time.perf_counter()
    if done == total or now - _last_progress[0] >= 1.0:
        _last_progress[0] = now
        log.info("vzstream: %s %d/%d units (%.1f s)", stage, done, total, now - t0)
