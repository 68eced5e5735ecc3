"""Packing: each unit's compressed storage in host RAM, as one wire image (`image.py`) in one
arena, and where each tensor sits inside a slot."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from . import calibrate
from .codec import Codec
from .errors import FormatError
from .image import Image, ImageTensor, pack_image
from .units import Unit, unit_nbytes

log = logging.getLogger("vzstream")


# A unit smaller than this is stored raw: compressing it would save at most ~1.3 KiB, less than
# the records of its frames and planes take in host RAM, and decoding its few bytes costs the
# forward thread more than copying them (a norm-sized unit is bound inline, on that thread).
SMALL_UNIT_NBYTES = 4 << 10


@dataclass(eq=False)
class UnitStore:
    """The compressed form of one unit plus where each tensor sits inside a slot."""

    unit: Unit
    packed: list[ImageTensor]   # per parameter: where it lies in the image and in a slot
    offsets: list[int]          # byte offset of each tensor in a slot (aligned)
    slot_nbytes: int
    arena: torch.Tensor         # uint8 host buffer holding the image
    perms: list                 # per tensor: dim order it was packed in (storage order), or None
    image: Image
    stand_ins: list = dataclasses.field(default_factory=list)  # per parameter, from standin.adopt (install)
    crcs: list | None = None    # (arena offset, nbytes, crc32, its tensors) of each piece; None: not recorded
    _views: dict = dataclasses.field(default_factory=dict, repr=False)
    _verify: list | None = dataclasses.field(default=None, repr=False)

    def views(self, slot) -> list[torch.Tensor]:
        """`slot`'s memory shaped and strided like each parameter: what bind points at. Made
        once per slot (a view op is a torch call on the forward thread)."""
        entry = self._views.get(slot.index)
        if entry is None or entry[0] is not slot.tensor:
            targets = slot_views(slot.tensor, self.packed, self.offsets)
            entry = (slot.tensor, [unpermute(t, p) for t, p in zip(targets, self.perms)])
            self._views[slot.index] = entry
        return entry[1]

    def forget_slots(self) -> None:
        """Drop cached views (the ring was rebuilt: the old slots must be freed)."""
        self._views.clear()

    def verify_jobs(self) -> list:
        """`verify="stream"`: jobs that check every stored byte of the unit against the crc32s
        recorded when packing (a piece each: a chunk, the raw area), raising FormatError naming
        the tensors a changed piece holds. Built once."""
        if self._verify is None:
            if self.crcs is None:           # a wrong answer must not pass as checked
                raise RuntimeError(f"unit `{self.unit.fqn}` was packed without checksums (pack_unit(checksums=True))")
            arena = self.image.host
            self._verify = [[(what, functools.partial(_check_crc, arena[off : off + n], crc))]
                            for off, n, crc, what in self.crcs]
        return self._verify

    def tensors_in(self, first: int, last: int) -> str:
        """The parameters whose slot bytes overlap [first, last), for an error message."""
        names = [f"`{n}`" for (n, _), t in zip(self.unit.params, self.packed)
                 if t.raw_nbytes and t.slot_offset < last and first < t.slot_offset + t.raw_nbytes]
        return f"tensor{'s' if len(names) > 1 else ''} {', '.join(names) or '(padding)'}"

    @property
    def packed_nbytes(self) -> int:
        return self.arena.numel()

    @functools.cached_property
    def raw_nbytes(self) -> int:            # read at every fetch (the pipeline's inline rule)
        return sum(p.raw_nbytes for p in self.packed)

    @property
    def compressed(self) -> bool:
        """Whether fetching the unit decodes or expands anything (False: all raw)."""
        return bool(self.image.chunks)

    @property
    def wire_nbytes(self) -> int:
        """Bytes one upload of the unit moves host→device on CUDA: nibble chunks as stored (the
        device expands them), zstd's at their decoded size."""
        return self.image.wire_nbytes


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


def pack_unit(unit: Unit, backend, level: int | None, compress: bool = True, coding: str = "zstd",
              checksums: bool = False) -> UnitStore:
    """Pack `unit`'s parameters into one wire image (`image.py`) in one host buffer from the
    backend (pinned on CUDA, in exact size: the pinned caching allocator would round each block
    up to a power of two), coded with `coding`, or all raw (`compress` False, or a unit under
    SMALL_UNIT_NBYTES). Does not touch the parameters themselves."""
    ordered = [storage_order(p.detach()) for _, p in unit.params]
    compress = compress and unit.raw_nbytes >= SMALL_UNIT_NBYTES
    flat = [t.to("cpu").contiguous() for t, _ in ordered]    # evicting packs from device copies
    img, entries = pack_image(flat, backend.alignment, backend.host_buffer, Codec(coding) if compress else None, level)
    store = UnitStore(unit, entries, [e.slot_offset for e in entries], unit_nbytes(unit, backend.alignment),
                      img.arena, [o for _, o in ordered], image=img)
    if checksums:                        # `verify="stream"` only: a crc32 pass over the arena at open
        store.crcs = piece_crcs(store)
    return store


def piece_crcs(store: UnitStore) -> list:
    """(arena offset, nbytes, crc32, the tensors it holds) of each piece of the image: a chunk,
    the raw area. ~1 GB/s of zlib.crc32 on a slow core, at pack, where zstd costs more."""
    img, arena, k = store.image, store.image.host, store.image.itemsize
    pieces = [(c.offset, c.nbytes(k), store.tensors_in(c.start * k, (c.start + c.numel) * k)) for c in img.chunks]
    if img.raw_nbytes:
        pieces.append((img.raw_offset, img.raw_nbytes, store.tensors_in(img.coded_nbytes, img.coded_nbytes + img.raw_nbytes)))
    return [(off, n, zlib.crc32(arena[off : off + n]), what) for off, n, what in pieces]


def _check_crc(data, crc: int) -> None:
    got = zlib.crc32(data)
    if got != crc:
        raise FormatError(f"their stored bytes have crc32 {got:#010x}, {crc:#010x} was recorded when packing: host "
                          f"memory holding the compressed model changed (verify=\"stream\" stopped it before the upload)")


@dataclass
class Calibration:
    """What `raw_fraction="auto"` measured at open (0: not measured)."""

    decode_gbps_measured: float = 0.0
    upload_gbps_measured: float = 0.0


def pack_all(units: list[Unit], backend, *, level: int | None, codec: str, raw_fraction, workers: int,
             threads: int, calibration: Calibration, checksums: bool = False):
    """Yield (unit, its UnitStore) for each of `units`, in order, packed on `threads` threads
    (the model computes nothing while a session opens, and zstd releases the GIL), a window
    of them in flight: that bounds the extra host RAM while packing (~1 GiB). The units kept
    raw follow `raw_fraction` over those that stream (`unit.streamed`); "auto" packs its
    sample unit first, compressed, and measures on it (`calibrate.auto_raw_fraction`, which
    fills `calibration`)."""
    planned = [u for u in units if u.streamed]
    t0, largest = time.perf_counter(), max((u.raw_nbytes for u in units), default=1)
    with ThreadPoolExecutor(threads, thread_name_prefix="vzstream-pack") as pool:
        def submit(u, compress=True):
            return pool.submit(pack_unit, u, backend, level, compress, codec, checksums)

        fraction, sample = raw_fraction, {}
        if fraction == "auto":
            fraction, sample = calibrate.auto_raw_fraction(
                planned, submit, backend, SimpleNamespace(codec=codec, workers=workers), calibration)
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
