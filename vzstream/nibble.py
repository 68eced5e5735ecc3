"""The nibble code: a byte plane as 4-bit codes that the device expands (`codec="nibble"`).

A split float's top plane (sign and high exponent bits) carries ~2.7 bits of information, and
16 byte values cover all but ~1e-4 of its elements (trained all-MiniLM-L6-v2 and random-init
Llama alike). So a plane of n bytes is stored as:

- `table`: the 16 values coded; code c stands for byte `table[c]`.
- `codes`: ceil(n / 2) bytes; byte k holds element 2k's code in its low nibble and element
  2k+1's in its high one (an odd tail's high nibble is 0).
- `pairs`: 256 little-endian uint16, `pairs[b] = table[b & 15] | table[b >> 4] << 8`: one gather
  of `codes` writes two plane bytes per code byte. That is how the CUDA backend decodes it, on
  the device (`index_select`), so nothing is decoded on the host and the upload carries half
  the plane's bytes.
- patches: elements whose byte is not in the table are coded 0 and overwritten afterwards with
  `patch_values` at `patch_at` (int64 element indices, ascending).

It stores n/2 + 512 + 9 * patches bytes, against zstd's ~n/2.9: more host RAM, no host decode.
Like raw planes, and unlike zstd frames, it carries no checksum: its structure is checked, its
values are not while streaming. A whole-tensor `decode.decode` (what restoring a parameter runs)
checks the tensor's crc32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import FormatError

NUM_CODES = 16
SAMPLE_ELEMS = 1 << 20       # values counted to choose a table: the common ones show in any sample


@dataclass(frozen=True)
class Nibbles:
    codes: Any          # buffer of ceil(n / 2) bytes
    pairs: Any          # buffer of 256 little-endian uint16 (512 bytes)
    patch_at: Any       # buffer of int64 element indices, ascending
    patch_values: Any   # buffer of uint8, one per index

    @property
    def num_patches(self) -> int:
        return memoryview(self.patch_values).nbytes

    def buffers(self) -> list:
        return [self.codes, self.pairs, self.patch_at, self.patch_values]


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
    return Nibbles(packed.tobytes(), pairs_for(table).tobytes(), patch_at.tobytes(), plane[patch_at].tobytes())


def nbytes(nib: Nibbles) -> int:
    return sum(memoryview(b).nbytes for b in nib.buffers())


def check(nib: Nibbles, n: int) -> None:
    """Sizes consistent with a plane of `n` bytes (raises FormatError)."""
    sizes = [memoryview(b).nbytes for b in nib.buffers()]
    if sizes[0] != (n + 1) // 2 or sizes[1] != 512 or sizes[2] != 8 * sizes[3]:
        raise FormatError(f"nibble plane of {n} bytes holds {sizes[0]} code bytes, a {sizes[1]}-byte "
                          f"table and {sizes[2]} / {sizes[3]} bytes of patch indices / values; expected "
                          f"{(n + 1) // 2}, 512 and 8 index bytes per value")
    at = np.frombuffer(nib.patch_at, np.int64)
    # Out of order, `patches_in` would miss some (wrong numbers), and a device would write wherever
    # an index points: so ascending and in range, checked here (cheap: ~1e-4 of the elements).
    if at.size and (at[0] < 0 or at[-1] >= n or np.any(at[1:] <= at[:-1])):
        raise FormatError(f"nibble patch indices must ascend within [0, {n})")


def patches_in(nib: Nibbles, n: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Patches of elements [start, stop): (indices, values). Call `check` first."""
    at = np.frombuffer(nib.patch_at, np.int64)
    lo, hi = np.searchsorted(at, [start, stop])
    return at[lo:hi], np.frombuffer(nib.patch_values, np.uint8)[lo:hi]


def decode_range(nib: Nibbles, n: int, start: int, stop: int, out: np.ndarray) -> None:
    """Plane bytes [start, stop) into `out` (uint8, stop - start bytes); `start` is even."""
    check(nib, n)
    if start % 2:
        raise FormatError(f"nibble planes decode from an even element, got {start}")
    codes = np.frombuffer(nib.codes, np.uint8)[start // 2 : (stop + 1) // 2]
    pairs = np.frombuffer(nib.pairs, "<u2")
    count = stop - start
    np.take(pairs, codes[: count // 2], out=out[: count - count % 2].view("<u2"))
    if count % 2:
        out[-1] = pairs[codes[-1]] & 0xFF
    idx, values = patches_in(nib, n, start, stop)
    out[idx - start] = values
