"""nibble.py, the encoder: the table it picks, the layout a device gathers from (pairs, codes,
patches), odd lengths, a shared table, and any bytes back exactly through a host expansion.
Whole images with nibble chunks are test_image.py's; the device kernels are test_expand.py's."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vzstream import nibble

FUZZ = os.environ.get("VZSTREAM_FUZZ") == "1"     # longer hypothesis runs


def top_plane(n: int, seed: int = 0, outliers: int = 3) -> np.ndarray:
    """The top bytes of weight-like bf16 values with a few far outliers the table cannot cover."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g) * 0.02
    if n and outliers:
        t[torch.randint(0, n, (outliers,), generator=g)] = torch.tensor([3e30, -1e-30, float("nan")])[:outliers]
    return t.to(torch.bfloat16).view(torch.uint8).numpy()[1::2].copy()


def expand(nib: nibble.Nibbles, n: int) -> np.ndarray:
    """The plane back on the host, as a device does it: gather two bytes per code byte, then patch."""
    plane = nib.pairs[nib.codes].view(np.uint8)[:n].copy()
    plane[nib.patch_at] = nib.patch_values
    return plane


def test_table_is_the_16_most_frequent_values_ties_to_the_lower():
    counts = np.zeros(256, np.int64)
    counts[[200, 7, 9, 100]] = [50, 90, 90, 1]
    table = nibble.table_for(counts)
    # Then the zero counts, lowest value first: a table always holds 16 values.
    assert table.dtype == np.uint8 and table.tolist() == [7, 9, 200, 100] + [0, 1, 2, 3, 4, 5, 6, 8] + [10, 11, 12, 13]


def test_pairs_decode_one_code_byte_into_two_plane_bytes():
    table = np.random.default_rng(0).permutation(256)[:16].astype(np.uint8)
    pairs = nibble.pairs_for(table)
    assert pairs.dtype == np.dtype("<u2") and pairs.size == 256
    as_bytes = pairs.view(np.uint8).reshape(256, 2)                    # little-endian: (low, high)
    b = np.arange(256)
    assert np.array_equal(as_bytes[:, 0], table[b & 15]) and np.array_equal(as_bytes[:, 1], table[b >> 4])


def test_sample_is_an_even_stride_of_about_sample_elems():
    values = np.arange(3 * nibble.SAMPLE_ELEMS + 5)
    picked = nibble.sample(values)
    assert np.array_equal(picked, values[::3]) and nibble.SAMPLE_ELEMS <= picked.size <= nibble.SAMPLE_ELEMS + 2
    assert np.array_equal(nibble.sample(values[:1000]), values[:1000])    # small: all of it


def test_layout_is_what_a_device_gathers():
    plane = top_plane(10001)
    nib, n = nibble.encode(plane), plane.size
    assert (nib.codes.dtype, nib.codes.size, nib.pairs.size) == (np.uint8, (n + 1) // 2, 256)
    assert all(a.flags.c_contiguous for a in (nib.codes, nib.pairs, nib.patch_at, nib.patch_values))
    gathered = nib.pairs[nib.codes].view(np.uint8)[:n]                 # what index_select writes
    at = nib.patch_at
    assert at.dtype == np.int64 and np.all(np.diff(at) > 0) and 1 <= nib.num_patches == at.size <= 10
    assert np.array_equal(gathered != plane, np.isin(np.arange(n), at))   # patched exactly where wrong
    assert np.array_equal(nib.patch_values, plane[at])
    stored = nib.codes.nbytes + nib.pairs.nbytes + nib.patch_at.nbytes + nib.patch_values.nbytes
    assert stored == (n + 1) // 2 + 512 + 9 * at.size < 0.6 * n       # about half the plane


@pytest.mark.parametrize("n", [1, 3, 4097])
def test_an_odd_length_leaves_the_last_high_nibble_zero(n):
    plane = top_plane(n, outliers=0)
    nib = nibble.encode(plane)
    assert nib.codes.size == (n + 1) // 2 and nib.codes[-1] >> 4 == 0
    assert np.array_equal(expand(nib, n), plane)


def test_an_empty_plane_codes_to_nothing():
    nib = nibble.encode(np.empty(0, np.uint8))
    assert nib.codes.size == 0 and nib.num_patches == 0 and nib.pairs.size == 256


def test_a_shared_table_is_used_as_given_and_its_misses_are_patches():
    # A unit's tensors share one table: one that fits a plane badly still codes it exactly.
    table = nibble.table_for(np.bincount(top_plane(5000, seed=1), minlength=256))
    other = (torch.randn(5000, generator=torch.Generator().manual_seed(2)) * 1e3).to(torch.bfloat16)
    plane = other.view(torch.uint8).numpy()[1::2].copy()
    nib = nibble.encode(plane, table)
    assert np.array_equal(nib.pairs, nibble.pairs_for(table))
    assert np.array_equal(nib.patch_at, np.flatnonzero(~np.isin(plane, table)))
    assert nib.num_patches > 1000 and np.array_equal(expand(nib, plane.size), plane)


def test_a_repeated_table_value_keeps_its_first_code():
    table = np.array([5] * 16, np.uint8)
    table[3] = 9                                           # 9: code 3; 5: code 0, its first place
    nib = nibble.encode(np.array([9, 5, 5, 9, 1], np.uint8), table)
    assert nib.codes.tolist() == [3 | 0 << 4, 0 | 3 << 4, 15] and nib.patch_at.tolist() == [4]


@settings(max_examples=2000 if FUZZ else 60, deadline=None)
@given(st.binary(max_size=700), st.none() | st.binary(min_size=16, max_size=16))
def test_any_bytes_with_any_table_come_back_exactly(data, table):
    plane = np.frombuffer(data, np.uint8)
    table = None if table is None else np.frombuffer(table, np.uint8)
    nib = nibble.encode(plane, table)
    assert np.array_equal(expand(nib, plane.size), plane)
    missed = ~np.isin(plane, nibble.table_for(np.bincount(plane, minlength=256)) if table is None else table)
    assert np.array_equal(nib.patch_at, np.flatnonzero(missed))      # ascending, in range, only the misses
