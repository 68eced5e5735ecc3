"""Codec: pack a tensor into byte planes of independent zstd frames, decode it back bit-exactly.

Layout of a `Packed` (see docs/design.md, "Codec"):

- Floating dtypes are *split*: `itemsize` planes, plane `i` holds bits [8i, 8i+8) of each
  element's integer value (byte `i` on little-endian hosts; bf16/fp16: plane 1 = `hi`, plane 0 =
  `lo`). `plane.nbytes == numel`: one byte per element, so plane byte offset == element index.
- Every other dtype (bool, ints, complex, ...) is *unsplit*: one plane, index 0, holding the
  tensor's raw bytes (`plane.nbytes == numel * itemsize`), always stored raw.
- A split plane is compressed only if its frames shrink it by >= 5%; otherwise it is raw.
- `coding="nibble"` codes the top plane of a multi-byte float as 4-bit codes instead of zstd
  frames (`nibble.py`), by the same 5% rule, and keeps the other planes raw: a device decodes
  it, the host does not have to.
- A compressed plane is cut into frames of `frame_elems` elements; frame `j` covers elements
  [j * frame_elems, min((j + 1) * frame_elems, numel)) in every plane, so chunk `j` of all
  planes can be decoded alone, on any thread, into its own slice of `out`.
- Each frame is one zstd frame with content size and checksum, so a flipped byte, a truncated
  frame or a frame of the wrong length is a `FormatError`, never wrong numbers.
- Raw planes and nibble codes carry no checksum of their own (streaming reads them as they are,
  and on CUDA only the device sees them), so `Packed.crc32` records the whole tensor's: `decode`,
  which restoring a parameter runs, checks it, and a session never puts back a changed weight.
- Decoding reads frame data and raw planes through the buffer protocol only: a store may swap
  them for memoryviews into one arena (`dataclasses.replace`).
"""

from __future__ import annotations

import enum
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import zstandard as zstd

from vzstream import nibble
from vzstream.errors import ConfigError, FormatError

__all__ = ["Frame", "Plane", "Packed", "pack", "decode", "decode_into", "decode_chunk_into",
           "chunk_decoder", "decode_frame_into", "nibble_tables", "Codec", "CODECS", "CODINGS",
           "parse_codec", "check_level", "MIN_LEVEL", "MAX_LEVEL"]


class Codec(str, enum.Enum):
    """How split planes are stored: `SessionConfig.codec`, `pack(coding=...)`. A str, so
    `Codec.ZSTD == "zstd"` and a plain string works wherever a Codec is expected."""

    ZSTD = "zstd"      # the least host RAM; host threads decode the frames
    NIBBLE = "nibble"  # the top plane as 4-bit codes the device expands; no host decode, more host RAM

    # Without these, f"{Codec.ZSTD}" is "Codec.ZSTD" on Python 3.11+ (no StrEnum on 3.10).
    __str__ = str.__str__
    __format__ = str.__format__


CODECS = tuple(c.value for c in Codec)
CODINGS = CODECS   # the older name, still imported by callers and tests

# One range of zstd levels everywhere (pack, SessionConfig). zstd accepts down to -131072, but
# its fast modes barely shrink byte planes there: a bf16 top plane of N(0, 0.02) weights keeps
# 0.80 of its size at -7, 0.91 at -20 and 0.99 at -100, where the 5% rule stores it raw anyway.
MIN_LEVEL = -7
MAX_LEVEL = 22   # zstd.MAX_COMPRESSION_LEVEL

# A plane must shrink by at least this much to be worth a decode; else it is stored raw.
_MIN_SAVING = 0.05

# Integer views used to split / merge planes with shifts (numeric, so independent of byte order).
_TORCH_UINT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

# Match finding off: these planes have no long repeats, so matching costs ratio *and* speed.
# window_log 17 keeps blocks at 128 KiB; smaller blocks decode ~4x slower (docs/design.md, "Codec").
_FAST_PARAMS = zstd.ZstdCompressionParameters.from_level(
    1, strategy=zstd.STRATEGY_FAST, window_log=17, hash_log=6, chain_log=6, search_log=1,
    min_match=7, write_content_size=True, write_checksum=True)


@dataclass(frozen=True)
class Frame:
    start: int  # offset of the frame's first byte within its plane (== first element index)
    nbytes: int  # decoded size in bytes
    data: Any  # buffer: one zstd frame with content size and checksum


@dataclass(frozen=True)
class Plane:
    index: int  # which byte of each element (0 = least significant)
    nbytes: int  # numel for split dtypes, numel * itemsize for the single unsplit plane
    raw: Any | None  # buffer with the plane's bytes when stored raw, else None
    frames: tuple[Frame, ...]  # zstd frames when raw is None and not nibble-coded, else ()
    nibbles: nibble.Nibbles | None = None  # the nibble code instead of frames

    @property
    def compressed(self) -> bool:
        return self.raw is None

    def buffers(self) -> list:
        """Every buffer the plane holds, in a fixed order (a store rebases them into its arena)."""
        if self.raw is not None:
            return [self.raw]
        return self.nibbles.buffers() if self.nibbles is not None else [f.data for f in self.frames]


@dataclass(frozen=True)
class Packed:
    dtype: torch.dtype
    shape: torch.Size
    planes: tuple[Plane, ...]
    frame_elems: int
    crc32: int | None = None  # zlib.crc32 of the tensor's bytes as packed; None: not recorded

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def split(self) -> bool:
        """True for byte planes (floating dtypes), False for one plane of raw bytes."""
        return _is_split(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held in RAM: raw planes plus compressed frame data."""
        return sum(_buffer_nbytes(b) for p in self.planes for b in p.buffers())

    @property
    def raw_nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def ratio(self) -> float:
        return self.raw_nbytes / self.nbytes if self.nbytes else 1.0

    @property
    def num_chunks(self) -> int:
        return -(-self.numel // self.frame_elems)


def _is_split(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize in _NUMPY_UINT


def _buffer_nbytes(buf: Any) -> int:
    # len() of a memoryview counts items, not bytes; .nbytes is right for any format.
    return memoryview(buf).nbytes


def _describe(packed: Packed) -> str:
    return f"packed {packed.dtype} tensor of shape {tuple(packed.shape)}"


# --- pack ------------------------------------------------------------------------------------


# Plane bytes per frame. docs/design.md, "Codec" says ~1 MiB; 4 MiB decodes as fast on one thread and hands
# the GIL back a quarter as often per byte, which is what limits decode threads while the
# forward thread runs Python (docs/benchmarks.md, "decode threads and the GIL").
FRAME_NBYTES = 4 << 20


def pack(tensor: torch.Tensor, *, level: int | None = None, frame_nbytes: int = FRAME_NBYTES,
         compress: bool = True, coding: str = Codec.ZSTD, tables: dict | None = None) -> Packed:
    """Pack `tensor` (any dtype, shape, strides or device) into compressed byte planes.

    `level=None` uses match-finding-off parameters (docs/design.md, "Codec"); an int uses zstd's `level`.
    `frame_nbytes` is the plane bytes per frame, i.e. elements per frame (also the chunk a
    worker decodes). `compress=False` keeps every plane raw: the same layout, nothing to decode.
    `coding="nibble"` codes planes with the nibble code; `tables` maps (dtype, plane index) to
    the 16 values to code with (`nibble_tables`), so a unit's tensors share one table.
    """
    _check_pack_args(level, frame_nbytes, coding)
    flat = _flat_cpu(tensor)
    crc = _crc32(flat)                                   # ~6 GB/s, a fraction of the packing
    k = tensor.dtype.itemsize
    if not _is_split(tensor.dtype):
        raw = flat.view(torch.uint8).numpy().tobytes()
        planes = (Plane(index=0, nbytes=len(raw), raw=raw, frames=()),)
    else:
        params = _FAST_PARAMS if level is None else zstd.ZstdCompressionParameters.from_level(
            level, write_content_size=True, write_checksum=True)
        cctx = zstd.ZstdCompressor(compression_params=params)
        values = flat.view(_TORCH_UINT[k]).numpy().view(_NUMPY_UINT[k])
        if not compress:
            planes = tuple(_pack_plane(None, values, i, frame_nbytes) for i in range(k))
        elif coding == Codec.NIBBLE:    # the top plane only: the others are mantissa noise, kept raw
            planes = tuple(_nibble_plane(values, i, (tables or {}).get((tensor.dtype, i))) if i == k - 1 > 0
                           else _pack_plane(None, values, i, frame_nbytes) for i in range(k))
        else:
            planes = tuple(_pack_plane(cctx, values, i, frame_nbytes) for i in range(k))
    return Packed(dtype=tensor.dtype, shape=tensor.shape, planes=planes, frame_elems=frame_nbytes, crc32=crc)


def _flat_cpu(tensor: torch.Tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"`tensor` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        raise ConfigError(f"`tensor` must be a dense tensor with data, got layout "
                          f"{tensor.layout} on {tensor.device}; materialise it first")
    # resolve_* materialise lazy conj/neg bits, which a byte view would silently ignore.
    t = tensor.detach().resolve_conj().resolve_neg()
    return t.to("cpu").contiguous().reshape(-1)


def _crc32(t: torch.Tensor) -> int:
    """zlib.crc32 of a contiguous CPU tensor's bytes (the check `decode` makes against `pack`)."""
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())


def parse_codec(value: Any, name: str = "codec") -> Codec:
    """`"zstd"` | `"nibble"` (or a Codec) -> the Codec; else ConfigError saying what each trades."""
    try:
        return Codec(value)
    except (ValueError, TypeError):
        raise ConfigError(
            f"`{name}` must be one of {CODECS}; got {value!r}. \"zstd\" stores the least host RAM and "
            f"host threads decode it; \"nibble\" stores 4-bit codes that the device expands (more host RAM, "
            f"no host decode). Pass {name}=\"zstd\" (the default) or {name}=\"nibble\".") from None


def check_level(level: Any) -> None:
    """`level` is None or an int zstd level in [MIN_LEVEL, MAX_LEVEL]; else ConfigError."""
    if level is not None and (not isinstance(level, int) or isinstance(level, bool)
                              or not MIN_LEVEL <= level <= MAX_LEVEL):
        raise ConfigError(f"`level` must be None or an int zstd level in [{MIN_LEVEL}, {MAX_LEVEL}]; "
                          f"got {level!r}. Leave it None for the default (match finding off).")


def _check_pack_args(level: int | None, frame_nbytes: int, coding: str) -> None:
    coding = parse_codec(coding, "coding")
    if coding == Codec.NIBBLE and isinstance(frame_nbytes, int) and frame_nbytes % 2:
        raise ConfigError(f"`frame_nbytes` must be even with coding='nibble' (a code byte holds two "
                          f"elements), got {frame_nbytes}")
    check_level(level)
    if not isinstance(frame_nbytes, int) or isinstance(frame_nbytes, bool) or frame_nbytes < 1:
        raise ConfigError(f"`frame_nbytes` must be an int >= 1, got {frame_nbytes!r}; "
                          f"the default is {FRAME_NBYTES} ({FRAME_NBYTES >> 20} MiB)")


def _pack_plane(cctx: zstd.ZstdCompressor | None, values: np.ndarray, index: int,
                frame_elems: int) -> Plane:
    """Plane `index` of `values`: compressed frames, or raw if they would not save enough (or
    there is no `cctx`)."""
    if cctx is None:
        return Plane(index=index, nbytes=values.size, raw=_plane_piece(values, index).tobytes(), frames=())
    pieces, frames = [], []
    for start in range(0, values.size, frame_elems):
        piece = _plane_piece(values[start:start + frame_elems], index)
        pieces.append(piece)
        frames.append(Frame(start=start, nbytes=piece.size, data=cctx.compress(piece)))
    packed_nbytes = sum(len(f.data) for f in frames)
    if values.size and packed_nbytes <= (1 - _MIN_SAVING) * values.size:
        return Plane(index=index, nbytes=values.size, raw=None, frames=tuple(frames))
    return Plane(index=index, nbytes=values.size, raw=b"".join(pieces), frames=())


def _nibble_plane(values: np.ndarray, index: int, table: np.ndarray | None) -> Plane:
    """Plane `index` nibble-coded, or raw if the code would not save enough."""
    piece = _plane_piece(values, index)
    nib = nibble.encode(piece, table)
    if values.size and nibble.nbytes(nib) <= (1 - _MIN_SAVING) * values.size:
        return Plane(index=index, nbytes=values.size, raw=None, frames=(), nibbles=nib)
    return Plane(index=index, nbytes=values.size, raw=piece.tobytes(), frames=())


def nibble_tables(tensors) -> dict:
    """(dtype, top plane index) -> its 16 most frequent values over all of `tensors` (a sample of
    each, weighted by its size): the table a
    unit's tensors share, so the device decodes many of them in one gather. Lower planes (mantissa
    noise) get no entry; each codes with its own table, which rarely saves enough to be kept."""
    counts: dict = {}
    for t in tensors:
        if not _is_split(t.dtype) or not t.numel():
            continue
        k = t.dtype.itemsize
        values = nibble.sample(_flat_cpu(t).view(_TORCH_UINT[k]).numpy().view(_NUMPY_UINT[k]))
        key = (t.dtype, k - 1)
        # Weighted by the tensor's size: a sample of a large tensor stands for more elements.
        counts[key] = counts.get(key, 0) + np.bincount(_plane_piece(values, k - 1), minlength=256) * (t.numel() / values.size)
    return {key: nibble.table_for(c) for key, c in counts.items()}


def _plane_piece(values: np.ndarray, index: int) -> np.ndarray:
    """Byte `index` of each element, as a contiguous uint8 array."""
    shifted = values >> values.dtype.type(8 * index) if index else values
    return shifted.astype(np.uint8)  # unsafe cast keeps the low 8 bits


# --- decode ----------------------------------------------------------------------------------

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


def decode(packed: Packed) -> torch.Tensor:
    """A new contiguous CPU tensor, bit-identical to the packed one: checked against the
    tensor's `crc32`, so a corrupt raw plane or nibble code is a FormatError here too."""
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
