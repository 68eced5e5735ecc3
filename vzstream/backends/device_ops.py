"""The torch calls of the CUDA backend that move bytes, each issued on the current stream:
staging a frame, host→device copies, plane merges, the nibble expansion. Plain functions over
tensors, so they run (and are tested) on CPU tensors too; `cuda.py` decides the streams and
events around them. Every one keeps its GIL hand-overs few: each torch call hands the GIL over,
and on a busy host winning it back is what an upload waits for (docs/benchmarks.md)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.autograd import profiler

from .. import codec, decode
from .upload_plan import Coded


def stage_range(stage: str, fqn: str):
    """Profiler range `vzstream.<stage>:<fqn>`; none while no profiler runs (it would cost ~8 us)."""
    if getattr(profiler, "_is_profiler_enabled", True):
        return profiler.record_function(f"vzstream.{stage}:{fqn}")
    return contextlib.nullcontext()


def stage_into(buffer: np.ndarray, offset: int, nbytes: int, source, fqn: str = "") -> None:
    """Write one staging item (a frame, or raw bytes) into `buffer[offset : offset + nbytes]`.
    `buffer` is a numpy view of the staging tensor: torch's view ops (detach, reshape, view) each
    hand the GIL over, which beside a busy forward thread costs a wait per call; numpy slices
    do not, so a frame costs one hand-over, inside zstd (docs/probes/gil_release.py)."""
    with stage_range("decode", fqn):
        dst = buffer[offset : offset + nbytes]
        if isinstance(source, codec.Frame):
            decode.decode_frame_into(source, dst)
        else:
            dst[:] = np.frombuffer(source, dtype=np.uint8)


def _copy_many(pairs: list) -> None:
    """(dst, src) copies on the current stream in ONE Python call. Each torch call hands the GIL
    over and must win it back, which, beside a forward thread running model Python and a pool of
    decode workers, cost the upload ~56 us per call on an H100 host (docs/benchmarks.md): a
    call per copy made issuing one unit's upload take 7 ms."""
    foreach = getattr(torch, "_foreach_copy_", None)      # torch >= 2.1's optimizers use it
    if foreach is None or len(pairs) < 2:
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
    else:
        foreach([d for d, _ in pairs], [s for _, s in pairs], non_blocking=True)


def upload_many(pairs: list) -> None:
    """Host→device copies; from pinned host memory they do not block the host."""
    _copy_many(pairs)


def merge_many(pairs: list) -> None:
    """Device copies that interleave planes (see `merge_pairs`)."""
    _copy_many(pairs)


def merge_pairs(dst: torch.Tensor, planar: torch.Tensor, numel: int, itemsize: int) -> list:
    """(dst, src) copies that write `numel` elements whose byte planes lie in `planar` as
    [itemsize, numel] (plane i = byte i of each little-endian element) into `dst`, a uint8 view
    of numel * itemsize bytes: plane i goes to every itemsize-th byte from byte i. Slices only,
    no view ops: a slice takes no GIL hand-over."""
    return [(dst[i::itemsize], planar[i * numel : (i + 1) * numel]) for i in range(itemsize)]


def expand_codes(views: tuple, layout: Coded) -> None:
    """On the current stream: a batch's nibble codes into its coded plane area, two plane bytes
    per code byte through the pair table, then its patches (`coded_views` made the views)."""
    codes, index, table, out, plane, at, values = views
    index.copy_(codes)                                   # index_select wants int32 indices
    torch.index_select(table, 0, index, out=out)
    if layout.patch_at.size:
        # unsafe=True: no range check on the device, which under deterministic algorithms reads
        # `index.max()` back to the host, a sync; the plan checked the offsets (`nibble.check`).
        _index_put(plane, (at,), values, False, True)


_index_put = getattr(torch, "_index_put_impl_", None) or (lambda t, idx, v, acc, unsafe: t.index_put_(idx, v, acc))


def coded_views(region: torch.Tensor, layout: Coded) -> tuple:
    """The views `expand_codes` works on, made once per (region, batch): a view op hands the
    GIL over."""
    half, plane = layout.span // 2, region[layout.plane * layout.span : (layout.plane + 1) * layout.span]
    count = layout.patch_at.size
    return (region[layout.codes : layout.codes + half], region[layout.index : layout.index + 4 * half].view(torch.int32),
            region[layout.table : layout.table + 512].view(torch.int16), plane.view(torch.int16), plane,
            region[layout.patches : layout.patches + 8 * count].view(torch.int64),
            region[layout.patches + 8 * count : layout.nbytes])


def interleave(dst: torch.Tensor, planar: torch.Tensor, numel: int, itemsize: int) -> None:
    """`merge_pairs`, run on the current stream."""
    merge_many(merge_pairs(dst, planar, numel, itemsize))
