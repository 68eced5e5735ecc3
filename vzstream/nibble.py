"""The nibble code: a byte plane as 4-bit codes that the device expands (`codec="nibble"`).

This module holds the encoder; a wire image (`image.py`) lays its output out in each nibble chunk,
and the device expands it (`backends/expand.py`; on the host, `Image.expand_into`).

A split float's top plane (sign and high exponent bits) carries ~2.7 bits of information, and
16 byte values cover all but ~1e-4 of its elements (trained all-MiniLM-L6-v2 and random-init
Llama alike). So a plane of n bytes is coded as:

- a table of the 16 values coded (`table_for`, one per unit): code c stands for byte `table[c]`.
- `codes`: ceil(n / 2) bytes; byte k holds element 2k's code in its low nibble and element
  2k+1's in its high one (an odd tail's high nibble is 0).
- `pairs`: 256 little-endian uint16, `pairs[b] = table[b & 15] | table[b >> 4] << 8`: one gather
  of `codes` writes two plane bytes per code byte. That is how the CUDA backend decodes it, on
  the device, so nothing is decoded on the host and the upload carries half the plane's bytes.
- patches: elements whose byte is not in the table get code 15 (any code would do) and are
  overwritten afterwards with `patch_values` at `patch_at` (int64 element indices, ascending).

It stores n/2 + 512 + 9 * patches bytes, against zstd's ~n/2.9: more host RAM, no host decode.
Unlike zstd frames it carries no checksum: restoring a tensor (`ImageTensor.decode`) checks the
tensor's crc32 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_CODES = 16
SAMPLE_ELEMS = 1 << 20       # values counted to choose a table: the common ones show in any sample


@dataclass(frozen=True)
class Nibbles:
    """`encode`'s output, as contiguous numpy arrays (`image.py` copies them into a chunk)."""

    codes: np.ndarray          # uint8 [ceil(n / 2)]
    pairs: np.ndarray          # little-endian uint16 [256] (512 bytes)
    patch_at: np.ndarray       # int64 element indices, ascending
    patch_values: np.ndarray   # uint8, the true byte at each index

    @property
    def num_patches(self) -> int:
        return self.patch_values.size


def table_for(counts: np.ndarray) -> np.ndarray:
    """The NUM_CODES most frequent byte values of a 256-bin histogram, as uint8."""
    return np.argsort(-counts, kind="stable")[:NUM_CODES].astype(np.uint8)


def pairs_for(table: np.ndarray) -> np.ndarray:
    """The 256-entry uint16 lookup that decodes one code byte into two plane bytes."""
    b = np.arange(256)
    return (table[b & 15].astype(np.uint16) | table[b >> 4].astype(np.uint16) << 8).astype("<u2")


def sample(values: np.ndarray) -> np.ndarray:
    """About SAMPLE_ELEMS of `values`, evenly strided: enough to rank the common byte values (a
    rare value left out of the table is only a patch), at a fraction of counting them all."""
    return values[:: max(1, values.size // SAMPLE_ELEMS)]


def encode(plane: np.ndarray, table: np.ndarray | None = None) -> Nibbles:
    """Code `plane` (uint8) with `table` (default: the 16 most frequent values of a sample)."""
    if table is None:
        table = table_for(np.bincount(sample(plane), minlength=256))
    code_of = np.full(256, 0xFF, np.uint8)          # 0xFF: not in the table, a patch
    code_of[table[::-1]] = np.arange(NUM_CODES - 1, -1, -1, dtype=np.uint8)  # a repeat keeps its first code
    codes = code_of[plane]
    patch_at = np.flatnonzero(codes > NUM_CODES - 1).astype(np.int64)
    codes &= NUM_CODES - 1                          # a patched element's code: any, it is overwritten
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    packed = codes[0::2] | (codes[1::2] << 4)
    return Nibbles(packed, pairs_for(table), patch_at, plane[patch_at])
