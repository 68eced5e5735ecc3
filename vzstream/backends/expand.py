"""One-pass expansion of a nibble-coded chunk of a 2-byte float (bf16 / fp16) into its slot.

Wire layout of one chunk of n elements, as it lands on the device (views of one uint8 buffer;
`nibble.py` describes the code):

- `lo`: n bytes, the low byte plane, raw: byte k is bits [0, 8) of element k.
- `codes`: ceil(n / 2) bytes; byte k codes element 2k in its low nibble and 2k + 1 in its high
  one (an odd n leaves the last high nibble unused).
- `pairs`: the 512-byte pair table exactly as stored (`Nibbles.pairs`: 256 little-endian
  uint16, `pairs[b] = table[b & 15] | table[b >> 4] << 8`), as int16 [256] or uint8 [512] at
  an even offset (the torch path views it as int16). Byte 2 * b + j of it is the top byte of
  element j of a pair coded b.
- `patch_at`: int64 element indices within the chunk, ascending and in [0, n) (`nibble.encode`
  guarantees it; nothing here checks it, so a bad index writes out of bounds on a device).
- `patch_values`: uint8, the true top byte at those indices.

Result: `out[k] = top(k) << 8 | lo[k]` with `top(k) = table[code(k)]`, then the patches
overwrite the top byte. `out` is n elements of any 2-byte dtype (int16 / bf16 / fp16 view of
the slot), contiguous. Bit-exact: only bytes move, so -0.0 and NaN payloads survive. Elements
are little-endian (every CUDA device; x86 and ARM hosts), which the byte views rely on.

`expand` uses the Triton kernel for CUDA tensors when Triton is installed, else `expand_torch`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:                     # vzstream runs without Triton: `expand_torch` only
    HAVE_TRITON = False

BLOCK = 2048                            # elements per Triton program
_PATCH_BLOCK = 256                      # patches per Triton program

__all__ = ["HAVE_TRITON", "expand", "expand_torch", "expand_triton", "merge_planes"]


def expand(lo, codes, pairs, patch_at, patch_values, out) -> None:
    """The chunk into `out`: the Triton kernel on CUDA tensors when Triton is present, else torch."""
    if HAVE_TRITON and out.is_cuda:
        expand_triton(lo, codes, pairs, patch_at, patch_values, out)
    else:
        expand_torch(lo, codes, pairs, patch_at, patch_values, out)


def expand_torch(lo, codes, pairs, patch_at, patch_values, out) -> None:
    """Pure torch, any device: 3 kernel launches, 4 with patches (none when n == 0)."""
    n = out.numel()
    if n == 0:
        return
    # index_select takes int32 or int64 indices, never uint8 (uint8 indexing means a mask).
    index = codes.to(torch.int32)                                              # launch 1
    top = torch.index_select(pairs.view(torch.int16), 0, index)                # launch 2: [ceil(n/2)] pairs
    slot = out.view(torch.uint8).view(n, 2)                                    # [n, (lo, top)]
    # One strided write of both bytes of each element, rather than a copy per plane.
    torch.stack((lo, top.view(torch.uint8)[:n]), dim=1, out=slot)              # launch 3
    if patch_at.numel():
        # unsafe=True skips the device-side range check, which under deterministic algorithms
        # reads `index.max()` back to the host (a sync); the encoder made the indices.
        _index_put(slot[:, 1], (patch_at,), patch_values, False, True)        # launch 4


_index_put = getattr(torch, "_index_put_impl_", None) or (lambda t, idx, v, acc, unsafe: t.index_put_(idx, v, acc))


def merge_planes(planes: tuple, out: torch.Tensor) -> None:
    """A zstd chunk: k byte planes (each n uint8, plane i = byte i of every little-endian
    element) into `out`, the [n, k] uint8 view of its n k-byte elements: one kernel, one strided
    write of every element."""
    torch.stack(planes, dim=1, out=out)


def expand_triton(lo, codes, pairs, patch_at, patch_values, out) -> None:
    """Triton: 1 launch, 2 with patches (none when n == 0). The patch kernel runs after the main
    one on the same stream; folding it in would race with the main write of the same element."""
    if not HAVE_TRITON:
        raise ImportError("expand_triton needs Triton (`pip install triton`); use expand_torch")
    n = out.numel()
    if n == 0:
        return
    slot = out.view(torch.int16)
    table = pairs.view(torch.uint8)
    _expand_kernel[(triton.cdiv(n, BLOCK),)](lo, codes, table, slot, n, BLOCK=BLOCK)
    num_patches = patch_at.numel()
    if num_patches:
        _patch_kernel[(triton.cdiv(num_patches, _PATCH_BLOCK),)](
            lo, patch_at, patch_values, slot, num_patches, BLOCK=_PATCH_BLOCK)


if HAVE_TRITON:

    @triton.jit
    def _expand_kernel(lo_ptr, codes_ptr, pairs_ptr, out_ptr, n, BLOCK: tl.constexpr):
        # int64 offsets: a chunk of more than 2**31 elements would overflow int32 ones.
        k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)       # [BLOCK] elements
        mask = k < n
        code = tl.load(codes_ptr + (k >> 1), mask=mask, other=0).to(tl.int32)  # neighbours share a byte
        # The 512-byte table stays in L1: byte 2 * code + (k & 1) is this element's top byte.
        top = tl.load(pairs_ptr + 2 * code + (k & 1).to(tl.int32), mask=mask, other=0)
        low = tl.load(lo_ptr + k, mask=mask, other=0)
        value = top.to(tl.uint16) << 8 | low.to(tl.uint16)
        tl.store(out_ptr + k, value.to(tl.int16, bitcast=True), mask=mask)      # coalesced

    @triton.jit
    def _patch_kernel(lo_ptr, at_ptr, values_ptr, out_ptr, num_patches, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < num_patches
        k = tl.load(at_ptr + i, mask=mask, other=0)
        top = tl.load(values_ptr + i, mask=mask, other=0)
        low = tl.load(lo_ptr + k, mask=mask, other=0)
        value = top.to(tl.uint16) << 8 | low.to(tl.uint16)
        tl.store(out_ptr + k, value.to(tl.int16, bitcast=True), mask=mask)
