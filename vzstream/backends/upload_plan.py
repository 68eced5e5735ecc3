"""Upload planning for the CUDA backend: which planes of a unit go through pinned staging and
where, and how multi-plane tensors are cut into batches for the device scratch regions. Pure
Python over a unit's store, computed once per unit and tested on CPU (DESIGN §6)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..errors import FormatError

STAGING_ALIGNMENT = 64            # plane offsets in staging: whole cache lines per plane
MERGE_CHUNK_NBYTES = 32 << 20     # planar bytes per merge step: bounds the scratch, and copies of
                                  # this size still run at full PCIe speed


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclasses.dataclass(frozen=True)
class PlaneCopy:
    index: int          # which byte of each element the plane holds (0 = least significant)
    nbytes: int
    staged: bool        # True: a worker writes it into staging; False: raw, in the pinned arena
    offset: int         # byte offset in the staging slot (staged) or in the store's arena


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


@dataclasses.dataclass(frozen=True)
class UploadPlan:
    tensors: tuple[TensorUpload, ...]   # one per parameter of the unit, in store order
    staging_nbytes: int                 # staging bytes one fetch of the unit needs
    merge_nbytes: int                   # bytes of all the unit's multi-plane tensors together
    last_staged: int                    # index of the last tensor reading staging (-1: none)
    batches: tuple[tuple[Piece, ...], ...] = ()   # pieces sharing one scratch region, in order
    last_staged_batch: int = -1         # the last batch reading staging (-1: only direct copies do)


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
            offset = None if plane.compressed else arena_offset(store.arena, plane.raw)
            if offset is None:
                planes.append(PlaneCopy(i, plane.nbytes, True, staging))
                staging = _align(staging + plane.nbytes, STAGING_ALIGNMENT)
            else:
                planes.append(PlaneCopy(i, plane.nbytes, False, offset))
        if len(planes) not in (0, 1, packed.itemsize):
            raise FormatError(f"tensor `{name}`: {len(planes)} planes for itemsize {packed.itemsize}")
        if len(planes) > 1:
            merged.append(packed.raw_nbytes)
        last_staged = len(tensors) if any(p.staged for p in planes) else last_staged
        tensors.append(TensorUpload(name, slot_offset, packed.numel, packed.itemsize, tuple(planes)))
    merge = merge_nbytes(merged)
    batches = merge_batches(tensors, region_nbytes(merge))
    staged = [b for b, batch in enumerate(batches)
              if any(p.staged for piece in batch for p in tensors[piece.tensor].planes)]
    return UploadPlan(tuple(tensors), staging, merge, last_staged, batches, max(staged, default=-1))


def merge_batches(tensors: list[TensorUpload], region: int) -> tuple[tuple[Piece, ...], ...]:
    """Every multi-plane tensor cut into pieces of at most `region` planar bytes, and the pieces
    packed in order into batches that each fill one scratch region: a batch is one call of
    copies and one call of merges, however many tensors it holds."""
    batches, current, used = [], [], 0
    for i, t in enumerate(tensors):
        if len(t.planes) < 2:
            continue
        step = region // t.itemsize
        for start in range(0, t.numel, step):
            n = min(step, t.numel - start)
            if current and used + n * t.itemsize > region:
                batches.append(tuple(current))
                current, used = [], 0
            current.append(Piece(i, start, n, used))
            used = _align(used + n * t.itemsize, STAGING_ALIGNMENT)
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
    return sum(_align(n, STAGING_ALIGNMENT) for n in sizes)


def region_nbytes(merge_nbytes: int) -> int:
    """Bytes of one scratch region for a unit with `merge_nbytes` of multi-plane tensors (0: no
    merges at all): all of them in one batch, up to MERGE_CHUNK_NBYTES."""
    return min(MERGE_CHUNK_NBYTES, merge_nbytes)
