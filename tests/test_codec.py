"""codec.py and decode.py: zstd frames of a wire image's top plane decode bit-exactly on any thread
into a caller's buffer, and a wrong buffer or a corrupt frame is an error, never wrong numbers;
codec names and zstd levels are parsed in one place. Whole-image round trips are test_image.py's."""

import dataclasses
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zstandard as zstd
from hypothesis import given, settings
from hypothesis import strategies as st

from vzstream import codec, decode, image
from vzstream.codec import Codec
from vzstream.errors import ConfigError, FormatError

SMALL_FRAME = 4096      # several frames per test tensor while staying fast
NUMEL = 2 * SMALL_FRAME + 100
FUZZ = os.environ.get("VZSTREAM_FUZZ") == "1"     # longer hypothesis runs


def _alloc(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def weights(n: int = NUMEL, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.05).to(torch.bfloat16)


def top_bytes(t: torch.Tensor) -> np.ndarray:
    """What a bf16 tensor's zstd frames hold: the high byte of each element."""
    return t.reshape(-1).view(torch.uint8).numpy()[1::2]


def zstd_frames(t: torch.Tensor, frame_nbytes: int = SMALL_FRAME, level: int | None = None) -> list:
    """The top-plane frames `pack_image` makes of `t` alone (alignment 2: no padding, so a frame's
    `start` is an element index of `t`); their data are views into the image's arena."""
    old, codec.FRAME_NBYTES = codec.FRAME_NBYTES, frame_nbytes
    try:
        img, _ = image.pack_image([t], 2, _alloc, "zstd", level)
    finally:
        codec.FRAME_NBYTES = old
    assert img.coding == "zstd" and len(img.chunks) == 1, "the test tensor must be coded, in one chunk"
    return img.frames


# -- decode_frame_into -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ndarray", "tensor", "bf16_tensor", "memoryview", "bytearray"])
def test_each_frame_decodes_into_any_writable_buffer(kind):
    t = weights()
    frames = zstd_frames(t)
    assert [(f.start, f.nbytes) for f in frames] == [(0, SMALL_FRAME), (SMALL_FRAME, SMALL_FRAME),
                                                     (2 * SMALL_FRAME, 100)]
    for f in frames:
        buf = np.full(f.nbytes, 0xCD, np.uint8)
        dst = {"ndarray": buf, "tensor": torch.from_numpy(buf), "memoryview": memoryview(buf),
               "bf16_tensor": torch.from_numpy(buf).view(torch.bfloat16),     # the bytes count, not the dtype
               "bytearray": None}[kind]
        if kind == "bytearray":
            dst = bytearray(f.nbytes)
            decode.decode_frame_into(f, dst)
            buf = np.frombuffer(dst, np.uint8)
        else:
            decode.decode_frame_into(f, dst)
        assert np.array_equal(buf, top_bytes(t)[f.start : f.start + f.nbytes])


@pytest.mark.parametrize("level", [None, -1, 3])
def test_frames_record_their_size_and_a_checksum(level):
    # What makes a truncated or flipped frame detectable: both fields, whatever the level.
    for f in zstd_frames(weights(), level=level):
        params = zstd.get_frame_parameters(bytes(f.data))
        assert params.content_size == f.nbytes and params.has_checksum


@settings(max_examples=2000 if FUZZ else 60, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from([None, -1, 3]))
def test_any_bytes_survive_a_frame(data, level):
    params = codec._FAST_PARAMS if level is None else zstd.ZstdCompressionParameters.from_level(
        level, write_content_size=True, write_checksum=True)         # as `image.pack_image` makes them
    frame = codec.Frame(7, len(data), zstd.ZstdCompressor(compression_params=params).compress(data))
    out = bytearray(b"\xcd" * len(data))
    decode.decode_frame_into(frame, out)
    assert out == data


def test_frames_decode_concurrently_in_any_order():
    t = weights(40 * 1000 + 7, seed=1)
    frames = zstd_frames(t, frame_nbytes=1000)
    assert len(frames) == 41
    random.Random(0).shuffle(frames)
    out = np.full(t.numel(), 0xCD, np.uint8)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda f: decode.decode_frame_into(f, out[f.start : f.start + f.nbytes]), frames))
    assert np.array_equal(out, top_bytes(t))


@pytest.mark.parametrize("dst", [
    pytest.param(lambda n: np.empty(n - 1, np.uint8), id="short"),
    pytest.param(lambda n: np.empty(n + 1, np.uint8), id="long"),
    pytest.param(lambda n: bytes(n), id="readonly_bytes"),
    pytest.param(lambda n: np.frombuffer(bytes(n), np.uint8), id="readonly_ndarray"),
    pytest.param(lambda n: np.empty(2 * n, np.uint8)[::2], id="strided_ndarray"),
    pytest.param(lambda n: torch.empty(n, 2, dtype=torch.uint8)[:, 0], id="strided_tensor"),
    pytest.param(lambda n: [0] * n, id="not_a_buffer"),
])
def test_a_wrong_dst_is_a_config_error_and_left_unwritten(dst):
    f = zstd_frames(weights())[0]
    target = dst(f.nbytes)
    before = _snapshot(target)
    with pytest.raises(ConfigError, match="`dst`"):
        decode.decode_frame_into(f, target)
    assert _snapshot(target) == before          # refused before a byte was written


def _snapshot(buf) -> bytes | None:
    if isinstance(buf, torch.Tensor):
        return bytes(buf.contiguous().numpy())
    return np.ascontiguousarray(buf).tobytes() if isinstance(buf, np.ndarray) else None


def _flip_middle(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x10
    return bytes(b)


CORRUPTIONS = {
    "truncated": lambda d: d[:-9],
    "truncated_to_header": lambda d: d[:5],
    "empty": lambda d: b"",
    "flipped_byte": _flip_middle,
    "flipped_checksum": lambda d: d[:-1] + bytes([d[-1] ^ 1]),
    "trailing_garbage": lambda d: d + b"garbage!",
    "trailing_frame": lambda d: d + d,
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_frame_is_a_format_error(corruption):
    t = weights()
    good = zstd_frames(t)[1]
    bad = dataclasses.replace(good, data=CORRUPTIONS[corruption](bytes(good.data)))
    with pytest.raises(FormatError, match=rf"frame at plane offset {SMALL_FRAME} \({SMALL_FRAME} bytes\): "):
        decode.decode_frame_into(bad, np.empty(good.nbytes, np.uint8))
    out = np.empty(good.nbytes, np.uint8)        # this thread's decompressor still works
    decode.decode_frame_into(good, out)
    assert np.array_equal(out, top_bytes(t)[SMALL_FRAME : 2 * SMALL_FRAME])


def test_a_frame_of_another_length_is_a_format_error():
    first, _, last = zstd_frames(weights())          # the last frame holds 100 bytes
    with pytest.raises(FormatError, match="header records 100 bytes, expected 4096"):
        decode.decode_frame_into(dataclasses.replace(first, data=last.data), np.empty(first.nbytes, np.uint8))
    short = dataclasses.replace(first, nbytes=first.nbytes - 1)     # a record that lies about its size
    with pytest.raises(FormatError, match="records 4096 bytes, expected 4095"):
        decode.decode_frame_into(short, np.empty(short.nbytes, np.uint8))


def test_frames_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        zstd_frames(weights())[0].nbytes = 1


# -- thread_scratch and decode ---------------------------------------------------------------------

def test_thread_scratch_grows_and_is_one_buffer_per_thread():
    small = decode.thread_scratch(10)
    big = decode.thread_scratch(small.size + 1)
    assert big.size >= small.size + 1 and decode.thread_scratch(5) is big      # reused once grown
    other = []
    worker = threading.Thread(target=lambda: other.append(decode.thread_scratch(5)))
    worker.start()
    worker.join()
    assert not np.shares_memory(other[0], big)


def test_decode_returns_an_image_tensor_whole_and_refuses_anything_else():
    t = weights()
    _, [entry] = image.pack_image([t], 2, _alloc, "zstd")
    out = decode.decode(entry)
    assert out.dtype == t.dtype and out.shape == t.shape
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))
    with pytest.raises(ConfigError, match="`tensor` must be an image.ImageTensor"):
        decode.decode(t)


# -- codec names and zstd levels ----------------------------------------------------------------------

@pytest.mark.parametrize("value", ["zstd", "nibble", "auto", *Codec])
def test_parse_codec_takes_names_and_members(value):
    assert codec.parse_codec(value) is Codec(value)


def test_codings_are_the_codecs_an_image_codes_with():
    assert codec.CODECS == ("zstd", "nibble", "auto") and codec.CODINGS == ("zstd", "nibble")


@pytest.mark.parametrize("value", ["lz4", "ZSTD", "", None, 2, ["zstd"]], ids=repr)
@pytest.mark.parametrize("name", ["codec", "coding"])
def test_parse_codec_names_the_argument_and_what_each_codec_trades(value, name):
    with pytest.raises(ConfigError) as err:
        codec.parse_codec(value, name)
    message = str(err.value)
    assert f"`{name}` must be one of ('zstd', 'nibble', 'auto'); got {value!r}" in message
    assert "host RAM" in message and "device expands" in message and "host decode" in message


@pytest.mark.parametrize("level", [None, codec.MIN_LEVEL, -1, 0, 3, codec.MAX_LEVEL])
def test_check_level_accepts_none_and_the_range(level):
    codec.check_level(level)


@pytest.mark.parametrize("level", [codec.MIN_LEVEL - 1, codec.MAX_LEVEL + 1, 2.5, True, "3"], ids=repr)
def test_check_level_refuses_the_rest(level):
    with pytest.raises(ConfigError, match=rf"`level` must be None or an int zstd level in \[-7, 22\]; got {level!r}"):
        codec.check_level(level)
