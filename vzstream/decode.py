"""Decode: a packed tensor (`codec.Packed`) back into its bytes, bit-exactly, checking all of it.

A chunk `j` of every plane decodes alone, on any thread, into its own slice of `out`; a whole
decode also checks the tensor's crc32, so a corrupt raw plane or nibble code is a FormatError.
Frame data and raw planes are read through the buffer protocol only.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import torch
import zstandard as zstd

from . import nibble
from .codec import Frame, Packed, _NUMPY_UINT, _TORCH_UINT, _crc32, _describe
from .errors import ConfigError, FormatError
from .image import ImageTensor

# One decompressor and one frame of scratch per thread: a ZstdDecompressor must not be shared
# across threads, and reusing the scratch keeps the per-chunk temporary at one frame.
_local = threading.local()


def _thread_state(scratch_nbytes: int) -> tuple[zstd.ZstdDecompressor, np.ndarray]:
    if not hasattr(_local, "dctx"):
        _local.dctx = zstd.ZstdDecompressor()
        _local.scratch = np.empty(0, np.uint8)
    if _local.scratch.size < scratch_nbytes:
        _local.scratch = np.empty(scratch_nbytes, np.uint8)
    return _local.dctx, _local.scratch


def thread_scratch(nbytes: int) -> np.ndarray:
    """This thread's reusable byte buffer, at least `nbytes` long (chunk decodes use it too)."""
    return _thread_state(nbytes)[1]


def decode(packed: Packed | ImageTensor) -> torch.Tensor:
    """A new contiguous CPU tensor, bit-identical to the packed one: checked against the
    tensor's `crc32`, so a corrupt raw plane or nibble code is a FormatError here too."""
    if isinstance(packed, ImageTensor):
        return packed.decode()
    out = torch.empty(packed.shape, dtype=packed.dtype)
    decode_into(packed, out)
    if packed.crc32 is not None:
        crc = _crc32(out)
        if crc != packed.crc32:
            raise FormatError(f"{_describe(packed)}: the decoded bytes have crc32 {crc:#010x}, "
                              f"{packed.crc32:#010x} was recorded when packing: a raw plane or "
                              f"nibble code is corrupt")
    return out


def decode_into(packed: Packed, out: torch.Tensor) -> None:
    """Decode every chunk into `out` (contiguous CPU tensor, same dtype and numel)."""
    view = _out_view(packed, out)
    for j in range(packed.num_chunks):
        _decode_chunk(packed, j, view)


def decode_chunk_into(packed: Packed, j: int, out: torch.Tensor) -> None:
    """Decode elements [j * frame_elems, (j + 1) * frame_elems) of all planes into `out`.

    Chunks are independent: threads may decode different chunks into one `out` concurrently.
    """
    chunk_decoder(packed, out)(j)


def chunk_decoder(packed: Packed, out: torch.Tensor) -> Callable[[int], None]:
    """`decode_chunk_into(packed, j, out)` as a function of `j`, with `out` checked and viewed
    once: torch's view ops each hand the GIL over (docs/probes/gil_release.py), a cost per chunk
    that a decode worker beside a busy forward thread pays in waits."""
    view = _out_view(packed, out)

    def decode_chunk(j: int) -> None:
        if not isinstance(j, int) or not 0 <= j < packed.num_chunks:
            raise ConfigError(f"`j` must be a chunk index in [0, {packed.num_chunks}), got {j!r}")
        _decode_chunk(packed, j, view)

    return decode_chunk


def decode_frame_into(frame: Frame, dst: Any) -> None:
    """Decode one frame into `dst`: a writable contiguous buffer of exactly `frame.nbytes`."""
    view = _dst_view(frame, dst)
    dctx, _ = _thread_state(0)
    try:
        _decode_frame(dctx, frame, view)
    except FormatError as e:
        raise FormatError(f"frame at plane offset {frame.start} ({frame.nbytes} bytes): {e}") from e


def _out_view(packed: Packed, out: torch.Tensor) -> np.ndarray:
    """`out` as a flat numpy array: uintN values when split, raw bytes when unsplit."""
    _check_packed(packed)
    if (not isinstance(out, torch.Tensor) or out.device.type != "cpu"
            or out.dtype != packed.dtype or out.numel() != packed.numel
            or not out.is_contiguous()):
        got = (f"{out.dtype} tensor of shape {tuple(out.shape)} on {out.device}, contiguous="
               f"{out.is_contiguous()}" if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ConfigError(f"`out` must be a contiguous CPU {packed.dtype} tensor with "
                          f"{packed.numel} elements, got {got}; allocate it with torch.empty")
    flat = out.detach().reshape(-1)
    if packed.split:
        k = packed.itemsize
        return flat.view(_TORCH_UINT[k]).numpy().view(_NUMPY_UINT[k])
    return flat.view(torch.uint8).numpy()


def _dst_view(frame: Frame, dst: Any) -> memoryview:
    if isinstance(dst, torch.Tensor):
        if dst.device.type != "cpu" or not dst.is_contiguous():
            raise ConfigError(f"`dst` must be a contiguous CPU tensor, got one on {dst.device}, "
                              f"contiguous={dst.is_contiguous()}")
        dst = dst.detach().reshape(-1).view(torch.uint8).numpy()
    try:
        view = memoryview(dst).cast("B")  # byte-indexed, so partial reads can be resumed
    except TypeError as e:  # not a contiguous buffer
        raise ConfigError(f"`dst` must be a writable contiguous buffer, got {type(dst).__name__}: "
                          f"{e}") from e
    if view.readonly or view.nbytes != frame.nbytes:
        raise ConfigError(f"`dst` must be a writable buffer of exactly {frame.nbytes} bytes "
                          f"(frame.nbytes), got {view.nbytes} bytes, readonly={view.readonly}")
    return view


def _check_packed(packed: Packed) -> None:
    """Per-call structure checks; per-plane checks happen chunk by chunk in `_plane_chunk`."""
    expected = packed.itemsize if packed.split else 1
    if len(packed.planes) != expected or packed.frame_elems < 1:
        raise FormatError(f"{_describe(packed)}: expected {expected} planes and frame_elems >= 1, "
                          f"got {len(packed.planes)} planes and frame_elems={packed.frame_elems}")


def _decode_chunk(packed: Packed, j: int, view: np.ndarray) -> None:
    e0 = j * packed.frame_elems
    e1 = min(e0 + packed.frame_elems, packed.numel)
    dctx, scratch = _thread_state(e1 - e0 if packed.split else 0)
    if not packed.split:
        k = packed.itemsize
        np.copyto(view[e0 * k:e1 * k], _plane_chunk(packed, 0, j, e0 * k, e1 * k, dctx, scratch))
        return
    # Horner merge, top byte first: out = ((p[k-1] << 8 | p[k-2]) << 8 | ...) | p[0]. One plane
    # is live at a time, so one frame of scratch suffices; numpy ufuncs release the GIL.
    out = view[e0:e1]
    top = packed.itemsize - 1
    for i in range(top, -1, -1):
        src = _plane_chunk(packed, i, j, e0, e1, dctx, scratch)
        if i == top:
            np.left_shift(src, 8 if i else 0, out=out, dtype=out.dtype)
        else:
            np.bitwise_or(out, src, out=out)
            if i:
                np.left_shift(out, 8, out=out)


def _plane_chunk(packed: Packed, i: int, j: int, b0: int, b1: int,
                 dctx: zstd.ZstdDecompressor, scratch: np.ndarray) -> np.ndarray:
    """Bytes [b0, b1) of plane `i` (chunk `j`): a view of the raw plane or decoded into scratch."""
    plane = packed.planes[i]
    expected = packed.numel if packed.split else packed.raw_nbytes
    if plane.index != i or plane.nbytes != expected:
        raise _plane_error(packed, i, f"expected index {i} and {expected} bytes, got index "
                                      f"{plane.index} and {plane.nbytes} bytes")
    if plane.raw is not None:
        raw = np.frombuffer(plane.raw, np.uint8)
        if raw.size != plane.nbytes or plane.frames:
            raise _plane_error(packed, i, f"raw plane holds {raw.size} bytes and "
                                          f"{len(plane.frames)} frames, expected {plane.nbytes} "
                                          f"bytes and no frames")
        return raw[b0:b1]
    if plane.nibbles is not None:
        if plane.frames or not packed.split:
            raise _plane_error(packed, i, "holds both nibble codes and frames, or is unsplit")
        dst = scratch[:b1 - b0]
        try:
            nibble.decode_range(plane.nibbles, plane.nbytes, b0, b1, dst)
        except FormatError as e:
            raise _plane_error(packed, i, str(e), j) from e
        return dst
    expected = packed.num_chunks if packed.split else 0  # unsplit planes are never compressed
    if len(plane.frames) != expected:
        raise _plane_error(packed, i, f"has {len(plane.frames)} frames, expected {expected} "
                                      f"(frames must tile the plane)")
    frame = plane.frames[j]
    if frame.start != b0 or frame.nbytes != b1 - b0:
        raise _plane_error(packed, i, f"covers bytes [{frame.start}, {frame.start + frame.nbytes})"
                                      f", expected [{b0}, {b1})", j)
    dst = scratch[:b1 - b0]
    try:
        _decode_frame(dctx, frame, memoryview(dst))
    except FormatError as e:
        raise _plane_error(packed, i, str(e), j) from e
    return dst


def _plane_error(packed: Packed, i: int, problem: str, j: int | None = None) -> FormatError:
    where = f"plane {i}" if j is None else f"plane {i} frame {j}"
    return FormatError(f"{_describe(packed)}, {where}: {problem}")


def _decode_frame(dctx: zstd.ZstdDecompressor, frame: Frame, dst: memoryview) -> None:
    """Decode `frame` into `dst` (a byte memoryview of exactly frame.nbytes), checking all of it."""
    nbytes = frame.nbytes
    try:
        content_nbytes = zstd.frame_content_size(frame.data)
        if content_nbytes != nbytes:
            raise FormatError(f"frame header records {content_nbytes} bytes, expected {nbytes}")
        reader = dctx.stream_reader(frame.data)  # reads the buffer in place, no input copy
        total = 0
        while total < nbytes:  # readinto may return short reads; 0 means the input ended
            got = reader.readinto(dst[total:])
            if not got:
                break
            total += got
        if total != nbytes:
            raise FormatError(f"frame is truncated: decoded {total} of {nbytes} bytes")
        # Reading on to EOF consumes the frame's checksum (verified here) and catches trailing
        # data that is a further frame or garbage.
        if reader.read(1):
            raise FormatError(f"frame holds more than {nbytes} bytes")
    except zstd.ZstdError as e:
        raise FormatError(f"zstd rejected the frame: {e}") from e
