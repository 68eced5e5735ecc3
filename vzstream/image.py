"""The wire image (`codec="nibble"`): one unit laid out once, in its arena, in the order a device
needs it, so an upload is one copy per chunk whatever the unit's tensor count.

A slot holds the unit's 2-byte floats first (bf16 / fp16, each at an aligned offset), then
every other tensor (fp32 norms, ints, ...). The first part, the *coded region*, is read as one
array of 2-byte elements, padding included, cut into chunks of at most CHUNK_ELEMS (32 MiB of
output). Each chunk travels as

    [pairs (512) | lo (n) | codes (n / 2) | pad to 8 | patch_at (int64, p) | patch_values (p)]

`lo` is the elements' low bytes, raw; `codes` their top bytes in the nibble code of the unit's
one table (`nibble.py`; `pairs` is its decoding table, in every chunk so each chunk expands
alone, as soon as it lands); the patches, indices within the chunk, are the top bytes the table
misses. The rest of the slot travels as it lies in the slot (the *raw area*): one more copy.
A unit whose code would not save 5% is all raw area.

Each tensor stays locatable (`ImageTensor`): restoring on exit decodes tensor by tensor, on the
host, checked against the crc32 recorded when packing.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from . import nibble
from .errors import FormatError
from .units import align

CHUNK_ELEMS = 16 << 20      # 2-byte elements per chunk: 32 MiB of output, copied at full bus speed
PAIRS_NBYTES = 512


def landing_nbytes(numel: int) -> int:
    """The bytes of a device landing buffer for a unit of `numel` coded elements (at most
    CHUNK_ELEMS): known before packing, so the budget counts it. A unit with a chunk that would
    not fit (crowded with patches) is not coded."""
    return PAIRS_NBYTES + 8 + 2 * numel
_MIN_SAVING = 0.05          # as codec's: a code that saves less is not worth expanding


@dataclass(frozen=True)
class Chunk:
    start: int              # first element of the coded region it covers
    numel: int              # elements (even: a code byte is never shared between chunks)
    offset: int             # arena offset of its wire bytes
    patches: int            # how many top bytes the table misses

    @property
    def codes_at(self) -> int:        # offsets within the chunk's wire bytes
        return PAIRS_NBYTES + self.numel

    @property
    def patch_at(self) -> int:
        return align(self.codes_at + self.numel // 2, 8)

    @property
    def nbytes(self) -> int:
        return self.patch_at + 9 * self.patches


@dataclass(frozen=True, eq=False)
class Image:
    arena: torch.Tensor     # uint8 host buffer: the chunks, then the raw area
    coded_nbytes: int       # slot bytes [0, coded_nbytes) come from the chunks
    chunks: tuple[Chunk, ...]
    raw_offset: int         # arena offset of slot bytes [coded_nbytes, coded_nbytes + raw_nbytes)
    raw_nbytes: int

    @property
    def wire_nbytes(self) -> int:
        """Bytes one upload moves host→device."""
        return sum(c.nbytes for c in self.chunks) + self.raw_nbytes

    def chunk_views(self, c: Chunk) -> tuple:
        """(lo, codes, pairs, patch_at, patch_values) of chunk `c`, as numpy views of the arena."""
        wire = self.arena.numpy()[c.offset : c.offset + c.nbytes]
        return (wire[PAIRS_NBYTES : c.codes_at], wire[c.codes_at : c.codes_at + c.numel // 2],
                wire[:PAIRS_NBYTES].view("<u2"), wire[c.patch_at : c.patch_at + 8 * c.patches].view(np.int64),
                wire[c.patch_at + 8 * c.patches : c.nbytes])

    def expand_into(self, c: Chunk, out: np.ndarray, start: int = 0, stop: int | None = None) -> None:
        """Elements [start, stop) of chunk `c` (relative to it; start even) into `out` (uint16
        numpy, stop - start elements), on the host."""
        stop = c.numel if stop is None else stop
        lo, codes, pairs, at, values = self.chunk_views(c)
        top = np.empty((stop - start + 1) // 2, np.uint16)       # two top bytes per code byte
        np.take(pairs, codes[start // 2 : (stop + 1) // 2], out=top)
        top8 = top.view(np.uint8)[: stop - start]
        first, last = np.searchsorted(at, [start, stop])
        top8[at[first:last] - start] = values[first:last]
        np.left_shift(top8, 8, out=out, dtype=np.uint16)
        np.bitwise_or(out, lo[start:stop], out=out)


@dataclass(frozen=True, eq=False)
class ImageTensor:
    """One tensor of an image: where it lies in a slot, and how to get it back exactly."""

    image: Image
    dtype: torch.dtype
    shape: torch.Size
    slot_offset: int
    crc32: int
    planes: tuple = ()      # no byte planes: `Packed`'s readers see nothing to decode

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
        if off >= img.coded_nbytes:
            src = img.arena.numpy()[img.raw_offset + off - img.coded_nbytes:][:n]
            flat[:] = src
        else:
            self._expand(flat.view(np.uint16), off // 2)
        crc = zlib.crc32(flat)
        if crc != self.crc32:
            raise FormatError(f"{self.dtype} tensor of shape {tuple(self.shape)}: the decoded bytes have crc32 "
                              f"{crc:#010x}, {self.crc32:#010x} was recorded when packing: the image is corrupt")
        return out

    def _expand(self, out: np.ndarray, e0: int) -> None:
        e1 = e0 + out.size
        for c in self.image.chunks:
            a, b = max(e0, c.start), min(e1, c.start + c.numel)
            if a < b:
                self.image.expand_into(c, out[a - e0 : b - e0], a - c.start, b - c.start)


def slot_layout(tensors: list[torch.Tensor], alignment: int) -> tuple[list[int], int]:
    """Each tensor's slot offset (2-byte floats first, then the rest, in order; each aligned)
    and the coded region's size (the aligned end of the last 2-byte float)."""
    offsets, off = [0] * len(tensors), 0
    for group in (True, False):
        for i, t in enumerate(tensors):
            if _coded(t) == group:
                offsets[i], off = off, off + align(t.numel() * t.element_size(), alignment)
        if group:
            coded = off
    return offsets, coded


def _coded(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point and t.element_size() == 2


def pack_image(tensors: list[torch.Tensor], alignment: int, alloc, compress: bool = True) -> tuple[Image, list]:
    """Lay `tensors` (contiguous CPU) out as a slot would hold them, code the 2-byte part, and
    copy it all into one arena from `alloc(nbytes)`. Returns the image and an ImageTensor each."""
    offsets, coded = slot_layout(tensors, alignment)
    end = max((o + t.numel() * t.element_size() for o, t in zip(offsets, tensors)), default=0)
    slot = np.zeros(max(end, coded), np.uint8)          # padding is zeros: cheap to code
    for o, t in zip(offsets, tensors):
        slot[o : o + t.numel() * t.element_size()] = t.reshape(-1).view(torch.uint8).numpy()
    elements = slot[:coded].view(np.uint16)
    coded_chunks = _code_chunks(elements) if compress and coded else None
    if coded_chunks is None:
        coded = 0                                        # not worth it: everything raw
    raw = slot[coded:]
    chunk_nbytes = [c.nbytes for c, _ in coded_chunks or ()]
    arena = alloc(sum(align(n, 64) for n in chunk_nbytes) + raw.size)
    flat, off, chunks = arena.numpy(), 0, []
    for (c, parts), n in zip(coded_chunks or (), chunk_nbytes):
        chunk = Chunk(c.start, c.numel, off, c.patches)
        _write(flat[off : off + n], chunk, parts)
        chunks.append(chunk)
        off += align(n, 64)
    flat[off:] = raw
    image = Image(arena, coded, tuple(chunks), off, raw.size)
    return image, [ImageTensor(image, t.dtype, t.shape, o, zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()))
                   for o, t in zip(offsets, tensors)]


def _code_chunks(elements: np.ndarray) -> list | None:
    """[(Chunk with offset 0, its parts)] coding `elements`; None when that saves < 5%."""
    top = (elements >> 8).astype(np.uint8)
    table = nibble.table_for(np.bincount(nibble.sample(top), minlength=256))
    out = []
    for start in range(0, elements.size, CHUNK_ELEMS):
        stop = min(start + CHUNK_ELEMS, elements.size)
        nib = nibble.encode(top[start:stop], table)
        lo = elements[start:stop].astype(np.uint8)
        out.append((Chunk(start, stop - start, 0, nib.num_patches), (nib, lo)))
    if (sum(c.nbytes for c, _ in out) > (1 - _MIN_SAVING) * 2 * elements.size
            or any(c.nbytes > landing_nbytes(min(CHUNK_ELEMS, elements.size)) for c, _ in out)):
        return None
    return out


def _write(wire: np.ndarray, c: Chunk, parts) -> None:
    nib, lo = parts
    wire[:PAIRS_NBYTES] = np.frombuffer(nib.pairs, np.uint8)
    wire[PAIRS_NBYTES : c.codes_at] = lo
    wire[c.codes_at : c.codes_at + c.numel // 2] = np.frombuffer(nib.codes, np.uint8)
    wire[c.codes_at + c.numel // 2 : c.patch_at] = 0
    wire[c.patch_at : c.patch_at + 8 * c.patches] = np.frombuffer(nib.patch_at, np.uint8)
    wire[c.patch_at + 8 * c.patches : c.nbytes] = np.frombuffer(nib.patch_values, np.uint8)
