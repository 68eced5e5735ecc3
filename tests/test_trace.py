"""The layer-order tracer: learning, on-plan positions, misses (wrong unit, early end, long
pass), aborted passes; and the order a session actually records on real call orders."""

import pytest
import torch
from models import Reordered, Shared, Stack, build, make_input

import vzstream
from vzstream.trace import Tracer


def run_pass(tracer: Tracer, units) -> tuple[list, bool]:
    tracer.start_pass()
    positions = [tracer.observe(u) for u in units]
    return positions, tracer.end_pass()


def test_first_pass_learns_then_positions_follow_the_trace():
    tracer = Tracer()
    positions, learned = run_pass(tracer, [2, 0, 1])
    assert positions == [None, None, None] and learned
    assert tracer.trace == (2, 0, 1)
    positions, learned = run_pass(tracer, [2, 0, 1])
    assert positions == [0, 1, 2] and not learned
    assert tracer.misses == 0


@pytest.mark.parametrize("units, on_plan", [
    pytest.param([2, 1, 0], [0, None, None], id="wrong_unit"),
    pytest.param([2, 0], [0, 1], id="early_end"),
    pytest.param([2, 0, 1, 1], [0, 1, 2, None], id="long_pass"),
    pytest.param([1, 2, 0, 1], [None] * 4, id="wrong_first"),
])
def test_a_miss_goes_off_plan_counts_once_and_relearns(units, on_plan):
    tracer = Tracer()
    run_pass(tracer, [2, 0, 1])
    positions, learned = run_pass(tracer, units)
    assert positions == on_plan
    assert learned and tracer.misses == 1               # one miss per pass, however far it strays
    assert tracer.trace == tuple(units)
    positions, learned = run_pass(tracer, units)
    assert positions == list(range(len(units))) and not learned
    assert tracer.misses == 1


def test_aborted_pass_keeps_the_old_trace_and_counts_no_miss():
    tracer = Tracer()
    run_pass(tracer, [0, 1, 2])
    tracer.start_pass()
    assert tracer.observe(0) == 0
    assert tracer.observe(2) is None                    # strays, then the forward raises
    misses = tracer.misses
    tracer.abort_pass()
    assert tracer.trace == (0, 1, 2)
    positions, learned = run_pass(tracer, [0, 1, 2])
    assert positions == [0, 1, 2] and not learned and tracer.misses == misses


def test_abort_during_the_first_pass_learns_nothing():
    tracer = Tracer()
    tracer.start_pass()
    tracer.observe(0)
    tracer.abort_pass()
    assert tracer.trace is None
    positions, learned = run_pass(tracer, [0, 1])
    assert positions == [None, None] and learned and tracer.trace == (0, 1)


# -- the order a session records --------------------------------------------------------------

def recorded_fqns(s) -> list[str]:
    return [s.units[i].fqn for i in s.member.runtime.tracer.trace]


@pytest.mark.parametrize("units, expected", [
    pytest.param("blocks", [f"blocks.{i}" for i in Reordered.CALL_ORDER], id="blocks"),
    pytest.param("leaves", [f"blocks.{i}.{leaf}" for i in Reordered.CALL_ORDER for leaf in ("up", "down")],
                 id="leaves"),
])
@pytest.mark.parametrize("prefetch", [0, 2], ids=lambda k: f"prefetch{k}")
def test_blocks_created_in_one_order_and_called_in_another(units, expected, prefetch, slots_ok):
    model = build(Reordered)
    x = make_input(2, 64)
    with torch.no_grad():
        ref = model(x)
    creation_order = sorted(expected, key=lambda fqn: int(fqn.split(".")[1]))   # stable: up before down
    assert [u.fqn for u in vzstream.units.find_units(model, units)] == creation_order
    with vzstream.session(model, device="cpu", prefetch=prefetch, units=units) as s:
        for _ in range(3):
            assert torch.equal(s(x), ref)
            slots_ok(s)
        assert recorded_fqns(s) == expected            # call order, not creation order
        assert s.stats().trace_misses == 0
        assert s.member.runtime.schedule.fetch_units == s.member.runtime.tracer.trace


def test_shared_block_appears_at_every_use():
    model = build(Shared)
    x = make_input(2, 64)
    with vzstream.session(model, device="cpu", prefetch=1) as s:
        s(x)
        s(x)
        assert recorded_fqns(s) == [f"blocks.{i}" for i in Shared.CALL_ORDER]


def test_trace_follows_the_path_the_last_pass_took():
    model = build(Stack)
    x = make_input(2, 64)
    with vzstream.session(model, device="cpu", prefetch=1) as s:
        s(x)
        assert recorded_fqns(s) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
        s(x, skip=2)
        assert recorded_fqns(s) == ["blocks.0", "blocks.1", "blocks.3"]
        s(x)
        assert recorded_fqns(s) == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
        assert s.stats().trace_misses == 2
