"""The wire image (`image.py`): the layout a device lands and expands or merges, and the way back.

Every tensor comes back bit-exactly, by itself (leaving a session) and as the slot a fetch
fills, with either code, whatever the dtypes, odd lengths, special values, chunk cuts through
tensors and frames, patches, or a unit not worth coding; and a changed byte fails the tensor's
crc32, never wrong numbers.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vzstream import codec, image
from vzstream.backends.cpu import image_jobs
from vzstream.errors import FormatError

CODINGS = ["nibble", "zstd"]


def _alloc(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def _specials() -> torch.Tensor:
    bits = torch.tensor([0x7FC1, 0xFFC0, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x807F, 0x3F80], dtype=torch.int32)
    return bits.to(torch.int16).view(torch.bfloat16)     # NaN payloads, +-inf, -0.0, subnormals, 1.0


def _unit(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    wild = torch.exp(torch.linspace(-80, 80, 999)).to(torch.bfloat16)      # top bytes the table misses
    return [(torch.randn(70001, generator=g) * 0.02).to(torch.bfloat16), torch.randn(1000, generator=g),
            _specials(), torch.randn(33, 3, generator=g).to(torch.float16), wild,
            torch.arange(-5, 5, dtype=torch.int64), torch.empty(0, 4, dtype=torch.bfloat16),
            torch.rand(17, generator=g) > 0.5, (torch.randn(5001, generator=g) * 0.02).to(torch.bfloat16)]


def _slot(img: image.Image, nbytes: int) -> np.ndarray:
    """A slot filled as the CPU backend fills it (its jobs: chunks, frames, the raw area)."""
    slot = np.full(nbytes, 0xCD, np.uint8)
    for job in image_jobs(img, slot):
        for _, work in job:
            work()
    return slot


def _check(tensors, img, entries) -> None:
    slot = _slot(img, max(e.slot_offset + e.raw_nbytes for e in entries) + 1)
    for t, e in zip(tensors, entries):
        want = t.reshape(-1).view(torch.uint8)
        assert torch.equal(e.decode().reshape(-1).view(torch.uint8), want)
        assert e.dtype == t.dtype and e.shape == t.shape
        assert torch.equal(torch.from_numpy(slot[e.slot_offset : e.slot_offset + e.raw_nbytes].copy()), want)


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("chunk", [image.CHUNK_NBYTES, 120000, 40000])   # cuts through tensors
def test_every_tensor_comes_back_whole_and_in_its_slot(coding, chunk, monkeypatch):
    monkeypatch.setattr(image, "CHUNK_NBYTES", chunk)
    monkeypatch.setattr(codec, "FRAME_NBYTES", 7001)                     # zstd frames cut across tensors
    tensors = _unit()
    img, entries = image.pack_image(tensors, 512, _alloc, coding)
    assert img.coding == coding and img.itemsize == 2 and img.chunks
    assert len(img.chunks) == -(-img.coded_nbytes // chunk)
    if coding == "nibble":
        assert sum(c.patches for c in img.chunks) > 0
    else:
        assert all(len(c.frames) == -(-c.numel // 7001) for c in img.chunks)
    assert img.arena.numel() < 0.85 * sum(t.numel() * t.element_size() for t in tensors)
    _check(tensors, img, entries)


def test_zstd_codes_the_float_itemsize_with_the_most_bytes():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(20000, generator=g) * 0.02, (torch.randn(300, generator=g) * 0.02).to(torch.bfloat16)]
    img, entries = image.pack_image(tensors, 512, _alloc, "zstd")
    assert img.itemsize == 4 and img.coded_nbytes == 80384 and entries[1].slot_offset >= img.coded_nbytes
    _check(tensors, img, entries)
    img, _ = image.pack_image(tensors, 512, _alloc, "nibble")            # nibble codes 2-byte floats only
    assert img.itemsize == 2 and entries[0].slot_offset >= img.coded_nbytes or img.chunks == ()


@pytest.mark.parametrize("coding", CODINGS)
def test_a_unit_not_worth_coding_is_one_raw_area(coding):
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(-32768, 32767, (4096,), dtype=torch.int16, generator=g).view(torch.bfloat16)
    tensors = [noise, torch.randn(10, generator=g)]
    img, entries = image.pack_image(tensors, 512, _alloc, coding)
    assert img.chunks == () and img.coded_nbytes == 0 and img.wire_nbytes == img.raw_nbytes
    _check(tensors, img, entries)
    img, entries = image.pack_image(_unit(), 512, _alloc, None)          # or asked to stay raw
    assert img.chunks == () and img.coding is None
    _check(_unit(), img, entries)


def test_the_lane_comes_first_each_tensor_aligned():
    tensors = _unit()
    offsets, coded = image.slot_layout(tensors, 512, 2)
    two = [o for o, t in zip(offsets, tensors) if t.dtype.is_floating_point and t.element_size() == 2]
    rest = [o for o, t in zip(offsets, tensors) if o not in two]
    assert all(o % 512 == 0 for o in offsets) and max(two) < coded <= min(rest) and coded % 512 == 0


@pytest.mark.parametrize("coding", CODINGS)
def test_a_changed_byte_fails_the_tensors_crc32(coding):
    tensors = _unit()
    img, entries = image.pack_image(tensors, 512, _alloc, coding)
    c = img.chunks[0]
    at = c.offset + (image.PAIRS_NBYTES if coding == "nibble" else 0) + 10    # a low byte of the first tensor
    img.arena[at] ^= 1
    with pytest.raises(FormatError, match="crc32"):
        entries[0].decode()
    assert torch.equal(entries[2].decode().view(torch.int16), _specials().view(torch.int16))   # the others intact


def test_a_corrupt_zstd_frame_is_a_format_error():
    img, entries = image.pack_image(_unit(), 512, _alloc, "zstd")
    frame = img.chunks[0].frames[0]
    np.frombuffer(frame.data, np.uint8)[len(frame.data) // 2] ^= 0xFF
    with pytest.raises(FormatError, match="tensor of shape"):
        entries[0].decode()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=3000), st.integers(2, 40), st.sampled_from(CODINGS))
def test_any_bits_round_trip(values, chunk, coding):
    bits = torch.tensor(values, dtype=torch.int32).to(torch.int16)
    common = (torch.randn(len(values), generator=torch.Generator().manual_seed(len(values))) * 0.02).to(torch.bfloat16)
    tensors = [bits.view(torch.bfloat16), common]
    old, image.CHUNK_NBYTES = image.CHUNK_NBYTES, 4 * chunk
    try:
        img, entries = image.pack_image(tensors, 2, _alloc, coding)
    finally:
        image.CHUNK_NBYTES = old
    _check(tensors, img, entries)
