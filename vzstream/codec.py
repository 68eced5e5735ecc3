"""Codec: pack a tensor into byte planes of independent zstd frames (`decode.py` reads them back).

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
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zstandard as zstd

from . import nibble
from .errors import ConfigError

__all__ = ["Frame", "Plane", "Packed", "pack", "nibble_tables", "Codec", "CODECS", "CODINGS",
           "parse_codec", "check_level", "MIN_LEVEL", "MAX_LEVEL"]


class Codec(str, enum.Enum):
    """How split planes are stored: `SessionConfig.codec`, `pack(coding=...)`. A str, so
    `Codec.ZSTD == "zstd"` and a plain string works wherever a Codec is expected."""

    ZSTD = "zstd"      # the least host RAM; host threads decode the frames
    NIBBLE = "nibble"  # the top plane as 4-bit codes the device expands; no host decode, more host RAM
    AUTO = "auto"      # a session's default: NIBBLE on CUDA, ZSTD on the CPU backend (`resolve`)

    def resolve(self, backend_name: str) -> "Codec":
        """AUTO for a backend: the GPU decodes on CUDA (the bus, not host threads, sets the pace);
        the CPU backend has no bus, so the least host RAM wins. Other codecs stay as they are."""
        if self is not Codec.AUTO:
            return self
        return Codec.NIBBLE if backend_name == "cuda" else Codec.ZSTD

    # Without these, f"{Codec.ZSTD}" is "Codec.ZSTD" on Python 3.11+ (no StrEnum on 3.10).
    __str__ = str.__str__
    __format__ = str.__format__


CODECS = tuple(c.value for c in Codec)
CODINGS = (Codec.ZSTD.value, Codec.NIBBLE.value)   # what `pack` codes with (AUTO resolves to one first)

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
    """`"auto"` | `"zstd"` | `"nibble"` (or a Codec) -> the Codec; else ConfigError saying what each trades."""
    try:
        return Codec(value)
    except (ValueError, TypeError):
        raise ConfigError(
            f"`{name}` must be one of {CODECS}; got {value!r}. \"zstd\" stores the least host RAM and "
            f"host threads decode it; \"nibble\" stores 4-bit codes that the device expands (more host RAM, "
            f"no host decode); \"auto\" (the default) is nibble on CUDA and zstd on the CPU.") from None


def check_level(level: Any) -> None:
    """`level` is None or an int zstd level in [MIN_LEVEL, MAX_LEVEL]; else ConfigError."""
    if level is not None and (not isinstance(level, int) or isinstance(level, bool)
                              or not MIN_LEVEL <= level <= MAX_LEVEL):
        raise ConfigError(f"`level` must be None or an int zstd level in [{MIN_LEVEL}, {MAX_LEVEL}]; "
                          f"got {level!r}. Leave it None for the default (match finding off).")


def _check_pack_args(level: int | None, frame_nbytes: int, coding: str) -> None:
    coding = parse_codec(coding, "coding")
    if coding == Codec.AUTO:
        raise ConfigError("`coding` must be \"zstd\" or \"nibble\" for `pack`; \"auto\" depends on the "
                          "backend: resolve it first (`Codec.AUTO.resolve(backend.name)`)")
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
