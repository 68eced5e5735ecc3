"""The wire image: one unit laid out once, in its arena, in the order a device needs it, so an
upload is at most two copies per chunk whatever the unit's tensor count.

A slot holds the unit's *lane* first: its floats of one itemsize k (the one with the most bytes:
bf16 / fp16 in a bf16 model, fp32 in an fp32 one), each at an aligned offset; then every other
tensor. The lane, padding included, is read as one array of k-byte elements and cut into
chunks of at most CHUNK_NBYTES of output. Each chunk travels as

    nibble (k = 2):  [pairs (512) | lo (n) | codes (n / 2) | pad to 8 | patch_at (int64, p) | patch_values (p)]
    zstd:            [planes 0 .. k-2 (n bytes each) | zstd frames of plane k-1]

nibble: `lo` is the elements' low bytes, `codes` their top bytes in the nibble code of the
unit's one table (`nibble.py`; `pairs` decodes it, in every chunk so each chunk expands alone,
as soon as it lands); the patches, indices within the chunk, are the top bytes the table misses.
zstd: the low planes travel raw from the arena; host threads decode the top plane's frames (of
`codec.FRAME_NBYTES` elements) into staging, and the device merges the k planes. The rest of the
slot travels as it lies in the slot (the *raw area*): one more copy. A unit whose code would not
save 5%, or under SMALL_UNIT_NBYTES (`store.py`), is all raw area.

Each tensor stays locatable (`ImageTensor`): restoring on exit decodes tensor by tensor, on the
host, checked against the crc32 recorded when packing.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import zstandard as zstd

from . import codec, nibble
from .errors import FormatError
from .units import align

CHUNK_NBYTES = 32 << 20     # output bytes per chunk: copied at full bus speed, a bounded landing buffer
PAIRS_NBYTES = 512
_MIN_SAVING = 0.05          # an image that saves less is not worth decoding: stored raw
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def chunk_elems(itemsize: int) -> int:
    return CHUNK_NBYTES // itemsize


def landing_nbytes(coding: str, itemsize: int, numel: int) -> int:
    """Bytes of a device landing buffer for a lane of `numel` elements (at most a chunk's):
    known before packing, so the budget counts it. A nibble unit with a chunk that would not fit
    (crowded with patches) is not coded; a zstd chunk lands decoded, k bytes an element."""
    numel = min(numel, chunk_elems(itemsize))
    return PAIRS_NBYTES + 8 + 2 * numel if coding == codec.Codec.NIBBLE else itemsize * numel


@dataclass(frozen=True)
class Chunk:
    start: int              # first element of the lane it covers
    numel: int              # elements (even for nibble: a code byte is never shared)
    offset: int             # arena offset of its bytes
    patches: int = 0        # nibble: how many top bytes the table misses
    frames: tuple = ()      # zstd: the top plane's frames (`codec.Frame`, start within the chunk)

    @property
    def codes_at(self) -> int:        # nibble offsets within the chunk's bytes
        return PAIRS_NBYTES + self.numel

    @property
    def codes_nbytes(self) -> int:    # an odd last element's code byte has an unused high nibble
        return (self.numel + 1) // 2

    @property
    def patch_at(self) -> int:
        return align(self.codes_at + self.codes_nbytes, 8)

    def nbytes(self, itemsize: int) -> int:
        """Its bytes in the arena (and, nibble, on the bus)."""
        if self.frames:
            return (itemsize - 1) * self.numel + sum(memoryview(f.data).nbytes for f in self.frames)
        return self.patch_at + 9 * self.patches


@dataclass(frozen=True, eq=False)
class Image:
    arena: torch.Tensor     # uint8 host buffer: the chunks, then the raw area
    coding: str | None      # "nibble", "zstd", or None: all raw area
    itemsize: int           # k: bytes of a lane element
    coded_nbytes: int       # slot bytes [0, coded_nbytes) come from the chunks
    chunks: tuple[Chunk, ...]
    raw_offset: int         # arena offset of slot bytes [coded_nbytes, coded_nbytes + raw_nbytes)
    raw_nbytes: int
    host: np.ndarray        # the arena as numpy, made once: slicing it costs no torch call (a GIL
                            # hand-over each) in the host decode jobs that read it

    @property
    def wire_nbytes(self) -> int:
        """Bytes one upload moves host→device (zstd: the top plane decoded)."""
        if self.coding == codec.Codec.NIBBLE:
            return sum(c.nbytes(2) for c in self.chunks) + self.raw_nbytes
        return self.coded_nbytes + self.raw_nbytes

    @property
    def frames(self) -> list:
        return [f for c in self.chunks for f in c.frames]

    def wire(self, c: Chunk) -> np.ndarray:
        return self.host[c.offset : c.offset + c.nbytes(self.itemsize)]

    def low_planes(self, c: Chunk) -> np.ndarray:
        """zstd: planes 0 .. k-2 of chunk `c`, [k - 1, n] uint8."""
        return self.wire(c)[: (self.itemsize - 1) * c.numel].reshape(self.itemsize - 1, c.numel)

    def nibble_views(self, c: Chunk) -> tuple:
        """(lo, codes, pairs, patch_at, patch_values) of a nibble chunk, as numpy views."""
        wire = self.wire(c)
        return (wire[PAIRS_NBYTES : c.codes_at], wire[c.codes_at : c.codes_at + c.codes_nbytes],
                wire[:PAIRS_NBYTES].view("<u2"), wire[c.patch_at : c.patch_at + 8 * c.patches].view(np.int64),
                wire[c.patch_at + 8 * c.patches : c.nbytes(2)])

    def expand_into(self, c: Chunk, out: np.ndarray, start: int = 0, stop: int | None = None) -> None:
        """Elements [start, stop) of chunk `c` (relative to it; even for nibble) into `out` (a
        uint8 numpy array of (stop - start) * k bytes), on the host."""
        stop = c.numel if stop is None else stop
        cols = out.reshape(stop - start, self.itemsize)
        if self.coding == codec.Codec.NIBBLE:
            views = self.nibble_views(c)
            cols[:, 0] = views[0][start:stop]
            cols[:, 1] = _nibble_top(views, start, stop)
            return
        low, values = self.low_planes(c), out.view(_UINT[self.itemsize])
        for f in c.frames:
            a, b = max(start, f.start), min(stop, f.start + f.nbytes)
            if a < b:
                # Horner, top plane first: whole-element ufuncs (they release the GIL), where
                # a strided byte copy per plane ran ~10% slower end to end on the CPU backend.
                part = values[a - start : b - start]
                np.copyto(part, _decoded(f)[a - f.start : b - f.start])
                for i in range(self.itemsize - 2, -1, -1):
                    np.left_shift(part, 8, out=part)
                    np.bitwise_or(part, low[i, a:b], out=part)


def _nibble_top(views: tuple, start: int, stop: int) -> np.ndarray:
    """Top bytes of elements [start, stop) of a nibble chunk: two per code byte, then patches."""
    _, codes, pairs, at, values = views
    top = np.empty((stop - start + 1) // 2, np.uint16)
    np.take(pairs, codes[start // 2 : (stop + 1) // 2], out=top)
    top8 = top.view(np.uint8)[: stop - start]
    first, last = np.searchsorted(at, [start, stop])
    top8[at[first:last] - start] = values[first:last]
    return top8


def _decoded(frame: codec.Frame) -> np.ndarray:
    from .decode import decode_frame_into, thread_scratch     # decode.py imports this module

    out = thread_scratch(frame.nbytes)[: frame.nbytes]
    decode_frame_into(frame, out)
    return out


@dataclass(frozen=True, eq=False)
class ImageTensor:
    """One tensor of an image: where it lies in a slot, and how to get it back exactly."""

    image: Image
    dtype: torch.dtype
    shape: torch.Size
    slot_offset: int
    crc32: int

    @property
    def raw_nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    @property
    def numel(self) -> int:
        return self.shape.numel()

    def decode(self) -> torch.Tensor:
        """A new contiguous CPU tensor, bit-identical to the packed one (crc32 checked)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        flat = out.reshape(-1).view(torch.uint8).numpy()
        img, off, n = self.image, self.slot_offset, self.raw_nbytes
        try:
            if off >= img.coded_nbytes:
                flat[:] = img.host[img.raw_offset + off - img.coded_nbytes :][:n]
            else:
                self._expand(flat, off // img.itemsize)
        except FormatError as exc:
            raise FormatError(f"{self._what()}: {exc}") from exc
        crc = zlib.crc32(flat)
        if crc != self.crc32:
            raise FormatError(f"{self._what()}: the decoded bytes have crc32 {crc:#010x}, {self.crc32:#010x} "
                              f"was recorded when packing: the image is corrupt")
        return out

    def _what(self) -> str:
        return f"{self.dtype} tensor of shape {tuple(self.shape)}"

    def _expand(self, out: np.ndarray, e0: int) -> None:
        k = self.image.itemsize
        e1 = e0 + out.size // k
        for c in self.image.chunks:
            a, b = max(e0, c.start), min(e1, c.start + c.numel)
            if a < b:
                self.image.expand_into(c, out[(a - e0) * k : (b - e0) * k], a - c.start, b - c.start)


# -- packing -------------------------------------------------------------------------------------


def lane_itemsize(dtypes_nbytes, coding: str | None) -> int:
    """The lane's itemsize, from (dtype, bytes) of each tensor: the float itemsize holding the
    most bytes (nibble: only 2); 0: none (no float, or `coding` None)."""
    sizes: dict = {}
    for dtype, nbytes in dtypes_nbytes:
        if dtype.is_floating_point and dtype.itemsize in _UINT:
            sizes[dtype.itemsize] = sizes.get(dtype.itemsize, 0) + nbytes
    if coding == codec.Codec.NIBBLE:
        return 2 if sizes.get(2) else 0
    return max(sizes, key=sizes.get) if sizes and coding else 0


def slot_layout(tensors: list, alignment: int, lane: int) -> tuple[list[int], int]:
    """Each tensor's slot offset (the lane's floats first, then the rest, in order; each
    aligned) and the lane's bytes (the aligned end of its last tensor)."""
    offsets, off, coded = [0] * len(tensors), 0, 0
    for group in (True, False):
        for i, t in enumerate(tensors):
            if _in_lane(t, lane) == group:
                offsets[i], off = off, off + align(t.numel() * t.element_size(), alignment)
        if group:
            coded = off
    return offsets, coded


def _in_lane(t: torch.Tensor, lane: int) -> bool:
    return bool(lane) and t.dtype.is_floating_point and t.element_size() == lane


def pack_image(tensors: list[torch.Tensor], alignment: int, alloc, coding: str | None = codec.Codec.NIBBLE,
               level: int | None = None) -> tuple[Image, list]:
    """Lay `tensors` (contiguous CPU) out as a slot would hold them, code the lane with `coding`
    (None: all raw), and copy it all into one arena from `alloc(nbytes)`. Returns the image and
    an ImageTensor each."""
    k = lane_itemsize([(t.dtype, t.numel() * t.element_size()) for t in tensors], coding)
    offsets, coded = slot_layout(tensors, max(alignment, k), k)
    end = max((o + t.numel() * t.element_size() for o, t in zip(offsets, tensors)), default=0)
    slot = np.zeros(max(end, coded), np.uint8)          # padding is zeros: cheap to code
    for o, t in zip(offsets, tensors):
        slot[o : o + t.numel() * t.element_size()] = t.reshape(-1).view(torch.uint8).numpy()
    parts = _code(slot[:coded].view(_UINT[k]), coding, level) if coded else None
    if parts is None:
        coding, coded = None, 0                         # not worth it: everything raw
    raw = slot[coded:]
    sizes = [c.nbytes(k) for c, _ in parts or ()]
    arena = alloc(sum(align(n, 64) for n in sizes) + raw.size)
    flat, off, chunks = arena.numpy(), 0, []
    for (c, data), n in zip(parts or (), sizes):
        chunks.append(_write(flat[off : off + n], c, data, off, k))
        off += align(n, 64)
    flat[off:] = raw
    image = Image(arena, coding, k or 1, coded, tuple(chunks), off, raw.size, flat)
    return image, [ImageTensor(image, t.dtype, t.shape, o, zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()))
                   for o, t in zip(offsets, tensors)]


def _code(elements: np.ndarray, coding: str, level: int | None) -> list | None:
    """[(Chunk with offset 0, what `_write` writes)] coding `elements`; None when that saves < 5%."""
    k, step = elements.itemsize, chunk_elems(elements.itemsize)
    top = (elements >> elements.dtype.type(8 * (k - 1))).astype(np.uint8)
    if coding == codec.Codec.NIBBLE:
        table = nibble.table_for(np.bincount(nibble.sample(top), minlength=256))
        out = [_nibble_chunk(elements[s : s + step], top[s : s + step], table, s) for s in range(0, elements.size, step)]
        landing = landing_nbytes(coding, k, elements.size)
        if any(c.nbytes(k) > landing for c, _ in out):
            return None
    else:
        params = codec._FAST_PARAMS if level is None else zstd.ZstdCompressionParameters.from_level(
            level, write_content_size=True, write_checksum=True)
        cctx = zstd.ZstdCompressor(compression_params=params)
        out = [_zstd_chunk(elements[s : s + step], top[s : s + step], cctx, s) for s in range(0, elements.size, step)]
    if sum(c.nbytes(k) for c, _ in out) > (1 - _MIN_SAVING) * k * elements.size:
        return None
    return out


def _nibble_chunk(elements, top, table, start) -> tuple:
    nib = nibble.encode(top, table)
    return Chunk(start, elements.size, 0, nib.num_patches), (nib, elements.astype(np.uint8))


def _zstd_chunk(elements, top, cctx, start) -> tuple:
    k, n = elements.itemsize, elements.size
    low = np.stack([(elements >> elements.dtype.type(8 * i)).astype(np.uint8) for i in range(k - 1)])
    frames = tuple(codec.Frame(s, min(codec.FRAME_NBYTES, n - s), cctx.compress(top[s : s + codec.FRAME_NBYTES]))
                   for s in range(0, n, codec.FRAME_NBYTES))
    return Chunk(start, n, 0, frames=frames), low


def _write(wire: np.ndarray, c: Chunk, data, offset: int, k: int) -> Chunk:
    """Chunk `c`'s bytes into `wire`; the chunk, placed at arena `offset` (frames rebased on it)."""
    if c.frames:
        wire[: data.size] = data.reshape(-1)
        pos, frames = data.size, []
        for f in c.frames:
            n = len(f.data)
            wire[pos : pos + n] = np.frombuffer(f.data, np.uint8)
            frames.append(codec.Frame(f.start, f.nbytes, memoryview(wire[pos : pos + n])))
            pos += n
        return Chunk(c.start, c.numel, offset, frames=tuple(frames))
    nib, lo = data
    wire[:PAIRS_NBYTES] = np.frombuffer(nib.pairs, np.uint8)
    wire[PAIRS_NBYTES : c.codes_at] = lo
    wire[c.codes_at : c.codes_at + c.codes_nbytes] = np.frombuffer(nib.codes, np.uint8)
    wire[c.codes_at + c.codes_nbytes : c.patch_at] = 0
    wire[c.patch_at : c.patch_at + 8 * c.patches] = np.frombuffer(nib.patch_at, np.uint8)
    wire[c.patch_at + 8 * c.patches : c.nbytes(k)] = np.frombuffer(nib.patch_values, np.uint8)
    return Chunk(c.start, c.numel, offset, c.patches)
