"""Decode on the host: one zstd frame (`codec.Frame`) into a caller's buffer, checking all of it;
and `decode`, a tensor of a wire image back whole (`ImageTensor.decode`, crc32 checked).

Frames decode on any thread, each with this thread's decompressor; frame data is read through
the buffer protocol only, in place (a view into the image's arena).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
import zstandard as zstd

from .codec import Frame
from .errors import ConfigError, FormatError
from .image import ImageTensor

# One decompressor and one buffer of scratch per thread: a ZstdDecompressor must not be shared
# across threads, and reusing the scratch keeps a decode's temporary at one frame.
_local = threading.local()


def _thread_state(scratch_nbytes: int) -> tuple[zstd.ZstdDecompressor, np.ndarray]:
    if not hasattr(_local, "dctx"):
        _local.dctx = zstd.ZstdDecompressor()
        _local.scratch = np.empty(0, np.uint8)
    if _local.scratch.size < scratch_nbytes:
        _local.scratch = np.empty(scratch_nbytes, np.uint8)
    return _local.dctx, _local.scratch


def thread_scratch(nbytes: int) -> np.ndarray:
    """This thread's reusable byte buffer, at least `nbytes` long (a frame decodes into it)."""
    return _thread_state(nbytes)[1]


def decode(tensor: ImageTensor) -> torch.Tensor:
    """A new contiguous CPU tensor, bit-identical to the packed one (`ImageTensor.decode`: its
    crc32 is checked, so a corrupt low plane, nibble code or raw byte is a FormatError too)."""
    if not isinstance(tensor, ImageTensor):
        raise ConfigError(f"`tensor` must be an image.ImageTensor (from `image.pack_image`), "
                          f"got {type(tensor).__name__}")
    return tensor.decode()


def decode_frame_into(frame: Frame, dst: Any) -> None:
    """Decode one frame into `dst`: a writable contiguous buffer of exactly `frame.nbytes`."""
    view = _dst_view(frame, dst)
    dctx, _ = _thread_state(0)
    try:
        _decode_frame(dctx, frame, view)
    except FormatError as e:
        raise FormatError(f"frame at plane offset {frame.start} ({frame.nbytes} bytes): {e}") from e


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
