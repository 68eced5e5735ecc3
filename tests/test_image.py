"""The wire image (`image.py`): the layout a device lands and expands, and the way back.

Every tensor comes back bit-exactly, by itself (leaving a session) and as the slot a fetch
fills, whatever the dtypes, odd lengths, special values, chunk cuts through tensors, patches,
or a unit not worth coding; and a changed byte fails the tensor's crc32, never wrong numbers.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vzstream import image
from vzstream.errors import FormatError


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
    """A slot filled as the CPU backend fills it: each chunk expanded, the raw area copied."""
    slot = np.full(nbytes, 0xCD, np.uint8)
    coded = slot[: img.coded_nbytes].view(np.uint16)
    for c in img.chunks:
        img.expand_into(c, coded[c.start : c.start + c.numel])
    slot[img.coded_nbytes :][: img.raw_nbytes] = img.arena.numpy()[img.raw_offset :][: img.raw_nbytes]
    return slot


def _check(tensors, img, entries) -> None:
    slot = _slot(img, max(e.slot_offset + e.raw_nbytes for e in entries) + 1)
    for t, e in zip(tensors, entries):
        want = t.reshape(-1).view(torch.uint8)
        assert torch.equal(e.decode().reshape(-1).view(torch.uint8), want)
        assert e.dtype == t.dtype and e.shape == t.shape
        assert torch.equal(torch.from_numpy(slot[e.slot_offset : e.slot_offset + e.raw_nbytes].copy()), want)


@pytest.mark.parametrize("chunk", [image.CHUNK_ELEMS, 60000, 20000])   # cuts through tensors
def test_every_tensor_comes_back_whole_and_in_its_slot(chunk, monkeypatch):
    monkeypatch.setattr(image, "CHUNK_ELEMS", chunk)
    tensors = _unit()
    img, entries = image.pack_image(tensors, 512, _alloc)
    assert img.chunks and sum(c.patches for c in img.chunks) > 0
    assert len(img.chunks) == -(-img.coded_nbytes // 2 // chunk)
    assert img.wire_nbytes < 0.85 * sum(t.numel() * t.element_size() for t in tensors)
    _check(tensors, img, entries)


def test_a_unit_not_worth_coding_is_one_raw_area():
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(-32768, 32767, (4096,), dtype=torch.int16, generator=g).view(torch.bfloat16)
    tensors = [noise, torch.randn(10, generator=g)]
    img, entries = image.pack_image(tensors, 512, _alloc)
    assert img.chunks == () and img.coded_nbytes == 0 and img.wire_nbytes == img.raw_nbytes
    _check(tensors, img, entries)
    img, entries = image.pack_image(_unit(), 512, _alloc, compress=False)   # or asked to stay raw
    assert img.chunks == ()
    _check(_unit(), img, entries)


def test_two_byte_floats_come_first_each_aligned():
    tensors = _unit()
    offsets, coded = image.slot_layout(tensors, 512)
    two = [o for o, t in zip(offsets, tensors) if t.dtype.is_floating_point and t.element_size() == 2]
    rest = [o for o, t in zip(offsets, tensors) if o not in two]
    assert all(o % 512 == 0 for o in offsets) and max(two) < coded <= min(rest) and coded % 512 == 0


def test_a_changed_byte_fails_the_tensors_crc32():
    tensors = _unit()
    img, entries = image.pack_image(tensors, 512, _alloc)
    c = img.chunks[0]
    img.arena[c.offset + image.PAIRS_NBYTES + 10] ^= 1           # a low byte of the first tensor
    with pytest.raises(FormatError, match="crc32"):
        entries[0].decode()
    assert torch.equal(entries[2].decode().view(torch.int16), _specials().view(torch.int16))   # the others intact


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=3000), st.integers(2, 40))
def test_any_bits_round_trip(values, chunk):
    bits = torch.tensor(values, dtype=torch.int32).to(torch.int16)
    common = (torch.randn(len(values), generator=torch.Generator().manual_seed(len(values))) * 0.02).to(torch.bfloat16)
    tensors = [bits.view(torch.bfloat16), common]
    import vzstream.image as mod
    old, mod.CHUNK_ELEMS = mod.CHUNK_ELEMS, 2 * chunk
    try:
        img, entries = image.pack_image(tensors, 2, _alloc)
    finally:
        mod.CHUNK_ELEMS = old
    _check(tensors, img, entries)
