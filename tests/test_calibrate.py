"""`raw_fraction="auto"`: the balance rule, the decode measurement, the units it keeps raw, and
sessions that use it (bit-exact whatever it chooses). No timing is asserted beyond "positive"."""

import pytest
import torch
from models import TinyLM, build

import vzstream
from vzstream import calibrate
from vzstream.backends.fake import FakeBackend
from vzstream.units import find_units
from vzstream.store import SMALL_UNIT_NBYTES, pack_unit


@pytest.mark.parametrize("decode, upload, fraction", [
    (10.0, 50.0, 0.8), (23.4, 55.2, 0.58), (50.0, 50.0, 0.0), (80.0, 50.0, 0.0),
    (None, 50.0, 0.0), (10.0, None, 0.0), (0.0, 50.0, 0.0)])
def test_balanced_fraction_equalises_decode_and_upload_time(decode, upload, fraction):
    assert calibrate.balanced_fraction(decode, upload) == fraction
    if fraction:      # (1 - f) B / W_dec == B / W_pcie, to the rounding
        assert (1 - fraction) / decode == pytest.approx(1 / upload, rel=0.02)


def _stores(compress: bool):
    model = build(TinyLM, dtype=torch.bfloat16, tied=True)
    units = find_units(model, "blocks")
    return [pack_unit(u, FakeBackend(), None, compress) for u in units if u.raw_nbytes]


def test_decode_gbps_measures_compressed_frames_only():
    assert calibrate.decode_gbps(_stores(compress=False), workers=2) is None    # nothing to decode
    rate = calibrate.decode_gbps(_stores(compress=True), workers=2, rounds=1)
    assert rate is not None and rate > 0


def test_raw_units_keeps_the_share_and_makes_up_for_kept_units():
    class U:
        def __init__(self, index, nbytes):
            self.index, self.raw_nbytes = index, nbytes

    units = [U(i, 100) for i in range(10)]
    assert len(calibrate.raw_units(units, 0.5)) == 5 and calibrate.raw_units(units, 0.0) == set()
    assert calibrate.raw_units(units, 1.0) == set(range(10))
    kept = calibrate.raw_units(units, 0.8, keep={0})
    assert 0 not in kept and len(kept) == 8          # the units after the sample make up its share
    assert calibrate.raw_units(units, 1.0, keep={0, 5}) == set(range(10)) - {0, 5}
    assert len(calibrate.raw_units(units, 0.8, keep={9})) == 8     # a kept unit at the end is made up for too


def _tiny_lm_and_reference():
    model = build(TinyLM, dtype=torch.bfloat16, tied=True)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    return model, ids, ref


@pytest.mark.parametrize("upload_gbps, expect", [(None, "none"), (1e-3, "none"), (1e6, "most")])
def test_auto_session_measures_keeps_raw_what_decode_cannot_carry_and_stays_exact(upload_gbps, expect, snapshot,
                                                                                  slots_ok):
    """CPU backend (no bus): nothing raw, nothing measured. A bus far slower than decode: nothing
    raw. A bus far faster: every unit raw but the one measured on, the largest (it stays compressed)."""
    model, ids, ref = _tiny_lm_and_reference()
    snap = snapshot(model)
    backend = FakeBackend(upload_gbps=upload_gbps)
    with vzstream.session(model, backend=backend, prefetch=2, units="leaves", raw_fraction="auto", codec="zstd") as s:
        for _ in range(2):
            assert torch.equal(s(ids), ref)
            slots_ok(s)
        stats = s.stats()
        # Units under 4 KiB (norms, as leaves) are stored raw whatever the fraction.
        small = sum(st.raw_nbytes for st in s.stores.values() if st.raw_nbytes < SMALL_UNIT_NBYTES)
        compressed = [st.compressed for st in s.stores.values() if st.raw_nbytes >= SMALL_UNIT_NBYTES]
        largest = max(s.stores.values(), key=lambda st: st.raw_nbytes)
    snap.check(model)
    assert s.config.raw_fraction == "auto"
    assert stats.upload_gbps_measured == (upload_gbps or 0.0)
    assert (stats.decode_gbps_measured > 0) == (upload_gbps is not None)
    if expect == "none":
        assert all(compressed) and 0 < small == stats.uncompressed_nbytes < 0.01 * stats.raw_nbytes
    else:
        assert compressed.count(True) == 1 and largest.compressed  # the sample
        assert 0.5 < stats.raw_fraction < 1.0
        assert "kept uncompressed" in str(stats) and "measured decode" in str(stats)


def test_auto_under_a_budget_measures_on_a_streamed_unit(snapshot):
    """With a budget, the sample is the largest unit planned to stream, not a resident one."""
    model, ids, ref = _tiny_lm_and_reference()
    snap = snapshot(model)
    backend = FakeBackend(upload_gbps=1e6)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    with vzstream.session(model, backend=backend, prefetch=1, units="leaves", raw_fraction="auto", codec="zstd",
                          vram_budget=total * 4 // 5, activation_reserve=0) as s:
        assert torch.equal(s(ids), ref)
        streamed = [u for u in s.units if u.streamed]
        assert 0 < len(streamed) < len(s.units)
        probe = max(streamed, key=lambda u: u.raw_nbytes)
        assert [s.stores[u.index].compressed for u in streamed] == [u is probe for u in streamed]
    snap.check(model)


def test_decode_gbps_caps_the_sample_and_gives_each_worker_four_frames(monkeypatch):
    stores = _stores(compress=True)
    frames = [f for s in stores for f in s.image.frames]
    assert len(frames) > 1
    decoded = []
    monkeypatch.setattr(calibrate.decode, "decode_frame_into", lambda f, dst: decoded.append(f))
    assert calibrate.decode_gbps(stores, workers=3, rounds=2, max_nbytes=1) > 0   # the first frame only
    assert decoded == [frames[0]] * (12 * 3)          # 4 per worker, a warm-up round and 2 timed
