"""Codec: bit-exact round trips, plane layout, chunked and threaded decode, corrupt input."""

import dataclasses
import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vzstream import nibble
from vzstream.codec import Frame, Packed, Plane, pack
from vzstream.decode import decode, decode_chunk_into, decode_frame_into, decode_into
from vzstream.errors import ConfigError, FormatError

FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
OTHERS = [torch.int8, torch.uint8, torch.bool, torch.int64]
DTYPES = FLOATS + OTHERS
SMALL_FRAME = 4096  # several frames per test tensor while staying fast
FUZZ = os.environ.get("VZSTREAM_FUZZ") == "1"


def _id(value):
    return str(value).replace("torch.", "")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of `t`: comparing these compares NaN payloads, -0.0 and inf exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.is_contiguous()
    assert torch.equal(_bytes(actual), _bytes(expected))


def random_tensor(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    """Trained-weight-like values for floats (so planes compress), random bits for the rest."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 0.05).to(dtype)
    bits = torch.randint(0, 256, (int(np.prod(shape)) * dtype.itemsize,), generator=g,
                         dtype=torch.uint8)
    if dtype == torch.bool:
        bits = bits & 1
    return bits.view(dtype).reshape(shape)


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """NaN (several payloads, both signs), +-inf, -0.0, denormals, extremes."""
    info = torch.finfo(dtype)
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, info.max,
                           info.min, info.tiny, info.tiny / 4, -info.tiny / 2, info.eps],
                          dtype=dtype)
    k = dtype.itemsize
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[k]
    exp_ones = {2: 0x7F80 if dtype == torch.bfloat16 else 0x7C00,
                4: 0x7F800000, 8: 0x7FF0000000000000}[k]
    payloads = [exp_ones | 1, exp_ones | 0x15, -1, exp_ones | (1 << (k * 8 - 2)) - 1]
    nans = torch.tensor(payloads, dtype=torch.int64).to(int_dtype).view(dtype)
    return torch.cat([values, nans]).repeat(300)


SHAPES = [(), (0,), (0, 5), (1,), (7,), (1031,), (3, 5, 7), (SMALL_FRAME * 3 + 17,)]


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_round_trip(dtype, shape):
    t = random_tensor(dtype, shape)
    packed = pack(t, frame_nbytes=SMALL_FRAME)
    assert packed.dtype == dtype and packed.shape == t.shape
    assert_bit_equal(decode(packed), t)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_round_trip_default_frames_and_level(dtype):
    t = random_tensor(dtype, (257, 33))
    assert_bit_equal(decode(pack(t)), t)
    assert_bit_equal(decode(pack(t, level=3, frame_nbytes=1000)), t)


@pytest.mark.parametrize("view", ["transposed", "step_slice", "expanded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64], ids=_id)
def test_round_trip_non_contiguous(dtype, view):
    base = random_tensor(dtype, (64, 48))
    t = {"transposed": lambda: base.t(), "step_slice": lambda: base[1::3, ::2],
         "expanded": lambda: base[:1].expand(5, 48)}[view]()
    assert not t.is_contiguous()
    assert_bit_equal(decode(pack(t, frame_nbytes=256)), t.contiguous())


def test_round_trip_lazy_conj_view():
    t = torch.randn(10, dtype=torch.complex64).conj()  # conj bit set, memory not conjugated
    assert t.is_conj()
    assert_bit_equal(decode(pack(t)), t.resolve_conj())


@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_round_trip_special_values(dtype):
    t = special_values(dtype)
    packed = pack(t, frame_nbytes=SMALL_FRAME)
    assert packed.num_chunks > 1
    assert_bit_equal(decode(packed), t)


@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_round_trip_random_bits(dtype):
    # Random bit patterns hit every NaN payload, denormal and sign combination.
    t = random_tensor(torch.uint8, (5000 * dtype.itemsize,), seed=3).view(dtype)
    assert_bit_equal(decode(pack(t, frame_nbytes=999)), t)


@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_split_planes_tile_in_frames(dtype):
    numel = SMALL_FRAME * 3 + 17  # last frame partial
    packed = pack(torch.zeros(numel, dtype=dtype), frame_nbytes=SMALL_FRAME)
    assert packed.split and packed.frame_elems == SMALL_FRAME and packed.num_chunks == 4
    assert [p.index for p in packed.planes] == list(range(dtype.itemsize))
    for plane in packed.planes:  # zeros compress in every plane
        assert plane.compressed and plane.raw is None and plane.nbytes == numel
        assert [(f.start, f.nbytes) for f in plane.frames] == [
            (0, SMALL_FRAME), (SMALL_FRAME, SMALL_FRAME), (2 * SMALL_FRAME, SMALL_FRAME),
            (3 * SMALL_FRAME, 17)]


@pytest.mark.parametrize("dtype", OTHERS + [torch.complex64, torch.int32], ids=_id)
def test_other_dtypes_are_one_raw_plane(dtype):
    t = torch.zeros(100, 3, dtype=dtype)  # compressible, but non-floats are never compressed
    packed = pack(t, frame_nbytes=64)
    assert not packed.split
    [plane] = packed.planes
    assert plane.index == 0 and not plane.compressed and plane.frames == ()
    assert plane.nbytes == len(plane.raw) == t.numel() * t.element_size()
    assert packed.nbytes == packed.raw_nbytes and packed.ratio == 1.0
    assert_bit_equal(decode(packed), t)


def test_bf16_lo_plane_raw_hi_plane_compressed():
    t = random_tensor(torch.bfloat16, (1 << 16,))
    lo, hi = pack(t).planes
    assert (lo.index, hi.index) == (0, 1)
    assert not lo.compressed and lo.frames == ()
    assert bytes(lo.raw) == _bytes(t)[0::2].numpy().tobytes()
    assert hi.compressed and hi.raw is None
    assert sum(len(f.data) for f in hi.frames) < 0.6 * hi.nbytes


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_sizes_are_consistent(dtype):
    t = random_tensor(dtype, (3000,))
    packed = pack(t, frame_nbytes=1000)
    held = sum(len(p.raw) if p.raw is not None else sum(len(f.data) for f in p.frames)
               for p in packed.planes)
    assert packed.nbytes == held
    assert packed.numel == 3000 and packed.itemsize == t.element_size()
    assert packed.raw_nbytes == t.numel() * t.element_size()
    assert packed.ratio == pytest.approx(packed.raw_nbytes / packed.nbytes)
    assert packed.num_chunks == 3


@pytest.mark.parametrize("shape", [(0,), (0, 5), (4, 0)], ids=_id)
def test_empty_tensor(shape):
    packed = pack(torch.empty(shape, dtype=torch.bfloat16))
    assert packed.nbytes == 0 and packed.ratio == 1.0 and packed.num_chunks == 0
    assert decode(packed).shape == torch.Size(shape)


def test_decode_into_fills_given_tensor():
    t = random_tensor(torch.bfloat16, (40, 300))
    packed = pack(t, frame_nbytes=SMALL_FRAME)
    out = torch.full((40, 300), 7.0, dtype=torch.bfloat16)
    decode_into(packed, out)
    assert_bit_equal(out, t)
    flat = torch.empty(12000, dtype=torch.bfloat16)  # same numel, other shape is fine
    decode_into(packed, flat)
    assert torch.equal(_bytes(flat), _bytes(t))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8], ids=_id)
def test_concurrent_decode_chunk_into(dtype):
    t = random_tensor(dtype, (SMALL_FRAME * 20 + 5,))
    packed = pack(t, frame_nbytes=SMALL_FRAME)
    # Different chunks concurrently, in random order (the contract: a chunk's merge is several
    # in-place passes, so one chunk is never decoded by two threads at once).
    chunks = list(range(packed.num_chunks))
    random.Random(0).shuffle(chunks)
    out = torch.empty_like(t)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda j: decode_chunk_into(packed, j, out), chunks))
    assert_bit_equal(out, t)


@pytest.mark.parametrize("kind", ["ndarray", "tensor", "memoryview"])
def test_decode_frame_into(kind):
    t = random_tensor(torch.bfloat16, (SMALL_FRAME + 100,))
    hi = pack(t, frame_nbytes=SMALL_FRAME).planes[1]
    expected = _bytes(t)[1::2]
    for frame in hi.frames:
        buf = np.empty(frame.nbytes, np.uint8)
        dst = {"ndarray": buf, "tensor": torch.from_numpy(buf), "memoryview": memoryview(buf)}[kind]
        decode_frame_into(frame, dst)
        assert torch.equal(torch.from_numpy(buf), expected[frame.start:frame.start + frame.nbytes])


def test_decode_frame_into_rejects_wrong_dst():
    frame = pack(torch.zeros(100, dtype=torch.bfloat16)).planes[1].frames[0]
    with pytest.raises(ConfigError, match="`dst`"):
        decode_frame_into(frame, np.empty(99, np.uint8))
    with pytest.raises(ConfigError, match="`dst`"):
        decode_frame_into(frame, bytes(100))  # read-only


def _rebuild_in_arena(packed: Packed) -> Packed:
    """Copy every buffer into one arena and point the Packed at views into it, here at
    unaligned offsets: decoding reads buffers through the buffer protocol only."""
    buffers = [b for plane in packed.planes for b in plane.buffers()]
    arena = np.zeros(sum(len(b) for b in buffers) + 3, np.uint8)  # +3: unaligned offsets
    offset, placed = 3, []
    for b in buffers:
        arena[offset:offset + len(b)] = np.frombuffer(b, np.uint8)
        placed.append(memoryview(arena)[offset:offset + len(b)])
        offset += len(b)
    views, planes = iter(placed), []
    for plane in packed.planes:
        if plane.raw is not None:
            planes.append(dataclasses.replace(plane, raw=next(views)))
        elif plane.nibbles is not None:
            planes.append(dataclasses.replace(plane, nibbles=nibble.Nibbles(*(next(views) for _ in range(4)))))
        else:
            planes.append(dataclasses.replace(plane, frames=tuple(dataclasses.replace(f, data=next(views))
                                                                  for f in plane.frames)))
    return dataclasses.replace(packed, planes=tuple(planes))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.int64], ids=_id)
def test_decode_from_arena_memoryviews(dtype):
    t = random_tensor(dtype, (SMALL_FRAME * 2 + 9,))
    packed = _rebuild_in_arena(pack(t, frame_nbytes=SMALL_FRAME))
    assert all(isinstance(p.raw, memoryview) or all(isinstance(f.data, memoryview)
                                                    for f in p.frames) for p in packed.planes)
    assert_bit_equal(decode(packed), t)
    out = torch.empty_like(t)
    for j in reversed(range(packed.num_chunks)):
        decode_chunk_into(packed, j, out)
    assert_bit_equal(out, t)
    assert packed.nbytes == pack(t, frame_nbytes=SMALL_FRAME).nbytes


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 8), max_size=3)))
    numel = int(np.prod(shape))
    data = draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize))
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


@settings(max_examples=2000 if FUZZ else 60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(t=tensors(), frame_nbytes=st.sampled_from([1, 7, 64, 1 << 20]))
def test_round_trip_property(t, frame_nbytes):
    packed = pack(t, frame_nbytes=frame_nbytes)
    assert_bit_equal(decode(packed), t)
    assert packed.num_chunks == -(-t.numel() // frame_nbytes)


# --- bad input ---------------------------------------------------------------------------------


def _packed_bf16() -> Packed:
    """bf16 whose hi plane (index 1) is compressed in 3 frames and lo plane (index 0) raw."""
    packed = pack(random_tensor(torch.bfloat16, (SMALL_FRAME * 2 + 100,)), frame_nbytes=SMALL_FRAME)
    assert packed.planes[1].compressed and not packed.planes[0].compressed
    return packed


def _with_frame(packed: Packed, j: int, **changes) -> Packed:
    hi = packed.planes[1]
    frames = list(hi.frames)
    frames[j] = dataclasses.replace(frames[j], **changes)
    return dataclasses.replace(packed, planes=(packed.planes[0],
                                               dataclasses.replace(hi, frames=tuple(frames))))


def _flip_middle(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x10
    return bytes(b)


FRAME_CORRUPTIONS = {
    "truncated": lambda f: {"data": f.data[:-9]},
    "truncated_to_header": lambda f: {"data": f.data[:5]},
    "empty": lambda f: {"data": b""},
    "flipped_byte": lambda f: {"data": _flip_middle(f.data)},
    "flipped_checksum": lambda f: {"data": f.data[:-1] + bytes([f.data[-1] ^ 1])},
    "trailing_garbage": lambda f: {"data": f.data + b"garbage!"},
    "trailing_frame": lambda f: {"data": f.data + f.data},
    "nbytes_mismatch": lambda f: {"nbytes": f.nbytes - 1},
    "start_mismatch": lambda f: {"start": f.start + 1},
}


@pytest.mark.parametrize("corruption", FRAME_CORRUPTIONS)
def test_corrupt_frame_raises_format_error(corruption):
    good = _packed_bf16()
    j = 1
    bad = _with_frame(good, j, **FRAME_CORRUPTIONS[corruption](good.planes[1].frames[j]))
    with pytest.raises(FormatError, match=r"bfloat16 .*\(8292,\), plane 1 frame 1"):
        decode(bad)
    out = torch.empty(8292, dtype=torch.bfloat16)
    decode_chunk_into(bad, 0, out)  # other chunks are still fine
    with pytest.raises(FormatError, match="plane 1 frame 1"):
        decode_chunk_into(bad, j, out)
    assert_bit_equal(decode(good), decode(good))  # this thread's decompressor still works


def test_frame_with_other_frames_content_raises():
    good = _packed_bf16()
    last = good.planes[1].frames[2]  # 100 elements, header records 100 bytes
    bad = _with_frame(good, 0, data=last.data)
    with pytest.raises(FormatError, match="plane 1 frame 0: .*records 100 bytes"):
        decode(bad)


def test_corrupt_frame_into_dst_raises_format_error():
    frame = _packed_bf16().planes[1].frames[0]
    bad = dataclasses.replace(frame, data=_flip_middle(frame.data))
    with pytest.raises(FormatError, match="frame at plane offset 0"):
        decode_frame_into(bad, np.empty(frame.nbytes, np.uint8))


@pytest.mark.parametrize("problem", ["missing_frame", "extra_frame", "short_raw", "long_raw",
                                     "missing_plane", "wrong_index", "raw_and_frames"])
def test_malformed_planes_raise_format_error(problem):
    good = _packed_bf16()
    lo, hi = good.planes
    planes = {
        "missing_frame": (lo, dataclasses.replace(hi, frames=hi.frames[:-1])),
        "extra_frame": (lo, dataclasses.replace(hi, frames=hi.frames + hi.frames[-1:])),
        "short_raw": (dataclasses.replace(lo, raw=lo.raw[:-1]), hi),
        "long_raw": (dataclasses.replace(lo, raw=lo.raw + b"\0"), hi),
        "missing_plane": (hi,),
        "wrong_index": (dataclasses.replace(lo, index=1), hi),
        "raw_and_frames": (dataclasses.replace(lo, frames=hi.frames), hi),
    }[problem]
    with pytest.raises(FormatError, match=r"bfloat16 tensor of shape \(8292,\)"):
        decode(dataclasses.replace(good, planes=planes))


def _flip_byte(buf, at: int) -> bytes:
    b = bytearray(bytes(buf))
    b[at] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64], ids=_id)
def test_decode_checks_the_tensors_crc32_where_raw_planes_have_none(dtype):
    # A raw plane has no zstd checksum: only the tensor's crc32 catches one flipped bit in it.
    packed = pack(random_tensor(dtype, (3000,)), frame_nbytes=SMALL_FRAME)
    i = next(i for i, p in enumerate(packed.planes) if p.raw is not None)
    planes = list(packed.planes)
    planes[i] = dataclasses.replace(planes[i], raw=_flip_byte(planes[i].raw, 1234))
    bad = dataclasses.replace(packed, planes=tuple(planes))
    with pytest.raises(FormatError, match=rf"{str(dtype)[6:]} tensor of shape \(3000,\): the decoded bytes have crc32"):
        decode(bad)
    # Without a recorded checksum (a hand-built Packed) the same bytes decode unchecked.
    decode(dataclasses.replace(bad, crc32=None))


def test_unsplit_raw_plane_wrong_length_raises():
    packed = pack(torch.arange(10))
    [plane] = packed.planes
    bad = dataclasses.replace(packed, planes=(dataclasses.replace(plane, raw=plane.raw[:-8]),))
    with pytest.raises(FormatError, match="int64 .*plane 0: raw plane holds 72 bytes"):
        decode(bad)


@pytest.mark.parametrize("out", [torch.empty(8292, dtype=torch.float16),
                                 torch.empty(8291, dtype=torch.bfloat16),
                                 torch.empty(2, 8292, dtype=torch.bfloat16)[:, 0],
                                 np.empty(8292, np.uint16)],
                         ids=["wrong_dtype", "wrong_numel", "non_contiguous", "not_a_tensor"])
def test_decode_into_rejects_bad_out(out):
    with pytest.raises(ConfigError, match="`out`"):
        decode_into(_packed_bf16(), out)


def test_decode_chunk_into_rejects_bad_index():
    packed = _packed_bf16()
    with pytest.raises(ConfigError, match="`j`"):
        decode_chunk_into(packed, packed.num_chunks, torch.empty(8292, dtype=torch.bfloat16))


@pytest.mark.parametrize("kwargs", [{"level": 99}, {"level": 2.5}, {"frame_nbytes": 0},
                                    {"frame_nbytes": 1.5}], ids=_id)
def test_pack_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError, match=f"`{next(iter(kwargs))}`"):
        pack(torch.zeros(4), **kwargs)


def test_pack_rejects_non_tensor():
    with pytest.raises(ConfigError, match="`tensor`"):
        pack(np.zeros(4))


def test_dataclasses_are_frozen():
    packed = pack(torch.zeros(4))
    for obj in (packed, packed.planes[0], Plane(0, 0, b"", ()), Frame(0, 0, b"")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.index = 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int32])
def test_pack_without_compression_keeps_every_plane_raw(dtype):
    t = random_tensor(dtype, (3000,))
    packed = pack(t, compress=False)
    assert all(p.raw is not None and p.frames == () for p in packed.planes)
    assert packed.nbytes == t.numel() * t.element_size() and len(packed.planes) == (1 if dtype == torch.int32 else dtype.itemsize)
    assert_bit_equal(decode(packed), t)
