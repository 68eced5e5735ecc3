"""Hooks: what `install` wires (pass start/end around bind/release), that `remove` leaves no
trace, placeholders between uses, and units bound outside a pass."""

import pytest
import torch
from models import BlockFailure, Stack, TinyLM, build, make_input, stack_with_reference

import vzstream
from vzstream.hooks import bind_params, install, remove, unbind_params
from vzstream.standin import adopt, disown, stand_in
from vzstream.units import find_units


class RecordingStreamer:
    """Stands in for the Streamer: records what the hooks call, does nothing."""

    def __init__(self) -> None:
        self.calls: list = []

    def pass_start(self) -> None:
        self.calls.append("pass_start")

    def pass_end(self) -> None:
        self.calls.append("pass_end")

    def pass_failed(self) -> None:
        self.calls.append("pass_failed")

    def bind(self, unit: int) -> None:
        self.calls.append(("bind", unit))

    def release(self, unit: int) -> None:
        self.calls.append(("release", unit))


def test_install_wires_pass_and_unit_hooks_and_remove_leaves_nothing(snapshot):
    model = build(TinyLM, tied=True)
    units = find_units(model, "leaves")
    index = {u.fqn: u.index for u in units}
    snap = snapshot(model)
    streamer = RecordingStreamer()
    handles = install(model, units, streamer)
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long))
    expected = ["pass_start", ("bind", index["embed"]), ("release", index["embed"])]
    for i in range(len(model.blocks)):
        for leaf in ("up", "down"):
            expected += [("bind", index[f"blocks.{i}.{leaf}"]), ("release", index[f"blocks.{i}.{leaf}"])]
    expected += [("bind", index["norm"]), ("release", index["norm"])]
    expected += [("bind", index["embed"]), ("release", index["embed"])]    # the tied head binds embed's unit
    expected += ["pass_end", "pass_failed"]    # pass_failed runs always; it acts only if the pass is open
    assert streamer.calls == expected
    remove(handles)
    assert handles == []
    snap.check(model)


def test_resident_units_get_no_hooks():
    model = build(TinyLM)
    units = find_units(model, "blocks")
    streamer = RecordingStreamer()
    handles = install(model, units, streamer)
    assert not model.embed._forward_pre_hooks and not model.head._forward_hooks
    assert all(b._forward_pre_hooks and b._forward_hooks for b in model.blocks)
    remove(handles)


def test_root_as_a_unit_binds_inside_the_pass():
    model = build(Stack)
    model.register_forward_pre_hook(lambda m, a: None)   # a user hook registered first
    units = find_units(model, [""])
    assert len(units) == 1 and units[0].modules == [model]
    streamer = RecordingStreamer()
    handles = install(model, units, streamer)
    with torch.no_grad():
        model(make_input(1, 64))
    assert streamer.calls == ["pass_start", ("bind", 0), ("release", 0), "pass_end", "pass_failed"]
    remove(handles)


def test_root_as_a_unit_streams_exactly(snapshot):
    model, x, ref = stack_with_reference()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu", units=[""], prefetch=1) as s:
        for _ in range(3):
            assert torch.equal(s(x), ref)
        assert s.stats().trace_misses == 0 and s.stats().units_streamed == 1
    snap.check(model)


def test_release_and_pass_end_run_when_a_forward_raises():
    model = build(Stack)
    units = find_units(model, "blocks")
    streamer = RecordingStreamer()
    handles = install(model, units, streamer)
    with torch.no_grad(), pytest.raises(BlockFailure):
        model(make_input(1, 64), fail_at=1)
    # The plain pass-end hook is skipped when the forward raises; only the always-called one runs.
    assert streamer.calls == ["pass_start", ("bind", 0), ("release", 0), ("bind", 1), ("release", 1), "pass_failed"]
    remove(handles)


def test_stand_in_has_the_true_shape_and_stores_one_element():
    a = stand_in(torch.Size([3, 5]), torch.bfloat16, torch.device("cpu"))
    assert a.shape == (3, 5) and a.dtype == torch.bfloat16 and a.stride() == (0, 0)
    assert a.untyped_storage().nbytes() == 2
    assert stand_in(torch.Size([7]), torch.bfloat16, torch.device("cpu")).data_ptr() == a.data_ptr()


def test_bind_and_unbind_params():
    model = build(Stack, num_blocks=1)
    params = list(model.blocks[0].named_parameters())
    views = [torch.full_like(p, 0.5) for _, p in params]
    ids = [id(p) for _, p in params]
    stand_ins = [adopt(p, n, p.device) for n, p in params]     # parks them
    assert all(p.shape == v.shape and p.dtype == v.dtype for (_, p), v in zip(params, views))
    with pytest.raises(vzstream.StreamedWeightError, match="`up.weight` is streamed"):
        params[0][1].data
    bind_params(params, views, stand_ins)
    assert all(p.data.data_ptr() == v.data_ptr() and type(p) is torch.nn.Parameter for (_, p), v in zip(params, views))
    unbind_params(params, stand_ins)
    unbind_params(params, stand_ins)                           # released twice (a bind that failed): still fine
    assert all(type(p) is not torch.nn.Parameter and isinstance(p, torch.nn.Parameter) for _, p in params)
    for _, p in params:
        disown(p)
    assert all(type(p) is torch.nn.Parameter for _, p in params)
    assert [id(p) for _, p in params] == ids                 # same Parameter objects throughout


# -- inside a session -------------------------------------------------------------------------

def test_streamed_params_are_stand_ins_between_uses_and_fail_loudly():
    model = build(TinyLM, tied=True)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with vzstream.session(model, device="cpu", prefetch=2) as s:
        s(ids)
        weight = model.blocks[1].up.weight
        assert weight.shape == (128, 64) and isinstance(weight, torch.nn.Parameter)
        assert model.embed.weight.shape == (256, 64)         # resident
        assert model.head.weight is model.embed.weight       # still tied
        with pytest.raises(vzstream.StreamedWeightError):
            torch.nn.functional.linear(make_input(2, 64), weight)   # never another unit's bytes


def test_unit_module_called_directly_outside_a_pass(slots_ok):
    model = build(Stack)
    x = make_input(2, 64)
    with torch.no_grad():
        ref, ref_block = model(x), model.blocks[2](x)
    with vzstream.session(model, device="cpu", prefetch=2) as s:
        s(x)
        s(x)                                             # wrap-around prefetches now in flight
        with torch.no_grad():
            assert torch.equal(model.blocks[2](x), ref_block)
        slots_ok(s)
        assert torch.equal(s(x), ref)
        assert torch.equal(s(x), ref)
        stats = s.stats()
    assert stats.passes == 4 and stats.trace_misses == 0
