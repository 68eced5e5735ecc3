"""Pure planning: `make_schedule` (fetch/release flags, frontier, slot count, wrap-around) and
`find_units` (blocks, leaves, explicit lists, tied parameters)."""

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import Block, NestedLeaves, Stack, TinyLM, build, build_hf
from torch import nn

import vzstream
from vzstream.schedule import make_schedule
from vzstream.units import find_units

T, F = True, False

# (trace, cache, fetches, releases, frontier, fetch_units, num_slots as a function of prefetch)
SCHEDULES = [
    pytest.param((0, 1, 2, 3), "pass", (T, T, T, T), (T, T, T, T), (0, 1, 2, 3), (0, 1, 2, 3),
                 lambda k: k + 1, id="sequential-cache_pass"),
    pytest.param((0, 1, 2, 3), "none", (T, T, T, T), (T, T, T, T), (0, 1, 2, 3), (0, 1, 2, 3),
                 lambda k: k + 1, id="sequential-cache_none"),
    # Unit 0 used first and last (tied embedding / head): held through the pass, one slot more.
    pytest.param((0, 1, 2, 0), "pass", (T, T, T, F), (F, T, T, T), (0, 1, 2, 2), (0, 1, 2),
                 lambda k: k + 2, id="first_and_last-cache_pass"),
    pytest.param((0, 1, 2, 0), "none", (T, T, T, T), (T, T, T, T), (0, 1, 2, 3), (0, 1, 2, 0),
                 lambda k: k + 1, id="first_and_last-cache_none"),
    pytest.param((0, 1, 0, 2), "pass", (T, T, F, T), (F, T, T, T), (0, 1, 1, 2), (0, 1, 2),
                 lambda k: k + 2, id="shared_block-cache_pass"),
    pytest.param((0, 0, 1), "pass", (T, F, T), (F, T, T), (0, 0, 1), (0, 1),
                 lambda k: k + 1, id="repeated_adjacent-cache_pass"),
    pytest.param((0,), "pass", (T,), (T,), (0,), (0,), lambda k: k + 1, id="single_unit"),
    pytest.param((), "pass", (), (), (), (), lambda k: 0, id="empty"),
]


@pytest.mark.parametrize("prefetch", [0, 1, 2, 4], ids=lambda k: f"prefetch{k}")
@pytest.mark.parametrize("trace, cache, fetches, releases, frontier, fetch_units, num_slots", SCHEDULES)
def test_make_schedule(trace, cache, fetches, releases, frontier, fetch_units, num_slots, prefetch):
    sched = make_schedule(trace, prefetch, cache)
    assert sched.trace == trace
    assert sched.fetches == fetches
    assert sched.releases == releases
    assert sched.frontier == frontier
    assert sched.fetch_units == fetch_units
    assert sched.num_fetches == len(fetch_units)
    assert sched.prefetch == prefetch
    assert sched.num_slots == num_slots(prefetch)


@pytest.mark.parametrize("prefetch", [1, 2, 5], ids=lambda k: f"prefetch{k}")
def test_schedule_wraps_around_into_later_passes(prefetch):
    sched = make_schedule((3, 1, 2, 1), prefetch, "pass")
    assert sched.fetch_units == (3, 1, 2)
    # Global fetch g is fetch g % 3 of pass g // 3: the last positions prefetch the next pass.
    assert [sched.fetch_unit(g) for g in range(9)] == [3, 1, 2] * 3
    last = len(sched.trace) - 1
    assert sched.frontier[last] + prefetch >= sched.num_fetches   # reaches into the next pass


traces = st.lists(st.integers(0, 5), max_size=12).map(tuple)


@settings(max_examples=200, deadline=None)
@given(trace=traces, prefetch=st.integers(0, 6), cache=st.sampled_from(["pass", "none"]))
def test_schedule_properties(trace, prefetch, cache):
    sched = make_schedule(trace, prefetch, cache)
    first = {u: trace.index(u) for u in trace}
    last = {u: len(trace) - 1 - trace[::-1].index(u) for u in trace}
    for i, u in enumerate(trace):
        assert sched.fetches[i] == (cache == "none" or first[u] == i)
        assert sched.releases[i] == (cache == "none" or last[u] == i)
        assert sched.frontier[i] == sum(sched.fetches[: i + 1]) - 1
    assert sched.fetch_units == tuple(u for u, f in zip(trace, sched.fetches) if f)
    if not trace:
        assert sched.num_slots == 0
    elif cache == "none":
        assert sched.num_slots == prefetch + 1            # one use, one fetch, one release
    else:
        # The current unit and `prefetch` in flight, plus at most every other unit held open.
        assert prefetch + 1 <= sched.num_slots <= prefetch + len(set(trace))


# -- find_units --------------------------------------------------------------------------------

def owners(units) -> dict[int, str]:
    """id(param) -> fqn of the one unit owning it (asserting no parameter is owned twice)."""
    out = {}
    for unit in units:
        for _, p in unit.params:
            assert id(p) not in out, f"parameter owned by {out.get(id(p))} and {unit.fqn}"
            out[id(p)] = unit.fqn
    return out


def test_blocks_are_children_of_the_largest_module_list_and_the_rest_is_resident():
    model = build(TinyLM)
    units = find_units(model, "blocks")
    assert [(u.fqn, u.streamed) for u in units] == [
        ("blocks.0", T), ("blocks.1", T), ("blocks.2", T), ("blocks.3", T),
        ("embed", F), ("norm", F), ("head", F),
    ]
    assert [u.index for u in units] == list(range(len(units)))
    assert units[1].modules == [model.blocks[1]]
    assert [n for n, _ in units[1].params] == ["blocks.1.up.weight", "blocks.1.up.bias", "blocks.1.down.weight"]
    assert units[1].raw_nbytes == sum(p.numel() * p.element_size() for p in model.blocks[1].parameters())
    assert set(owners(units)) == {id(p) for p in model.parameters()}


def test_blocks_pick_the_module_list_with_most_parameters_not_most_entries():
    class TwoLists(nn.Module):
        def __init__(self):
            super().__init__()
            self.adapters = nn.ModuleList(nn.Linear(2, 2) for _ in range(6))
            self.layers = nn.ModuleList(Block() for _ in range(2))

    units = find_units(build(TwoLists), "blocks")
    assert [u.fqn for u in units if u.streamed] == ["layers.0", "layers.1"]
    assert all(not u.streamed for u in units if u.fqn.startswith("adapters"))


def test_blocks_without_a_module_list_fall_back_to_leaves_with_a_warning(caplog):
    model = build(Block)
    with caplog.at_level(logging.WARNING, logger="vzstream"):
        units = find_units(model, "blocks")
    assert [(u.fqn, u.streamed) for u in units] == [("up", T), ("down", T)]
    assert "ModuleList" in caplog.text


def test_leaves_are_every_module_owning_parameters_directly():
    model = build(NestedLeaves)                        # blocks.i owns `scale` and has child `inner`
    units = find_units(model, "leaves")
    assert [(u.fqn, [n for n, _ in u.params]) for u in units] == [
        (f"blocks.{i}{leaf}", [f"blocks.{i}{leaf}.{n}" for n in names])
        for i in range(3) for leaf, names in (("", ["scale"]), (".inner", ["weight", "bias"]))
    ]
    assert all(u.streamed for u in units)


def test_leaves_on_gpt2_include_conv1d_and_tied_head_binds_the_embedding():
    from transformers.pytorch_utils import Conv1D

    model = build_hf("gpt2")
    units = find_units(model, "leaves")
    fqns = [u.fqn for u in units]
    conv1d = [fqn for fqn, m in model.named_modules() if isinstance(m, Conv1D)]
    assert conv1d and set(conv1d) <= set(fqns)
    assert "transformer.h.1.attn.c_attn" in fqns and "transformer.h.0.mlp.c_proj" in fqns
    assert "lm_head" not in fqns                       # its weight is wte's: owned once
    wte = units[fqns.index("transformer.wte")]
    assert wte.modules == [model.transformer.wte, model.lm_head]
    assert set(owners(units)) == {id(p) for p in model.parameters()}
    assert all(u.streamed for u in units)


@pytest.mark.parametrize("spec", ["leaves", "blocks"])
def test_tied_parameter_is_owned_once_and_its_other_module_joins_the_unit(spec):
    model = build(TinyLM, tied=True)
    units = find_units(model, spec)
    embed = next(u for u in units if u.fqn == "embed")
    assert embed.params == [("embed.weight", model.embed.weight)]
    assert embed.modules == [model.embed, model.head]
    assert "head" not in [u.fqn for u in units]
    assert embed.streamed == (spec == "leaves")


def test_parameter_tied_across_blocks_binds_the_owner_from_the_other_block():
    model = build(Stack)
    model.blocks[2].up.weight = model.blocks[0].up.weight
    units = find_units(model, "blocks")
    assert units[0].modules == [model.blocks[0], model.blocks[2].up]
    assert "blocks.2.up.weight" not in [n for n, _ in units[2].params]
    assert set(owners(units)) == {id(p) for p in model.parameters()}


def test_explicit_fqn_list_streams_exactly_those():
    model = build(TinyLM)
    units = find_units(model, ["blocks.1", "head"])
    assert [u.fqn for u in units if u.streamed] == ["blocks.1", "head"]
    assert "blocks.0.up" in [u.fqn for u in units if not u.streamed]
    assert set(owners(units)) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("spec, named", [
    pytest.param(["blocks.1", "blocks.9"], "blocks.9", id="unknown"),
    pytest.param(["blocks.1", "blocks.1.up"], "blocks.1.up", id="nested"),
])
def test_bad_explicit_fqn_list_is_a_config_error_naming_it(spec, named):
    with pytest.raises(vzstream.ConfigError, match="`units`") as err:
        find_units(build(TinyLM), spec)
    assert named in str(err.value)
    assert isinstance(err.value, ValueError)


def test_find_units_does_not_touch_the_model(snapshot):
    model = build(TinyLM, tied=True)
    snap = snapshot(model)
    for spec in ("blocks", "leaves", ["blocks.0"]):
        find_units(model, spec)
    snap.check(model)


def test_same_block_object_listed_twice_is_one_unit():
    model = build(Stack, num_blocks=3)
    model.blocks[1] = model.blocks[0]                  # ALBERT-style sharing: [b0, b0, b2]
    units = find_units(model, "blocks")
    assert [u.fqn for u in units] == ["blocks.0", "blocks.2"]
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = model(x)
    with vzstream.session(model, device="cpu", prefetch=1) as s:
        assert torch.equal(s(x), ref)
        assert torch.equal(s(x), ref)
