"""The nibble code (`codec="nibble"`): bit-exact round trips through the codec, the layout a
device gathers from (pairs, codes, patches), the 5% rule, and malformed input."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vzstream import codec, decode, nibble
from vzstream.errors import ConfigError, FormatError

SMALL_FRAME = 4096


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def weights(n: int, dtype=torch.bfloat16, seed: int = 0, outliers: int = 3) -> torch.Tensor:
    """Weight-like values with a few far outliers, whose top bytes the table cannot cover."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g) * 0.02
    if n and outliers:
        t[torch.randint(0, n, (outliers,), generator=g)] = torch.tensor([3e30, -1e-30, float("nan")])[:outliers]
    return t.to(dtype)


def kinds(packed: codec.Packed) -> list[str]:
    return ["nibble" if p.nibbles is not None else "raw" if p.raw is not None else "zstd" for p in packed.planes]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4097, 3 * SMALL_FRAME + 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_round_trip_chunked_and_whole(dtype, n):
    t = weights(n, dtype)
    packed = codec.pack(t, coding="nibble", frame_nbytes=SMALL_FRAME)
    assert torch.equal(_bytes(decode.decode(packed)), _bytes(t))
    out = torch.empty_like(t)
    for j in reversed(range(packed.num_chunks)):       # chunks decode alone, in any order
        decode.decode_chunk_into(packed, j, out)
    assert torch.equal(_bytes(out), _bytes(t))


def test_only_the_top_plane_is_coded_and_the_rest_stays_raw():
    for dtype, expected in [(torch.bfloat16, ["raw", "nibble"]), (torch.float32, ["raw"] * 3 + ["nibble"])]:
        assert kinds(codec.pack(weights(20000, dtype), coding="nibble")) == expected
    # fp16's top byte holds two mantissa bits: 16 values cover too little, so it stays raw.
    assert kinds(codec.pack(weights(20000, torch.float16), coding="nibble")) == ["raw", "raw"]
    assert kinds(codec.pack(torch.randint(0, 9, (999,)), coding="nibble")) == ["raw"]


def test_coded_plane_layout_is_what_a_device_gathers():
    t = weights(10001)
    plane = codec.pack(t, coding="nibble").planes[1]
    nib, n = plane.nibbles, t.numel()
    hi = _bytes(t).numpy()[1::2]
    codes = np.frombuffer(nib.codes, np.uint8)
    pairs = np.frombuffer(nib.pairs, "<u2")
    assert codes.size == (n + 1) // 2 and pairs.size == 256
    gathered = pairs[codes].view(np.uint8)[:n].copy()   # what index_select writes, two bytes a code
    at = np.frombuffer(nib.patch_at, np.int64)
    assert np.all(np.diff(at) > 0) and 1 <= at.size <= 10
    assert np.array_equal(gathered != hi, np.isin(np.arange(n), at))   # patched exactly where wrong
    gathered[at] = np.frombuffer(nib.patch_values, np.uint8)
    assert np.array_equal(gathered, hi)
    assert plane.nbytes == n and nibble.nbytes(nib) == (n + 1) // 2 + 512 + 9 * at.size


def test_a_shared_table_codes_every_tensor_of_a_unit_alike():
    tensors = [weights(5000, seed=s) for s in range(3)]
    tables = codec.nibble_tables(tensors)
    assert list(tables) == [(torch.bfloat16, 1)]
    packed = [codec.pack(t, coding="nibble", tables=tables) for t in tensors]
    assert len({bytes(p.planes[1].nibbles.pairs) for p in packed}) == 1
    assert all(torch.equal(_bytes(decode.decode(p)), _bytes(t)) for p, t in zip(packed, tensors))
    # A table that fits another tensor badly still decodes exactly: the misses are patches.
    other = (torch.randn(5000) * 1e3).to(torch.bfloat16)
    bad = codec.pack(other, coding="nibble", tables=tables)
    assert torch.equal(_bytes(decode.decode(bad)), _bytes(other))


def test_costs_between_zstd_and_raw():
    t = weights(1 << 18)
    sizes = {coding: codec.pack(t, coding=coding).nbytes for coding in codec.CODINGS}
    assert sizes["zstd"] < sizes["nibble"] < 0.8 * t.numel() * 2


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.sampled_from([2, 6, SMALL_FRAME]))
def test_any_bits_round_trip(data, frame_nbytes):
    data = data[: len(data) // 2 * 2]
    t = torch.frombuffer(bytearray(data), dtype=torch.bfloat16) if data else torch.empty(0, dtype=torch.bfloat16)
    packed = codec.pack(t, coding="nibble", frame_nbytes=frame_nbytes)
    assert torch.equal(_bytes(decode.decode(packed)), _bytes(t))


def _with_nibbles(packed, **changes):
    plane = packed.planes[1]
    nib = dataclasses.replace(plane.nibbles, **changes)
    return dataclasses.replace(packed, planes=(packed.planes[0], dataclasses.replace(plane, nibbles=nib)))


@pytest.mark.parametrize("problem", ["short_codes", "short_pairs", "odd_patches", "patch_outside", "patches_unordered"])
def test_malformed_coded_planes_raise_format_error(problem):
    packed = codec.pack(weights(5000), coding="nibble")
    nib = packed.planes[1].nibbles
    change = {
        "short_codes": {"codes": bytes(nib.codes)[:-1]},
        "short_pairs": {"pairs": bytes(nib.pairs)[:100]},
        "odd_patches": {"patch_values": bytes(nib.patch_values) + b"\0"},
        "patch_outside": {"patch_at": np.array([10**9], np.int64).tobytes(), "patch_values": b"\1"},
        "patches_unordered": {"patch_at": np.array([9, 3], np.int64).tobytes(), "patch_values": b"\1\2"},
    }[problem]
    with pytest.raises(FormatError, match="plane 1"):
        decode.decode(_with_nibbles(packed, **change))


@pytest.mark.parametrize("field", ["codes", "pairs", "patch_values"])
def test_a_flipped_code_table_or_patch_byte_fails_the_tensors_crc32(field):
    # Well-formed but wrong: the structure checks pass, the whole-tensor checksum does not.
    packed = codec.pack(weights(5000), coding="nibble")
    b = bytearray(bytes(getattr(packed.planes[1].nibbles, field)))
    b[len(b) // 2] ^= 0x01
    with pytest.raises(FormatError, match="crc32"):
        decode.decode(_with_nibbles(packed, **{field: bytes(b)}))


@pytest.mark.parametrize("kwargs", [{"coding": "lz4"}, {"coding": "nibble", "frame_nbytes": 4095}])
def test_pack_rejects_bad_coding_arguments(kwargs):
    with pytest.raises(ConfigError, match="coding|frame_nbytes"):
        codec.pack(weights(10), **kwargs)
