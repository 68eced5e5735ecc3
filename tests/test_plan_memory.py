"""plan_memory: the pure resident-set planner (docs/design.md, "Memory").

No model, no threads: sizes in, a MemoryPlan (or a ConfigError naming the minimum budget) out.
"""

import random
import re

import pytest

from vzstream import ConfigError
from vzstream.plan import plan_memory


def _feasible(sizes, budget, num_slots, act=0, min_slot=0) -> bool:
    try:
        plan_memory(sizes, budget, num_slots, act, min_slot_nbytes=min_slot)
    except ConfigError:
        return False
    return True


def _smallest_feasible_budget(sizes, num_slots, act=0, min_slot=0) -> int:
    """Bisection over budgets; feasibility must be monotone, which the caller re-checks."""
    lo, hi = 0, sum(sizes) + act + num_slots * (max(sizes) + min_slot) + 1
    assert _feasible(sizes, hi, num_slots, act, min_slot)
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(sizes, mid, num_slots, act, min_slot):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _numbers(message: str) -> set[int]:
    return {int(n) for n in re.findall(r"\d+", message)}


def _cyclic_gaps(positions: list[int], m: int) -> list[int]:
    ps = sorted(positions)
    return [b - a for a, b in zip(ps, ps[1:])] + [ps[0] + m - ps[-1]]


# -- everything fits ----------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, num_slots, act", [
    pytest.param([100] * 4, 4, 0, id="equal"),
    pytest.param([512, 74752, 32768, 1024], 3, 0, id="mixed"),
    pytest.param([100] * 4, 4, 1000, id="with-reserve"),
    pytest.param([7], 64, 0, id="one-unit-many-slots"),
])
def test_all_fit_keeps_everything_resident_without_a_ring(sizes, num_slots, act):
    total = sum(sizes)
    plan = plan_memory(sizes, total + act, num_slots, act)
    assert plan.resident == frozenset(range(len(sizes)))
    assert plan.resident_nbytes == total
    assert plan.ring_nbytes == 0                   # nothing streams: no slot is needed
    assert plan.device_nbytes == total + act
    # One byte less and something must stream (a ring is then required, unless streaming is impossible).
    if _feasible(sizes, total + act - 1, num_slots, act):
        tight = plan_memory(sizes, total + act - 1, num_slots, act)
        assert tight.resident != frozenset(range(len(sizes)))
        assert tight.ring_nbytes > 0


def test_stream_reserve_counts_only_when_something_streams():
    """The landing buffers are needed only by plans that stream: all resident fits without it."""
    sizes = [100] * 6
    everything = plan_memory(sizes, 600, num_slots=2, stream_reserve=64)
    assert everything.resident == frozenset(range(6)) and everything.device_nbytes == 600
    streaming = plan_memory(sizes, 599, num_slots=2, stream_reserve=64)
    assert streaming.stream_reserve == 64 and streaming.ring_nbytes == 200
    assert streaming.device_nbytes == streaming.resident_nbytes + 200 + 64 <= 599
    assert streaming.resident_nbytes == 300                       # 599 - 200 - 64 holds three
    with pytest.raises(ConfigError, match="64 bytes of landing buffers needs at least 264 bytes"):
        plan_memory(sizes, 263, num_slots=2, stream_reserve=64)


# -- forced residents ---------------------------------------------------------------------------

def test_unit_larger_than_the_slot_is_forced_resident():
    sizes = [10, 1000, 10, 10, 10, 10, 10]         # streaming the big one would need 3 x 1000
    plan = plan_memory(sizes, 1000 + 3 * 10, num_slots=3)
    assert plan.resident == frozenset({1})
    assert plan.slot_nbytes == 10 and plan.num_slots == 3
    assert plan.device_nbytes == 1030

    roomier = plan_memory(sizes, 1000 + 3 * 10 + 20, num_slots=3)   # room for two small ones too
    assert 1 in roomier.resident and len(roomier.resident) == 3
    assert roomier.device_nbytes <= 1050


def test_forcing_a_big_unit_resident_wins_when_it_keeps_more_bytes():
    # Streaming the big unit needs a ring of 2 x 400 and leaves room for 3 small units (300 B
    # resident); keeping it resident shrinks the ring to 2 x 100 and leaves room for 5 (900 B).
    sizes = [400] + [100] * 8
    plan = plan_memory(sizes, 1100, num_slots=2)
    assert 0 in plan.resident
    assert plan.slot_nbytes == 100
    assert plan.resident_nbytes == 900
    assert plan.device_nbytes == 1100


# -- even spread --------------------------------------------------------------------------------

@pytest.mark.parametrize("room", range(1, 8), ids=lambda n: f"room-for-{n}")
def test_resident_blocks_are_spread_evenly(room):
    sizes = [100] * 10
    plan = plan_memory(sizes, 2 * 100 + room * 100, num_slots=2)
    assert len(plan.resident) == room
    assert plan.slot_nbytes == 100
    gaps = _cyclic_gaps(list(plan.resident), len(sizes))
    assert max(gaps) - min(gaps) <= 1, f"resident {sorted(plan.resident)} not evenly spread"


def test_half_resident_alternates():
    plan = plan_memory([100] * 10, 2 * 100 + 5 * 100, num_slots=2)
    resident = sorted(plan.resident)
    assert len(resident) == 5
    assert all(b - a == 2 for a, b in zip(resident, resident[1:]))


# -- the minimum budget ------------------------------------------------------------------------

MINIMUM_CASES = [
    pytest.param([100] * 10, 4, 0, 0, id="equal-blocks"),
    pytest.param([300, 50, 50, 200, 10, 10], 3, 0, 0, id="mixed"),
    pytest.param([1000, 10, 10, 10], 3, 0, 0, id="one-big"),
    pytest.param([100] * 5, 2, 64, 0, id="with-reserve"),
    pytest.param([10], 3, 0, 0, id="single-unit"),
    pytest.param([100] * 10, 2, 0, 100, id="shared-ring-same-slot"),
    pytest.param([100] * 10, 2, 0, 300, id="shared-ring-larger-slot"),
]


@pytest.mark.parametrize("sizes, num_slots, act, min_slot", MINIMUM_CASES)
def test_config_error_names_the_exact_minimum_budget(sizes, num_slots, act, min_slot):
    minimum = _smallest_feasible_budget(sizes, num_slots, act, min_slot)
    assert _feasible(sizes, minimum, num_slots, act, min_slot)
    with pytest.raises(ConfigError, match="vram_budget|budget") as info:
        plan_memory(sizes, minimum - 1, num_slots, act, min_slot_nbytes=min_slot)
    assert minimum in _numbers(str(info.value)), f"minimum {minimum} not named in: {info.value}"
    # Feasibility is monotone: nothing below the minimum works, everything above does.
    for budget in (0, minimum // 2, minimum - 1):
        assert not _feasible(sizes, budget, num_slots, act, min_slot)
    for budget in (minimum, minimum + 1, minimum + 997, 2 * minimum):
        plan = plan_memory(sizes, budget, num_slots, act, min_slot_nbytes=min_slot)
        assert plan.device_nbytes <= budget


@pytest.mark.parametrize("sizes, num_slots, min_slot", [
    pytest.param([10], 3, 100, id="tiny-model-big-ring"),
    pytest.param([100, 100, 40], 3, 150, id="ring-larger-than-units"),
])
def test_minimum_with_a_shared_ring_is_feasible(sizes, num_slots, min_slot):
    """Regression: keeping everything resident still pays for a pool's existing ring, so the
    named minimum must include it (it once named sum(sizes), a budget that then failed)."""
    with pytest.raises(ConfigError) as info:
        plan_memory(sizes, 0, num_slots, min_slot_nbytes=min_slot)
    minimum = _smallest_feasible_budget(sizes, num_slots, 0, min_slot)
    assert minimum in _numbers(str(info.value)), f"true minimum {minimum}; message: {info.value}"


# -- a shared pool's ring ----------------------------------------------------------------------

def test_min_slot_nbytes_sizes_the_ring_and_counts_when_all_fit():
    sizes = [10] * 4
    # A pool's ring of 3 x 50 already exists: it is charged even if the model is all resident.
    everything = plan_memory(sizes, 40 + 3 * 50, num_slots=3, min_slot_nbytes=50)
    assert everything.resident == frozenset(range(4))
    tight = plan_memory(sizes, 40 + 3 * 50 - 1, num_slots=3, min_slot_nbytes=50)
    assert tight.slot_nbytes == 50                  # the ring is never smaller than the pool's
    assert tight.ring_nbytes == 150
    assert tight.resident_nbytes == 30              # 189 - 150 leaves room for three units
    assert tight.device_nbytes <= 189


def test_min_slot_nbytes_smaller_than_the_units_changes_nothing():
    sizes = [100] * 6
    assert plan_memory(sizes, 500, 2, min_slot_nbytes=10) == plan_memory(sizes, 500, 2)


# -- invariants over many random cases ---------------------------------------------------------

def test_random_plans_respect_the_budget_and_force_what_cannot_stream():
    rng = random.Random(1234)
    for _ in range(400):
        sizes = [rng.choice([1, 7, 64, 100, 512, 4096]) * rng.randint(1, 4) for _ in range(rng.randint(1, 12))]
        num_slots = rng.randint(1, 5)
        act = rng.choice([0, 0, 50, 3000])
        min_slot = rng.choice([0, 0, 0, 128, 2048])
        budget = rng.randint(0, sum(sizes) + act + num_slots * max(sizes) + min_slot * num_slots)
        try:
            plan = plan_memory(sizes, budget, num_slots, act, min_slot_nbytes=min_slot)
        except ConfigError as exc:
            assert "budget" in str(exc)
            continue
        assert plan.device_nbytes <= budget
        assert plan.resident_nbytes == sum(sizes[u] for u in plan.resident)
        streamed = [u for u in range(len(sizes)) if u not in plan.resident]
        if streamed:
            assert plan.num_slots == num_slots
            assert plan.slot_nbytes >= max(max(sizes[u] for u in streamed), min_slot)


@pytest.mark.parametrize("sizes, num_slots", [
    pytest.param([100] * 10, 2, id="equal"),
    pytest.param([300, 50, 50, 200, 10, 10, 77, 512], 3, id="mixed"),
])
def test_resident_bytes_grow_with_the_budget(sizes, num_slots):
    minimum = _smallest_feasible_budget(sizes, num_slots)
    previous = -1
    for budget in range(minimum, sum(sizes) + 2):
        plan = plan_memory(sizes, budget, num_slots)
        assert plan.resident_nbytes >= previous, f"budget {budget}: resident shrank"
        previous = plan.resident_nbytes
    assert previous == sum(sizes)
