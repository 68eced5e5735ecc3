"""Upload planning for the CUDA backend: which planes of a unit go through pinned staging and
where, and how multi-plane tensors are cut into batches for the device scratch regions. Pure
Python over a unit's store, computed once per unit and tested on CPU (docs/design.md, "Backends").

A batch of nibble-coded tensors (`codec="nibble"`) is laid out plane-major in its region, so
that one gather expands every piece's codes at once: [plane 0 of every piece | ... | plane
k-1 | codes | int32 gather indices | pair table | patch offsets (int64) | patch values].
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .. import nibble
from ..errors import FormatError
from ..units import align

STAGING_ALIGNMENT = 64            # plane offsets in staging: whole cache lines per plane
MERGE_CHUNK_NBYTES = 32 << 20     # planar bytes per merge step: bounds the scratch, and copies of
                                  # this size still run at full PCIe speed


@dataclasses.dataclass(frozen=True)
class PlaneCopy:
    index: int          # which byte of each element the plane holds (0 = least significant)
    nbytes: int
    staged: bool        # True: a worker writes it into staging; False: raw, in the pinned arena
    offset: int         # byte offset in the staging slot (staged) or in the store's arena (codes, if coded)
    pairs: int = -1     # nibble-coded: arena offset of its pair table; -1: plain bytes


@dataclasses.dataclass(frozen=True)
class TensorUpload:
    name: str
    slot_offset: int    # byte offset of the tensor in the device slot
    numel: int
    itemsize: int
    planes: tuple[PlaneCopy, ...]   # one plane: copied straight into the slot; else interleaved


@dataclasses.dataclass(frozen=True)
class Piece:
    """Elements [start, start + numel) of a multi-plane tensor, merged through a scratch region
    whose bytes [offset, offset + numel * itemsize) hold their planes one after the other."""
    tensor: int
    start: int
    numel: int
    offset: int


@dataclasses.dataclass(frozen=True, eq=False)
class Coded:
    """Region layout of a batch of nibble-coded pieces. Plane i of a piece lies at
    `i * span + piece.offset`; its codes at `codes + piece.offset // 2`."""
    plane: int              # the coded plane's index (the top one)
    itemsize: int
    span: int               # bytes of each plane area
    pairs: int              # arena offset of the pair table every piece of the batch shares
    codes: int              # region offsets: code bytes, int32 gather indices (span // 2), table,
    index: int
    table: int
    patches: int            # then the patches: int64 byte offsets into the coded plane's area,
    patch_at: np.ndarray    # followed by their uint8 values
    patch_values: np.ndarray
    nbytes: int             # region bytes the batch uses


@dataclasses.dataclass(frozen=True)
class UploadPlan:
    tensors: tuple[TensorUpload, ...]   # one per parameter of the unit, in store order
    staging_nbytes: int                 # staging bytes one fetch of the unit needs
    merge_nbytes: int                   # bytes of all the unit's multi-plane tensors together
    last_staged: int                    # index of the last tensor reading staging (-1: none)
    batches: tuple[tuple[Piece, ...], ...] = ()   # pieces sharing one scratch region, in order
    last_staged_batch: int = -1         # the last batch reading staging (-1: only direct copies do)
    coded: tuple = ()                   # per batch: its `Coded` layout, or None (planar pieces)
    region_nbytes: int = 0              # bytes of a scratch region that every batch fits in


def arena_offset(arena: torch.Tensor, buf) -> int | None:
    """Byte offset of buffer `buf` inside the host tensor `arena`, or None if it lies elsewhere."""
    view = np.frombuffer(buf, dtype=np.uint8)
    addr, base = view.__array_interface__["data"][0], arena.data_ptr()
    if view.size and base <= addr and addr + view.size <= base + arena.numel():
        return addr - base
    return None


def plan_upload(store) -> UploadPlan:
    """Where each plane of `store` comes from: staging (compressed, or raw outside the pinned
    arena, which a worker copies in) or the arena itself (raw planes, uploaded in place)."""
    tensors, staging, merged, last_staged = [], 0, [], -1
    for (name, _), packed, slot_offset in zip(store.unit.params, store.packed, store.offsets):
        planes = []
        for i, plane in enumerate(packed.planes if packed.numel else ()):
            if plane.index != i:
                raise FormatError(f"tensor `{name}`: plane {i} claims index {plane.index}")
            if plane.nibbles is not None:
                planes.append(_coded_copy(store, name, packed, plane))
                continue
            offset = None if plane.compressed else arena_offset(store.arena, plane.raw)
            if offset is None:
                planes.append(PlaneCopy(i, plane.nbytes, True, staging))
                staging = align(staging + plane.nbytes, STAGING_ALIGNMENT)
            else:
                planes.append(PlaneCopy(i, plane.nbytes, False, offset))
        if len(planes) not in (0, 1, packed.itemsize):
            raise FormatError(f"tensor `{name}`: {len(planes)} planes for itemsize {packed.itemsize}")
        if len(planes) > 1:
            merged.append(packed.raw_nbytes)
        last_staged = len(tensors) if any(p.staged for p in planes) else last_staged
        tensors.append(TensorUpload(name, slot_offset, packed.numel, packed.itemsize, tuple(planes)))
    merge = merge_nbytes(merged)
    region = region_nbytes(merge)
    plain = merge_batches(tensors, region)
    coded = coded_batches(tensors, store.packed, region)
    batches = plain + tuple(pieces for pieces, _ in coded)
    layouts = (None,) * len(plain) + tuple(layout for _, layout in coded)
    staged = [b for b, batch in enumerate(batches)
              if any(p.staged for piece in batch for p in tensors[piece.tensor].planes)]
    region = max([region if plain else 0] + [c.nbytes for _, c in coded])
    return UploadPlan(tuple(tensors), staging, merge, last_staged, batches, max(staged, default=-1), layouts, region)


def _coded_copy(store, name: str, packed, plane) -> PlaneCopy:
    """A nibble-coded plane: its codes and pair table are uploaded from the arena as they are."""
    nib = plane.nibbles
    try:
        nibble.check(nib, plane.nbytes)
    except FormatError as exc:
        raise FormatError(f"tensor `{name}`: {exc}") from exc
    codes, pairs = arena_offset(store.arena, nib.codes), arena_offset(store.arena, nib.pairs)
    if codes is None or pairs is None or plane.index != packed.itemsize - 1 or packed.itemsize < 2:
        raise FormatError(f"tensor `{name}`: a nibble-coded plane must be the top plane of a multi-byte "
                          f"float and live in its store's arena")
    return PlaneCopy(plane.index, plane.nbytes, False, codes, pairs)


def merge_batches(tensors: list[TensorUpload], region: int) -> tuple[tuple[Piece, ...], ...]:
    """Every multi-plane tensor cut into pieces of at most `region` planar bytes, and the pieces
    packed in order into batches that each fill one scratch region: a batch is one call of
    copies and one call of merges, however many tensors it holds."""
    batches, current, used = [], [], 0
    for i, t in enumerate(tensors):
        if len(t.planes) < 2 or any(p.pairs >= 0 for p in t.planes):
            continue
        step = region // t.itemsize
        for start in range(0, t.numel, step):
            n = min(step, t.numel - start)
            if current and used + n * t.itemsize > region:
                batches.append(tuple(current))
                current, used = [], 0
            current.append(Piece(i, start, n, used))
            used = align(used + n * t.itemsize, STAGING_ALIGNMENT)
    if current:
        batches.append(tuple(current))
    return tuple(batches)


def staging_items(store, plan: UploadPlan) -> list[tuple[int, str, object, int]]:
    """(nbytes, tensor name, source, staging offset) of every piece a worker writes into
    staging: each frame of a compressed plane, or a whole raw plane outside the arena."""
    items = []
    for t, packed in zip(plan.tensors, store.packed):
        for pc, plane in zip(t.planes, packed.planes):
            if pc.staged and plane.compressed:
                items.extend((f.nbytes, t.name, f, pc.offset + f.start) for f in plane.frames)
            elif pc.staged:
                items.append((pc.nbytes, t.name, plane.raw, pc.offset))
    return items


def merge_nbytes(sizes) -> int:
    """Scratch bytes for multi-plane tensors of `sizes` bytes merged in one batch: each piece
    starts aligned, as `merge_batches` lays them out. The planner and the plan both count so."""
    return sum(align(n, STAGING_ALIGNMENT) for n in sizes)


def region_nbytes(merge_nbytes: int) -> int:
    """Bytes of one scratch region for a unit with `merge_nbytes` of multi-plane tensors (0: no
    merges at all): all of them in one batch, up to MERGE_CHUNK_NBYTES."""
    return min(MERGE_CHUNK_NBYTES, merge_nbytes)


def coded_region_nbytes(region: int, itemsize: int) -> int:
    """A region for batches of nibble-coded pieces of `itemsize`-byte elements: as many elements
    as a planar batch of `region` bytes carries, each taking itemsize + 2.5 bytes (its planes,
    half a code byte, two bytes of int32 index), plus half a byte each of room for patches."""
    return region * (itemsize + 3) // itemsize + _CODED_OVERHEAD if region else 0


_CODED_OVERHEAD = 4 * STAGING_ALIGNMENT + 512     # the pair table and the alignment of four areas


def _coded_footprint(itemsize: int, numel: int, patches: int) -> int:
    span = align(numel, STAGING_ALIGNMENT)
    return itemsize * span + span // 2 + 2 * span + 9 * patches


def coded_batches(tensors: list[TensorUpload], packed: list, region: int) -> tuple:
    """The nibble-coded tensors cut into pieces (an even number of elements, so code bytes are
    not shared) and packed into batches whose `Coded` layout fits `coded_region_nbytes(region,
    itemsize)` bytes; a batch holds one itemsize and one pair table. Returns ((pieces, Coded), ...)."""
    out, current, key, span, patches = [], [], None, 0, 0
    for i, t in enumerate(tensors):
        pc = next((p for p in t.planes if p.pairs >= 0), None)
        if pc is None:
            continue
        nib = packed[i].planes[pc.index].nibbles
        k = (t.itemsize, pc.index, bytes(nib.pairs))
        cap = coded_region_nbytes(region, t.itemsize) - _CODED_OVERHEAD
        start = 0
        while start < t.numel:
            n = min(max(2, region // t.itemsize // 2 * 2), t.numel - start)
            at, values = nibble.patches_in(nib, t.numel, start, start + n)
            while n > 2 and _coded_footprint(t.itemsize, n, at.size) > cap:
                n = n // 4 * 2              # a piece dense in patches: halve it (stays even)
                at, values = nibble.patches_in(nib, t.numel, start, start + n)
            if current and (k != key or _coded_footprint(t.itemsize, span + n, patches + at.size) > cap):
                out.append(_close(current, key, span, tensors))
                current, span, patches = [], 0, 0
            key = k
            current.append((Piece(i, start, n, span), at - start + span, values))   # patches: offsets in the plane area
            span, patches, start = align(span + n, STAGING_ALIGNMENT), patches + at.size, start + n
    if current:
        out.append(_close(current, key, span, tensors))
    return tuple(out)


def _close(current: list, key: tuple, span: int, tensors) -> tuple:
    """The batch of `current`: (piece, its patch offsets in the coded plane's area, their values)."""
    itemsize, plane, _ = key
    codes = itemsize * span
    index = align(codes + span // 2, STAGING_ALIGNMENT)
    table = index + 2 * span
    patches = align(table + 512, STAGING_ALIGNMENT)
    at = np.concatenate([a for _, a, _ in current]).astype(np.int64)
    values = np.concatenate([v for _, _, v in current]).astype(np.uint8)
    pieces = tuple(piece for piece, _, _ in current)
    pairs = tensors[pieces[0].tensor].planes[plane].pairs
    layout = Coded(plane, itemsize, span, pairs, codes, index, table, patches, at, values, patches + 9 * at.size)
    return pieces, layout
