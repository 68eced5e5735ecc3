"""`vram_budget`: the resident set under a device-memory budget (docs/design.md, "Trace, schedule, caching" and "Memory"),
budget parsing and validation, `activation_reserve`, and the per-pass cache policies.

The CPU backend counts what would live on the device (resident parameters + ring slots), so
`stats().peak_device_nbytes <= budget` is checked here exactly as it would be on a GPU.
"""

import math

import psutil
import pytest
import torch
from torch import nn

import vzstream
from models import (Block, NestedLeaves, Scaled, Shared, build, build_hf, decodes_per_pass, hf_inputs, make_input,
                    named_minimum, numbers_in)
from vzstream.plan import unit_nbytes
from vzstream.units import find_units

NUM_LAYERS = 4
PREFETCH = 1          # a ring of 3 slots: the sweep from "all streamed" to "all resident" is wide


def _llama():
    """Tiny Llama: hidden 64, 4 layers, vocab 256, bf16, seeded."""
    return build_hf("llama", num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def reference():
    """(ids, generate kwargs, logits, tokens) of the resident tiny Llama."""
    model = _llama()
    ids, gen_kwargs = hf_inputs()
    with torch.no_grad():
        return ids, gen_kwargs, model(ids).logits, model.generate(ids, **gen_kwargs)


def _model_nbytes(model, units) -> int:
    """What keeping every unit resident costs the planner (slot-aligned sizes)."""
    return sum(unit_nbytes(u, vzstream.CpuBackend.alignment) for u in find_units(model, units))


# -- the sweep ----------------------------------------------------------------------------------

@pytest.mark.parametrize("units", ["blocks", "leaves"])
def test_budget_sweep_is_exact_within_budget_and_monotone(units, reference, snapshot):
    ids, gen_kwargs, ref_logits, ref_tokens = reference
    model = _llama()
    snap = snapshot(model)
    minimum = named_minimum(model, units=units, prefetch=PREFETCH)
    total = _model_nbytes(model, units)
    assert minimum < total
    budgets = [minimum + (total - minimum) * i // 5 for i in range(5)] + [total, 2 * total]
    seen = []
    for budget in budgets:
        with vzstream.session(model, device="cpu", vram_budget=budget, units=units, prefetch=PREFETCH) as s:
            for _ in range(2):              # the second call runs on the learned schedule
                assert torch.equal(s(ids).logits, ref_logits), f"logits differ at budget {budget}"
                assert torch.equal(s.generate(ids, **gen_kwargs), ref_tokens), f"tokens differ at budget {budget}"
            stats = s.stats()
            assert str(s.plan) and "resident" in str(s.plan)
        assert stats.peak_device_nbytes <= budget, f"budget {budget}: peak {stats.peak_device_nbytes}"
        assert stats.trace_misses == 0 and stats.slot_overflows == 0
        seen.append((budget, stats.streamed_nbytes_per_pass, stats.resident_nbytes, stats.decodes))
    snap.check(model)

    streamed = [row[1] for row in seen]
    resident = [row[2] for row in seen]
    assert streamed == sorted(streamed, reverse=True), f"streamed bytes per pass not monotone: {seen}"
    assert resident == sorted(resident), f"resident bytes not monotone: {seen}"
    assert len(set(streamed)) >= 4, f"the sweep barely changed the plan: {seen}"
    raw_total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (seen[0][1], seen[0][2]) == (raw_total, 0)      # at the minimum, everything streams
    for budget, streamed_nbytes, resident_nbytes, decodes in seen[-2:]:   # >= model size: all resident
        assert (streamed_nbytes, resident_nbytes, decodes) == (0, raw_total, 0), f"budget {budget}"


# -- impossible and bad budgets ----------------------------------------------------------------

@pytest.mark.parametrize("units", ["blocks", "leaves"])
def test_impossible_budget_names_the_minimum_and_leaves_the_model_alone(units, snapshot, open_models):
    model = _llama()
    minimum = named_minimum(model, units=units, prefetch=2)
    snap = snapshot(model)
    backend = vzstream.CpuBackend()
    for budget in (minimum - 1, minimum // 2, 0):
        with pytest.raises(vzstream.ConfigError, match="`vram_budget`") as info:
            with vzstream.session(model, vram_budget=budget, units=units, prefetch=2, backend=backend):
                pytest.fail("the session opened under an impossible budget")
        assert minimum in numbers_in(str(info.value)), str(info.value)
        assert isinstance(info.value, ValueError)
    assert backend.peak_device_nbytes == 0, "something was allocated before the budget was rejected"
    snap.check(model)
    assert model not in open_models
    with vzstream.session(model, device="cpu", vram_budget=minimum, units=units, prefetch=2):
        pass                                          # the failed opens left nothing behind
    snap.check(model)


@pytest.mark.parametrize("budget, expected", [
    pytest.param(123456, 123456, id="int"),
    pytest.param("6GiB", 6 * 2**30, id="GiB"),
    pytest.param("500MB", 500 * 10**6, id="MB"),
    pytest.param("1.5KiB", 1536, id="fractional-KiB"),
    pytest.param(" 300 kb ", 300_000, id="spaces-lowercase"),
    pytest.param("4096", 4096, id="digits"),
])
def test_budget_strings_parse(budget, expected):
    assert vzstream.SessionConfig(device="cpu", vram_budget=budget).vram_budget == expected


def test_string_and_float_budgets_plan_like_the_same_byte_count(reference):
    ids, gen_kwargs, _, ref_tokens = reference
    model = _llama()

    def run(budget):
        with vzstream.session(model, device="cpu", vram_budget=budget, prefetch=PREFETCH) as s:
            assert torch.equal(s.generate(ids, **gen_kwargs), ref_tokens)
            return s.stats()

    as_string = run("0.3MiB")
    as_int = run(int(0.3 * 2**20))
    assert (as_string.resident_nbytes, as_string.streamed_nbytes_per_pass) == \
           (as_int.resident_nbytes, as_int.streamed_nbytes_per_pass)
    assert 0 < as_int.streamed_nbytes_per_pass and as_int.peak_device_nbytes <= int(0.3 * 2**20)

    total = psutil.virtual_memory().total          # the CPU backend's "device memory"
    fraction = 300_000 / total
    as_float = run(fraction)
    as_bytes = run(int(fraction * total))
    assert (as_float.resident_nbytes, as_float.streamed_nbytes_per_pass) == \
           (as_bytes.resident_nbytes, as_bytes.streamed_nbytes_per_pass)
    assert as_float.peak_device_nbytes <= 300_000
    assert run(1.0).streamed_nbytes_per_pass == 0     # all of host RAM: everything resident


@pytest.mark.parametrize("budget", [
    -1, -(2**40), "6 parsecs", "-5MB", "", "GiB", 1.5, 0.0, -0.5, math.nan, math.inf, True, False, [1024],
], ids=repr)
def test_bad_budget_is_rejected_naming_vram_budget(budget, snapshot):
    model = build(Shared, dtype=torch.bfloat16)
    snap = snapshot(model)
    with pytest.raises(vzstream.ConfigError, match="`vram_budget`"):
        with vzstream.session(model, device="cpu", vram_budget=budget):
            pytest.fail("a bad budget was accepted")
    snap.check(model)


# -- activation reserve ------------------------------------------------------------------------

@pytest.mark.parametrize("units", ["blocks", "leaves"])
def test_activation_reserve_shrinks_the_resident_set(units, reference):
    ids, gen_kwargs, ref_logits, ref_tokens = reference
    model = _llama()
    minimum = named_minimum(model, units=units, prefetch=PREFETCH)
    reserve = 96 * 1024
    assert named_minimum(model, units=units, prefetch=PREFETCH, activation_reserve=reserve) == minimum + reserve

    budget = _model_nbytes(model, units)              # everything fits without a reserve
    results = {}
    for act in (0, reserve, "96KiB"):
        with vzstream.session(model, device="cpu", vram_budget=budget, units=units, prefetch=PREFETCH,
                              activation_reserve=act) as s:
            assert torch.equal(s(ids).logits, ref_logits)
            assert torch.equal(s.generate(ids, **gen_kwargs), ref_tokens)
            results[act] = s.stats()
    assert results[0].streamed_nbytes_per_pass == 0
    assert results[reserve].resident_nbytes < results[0].resident_nbytes
    assert results[reserve].streamed_nbytes_per_pass > 0
    assert results[reserve].peak_device_nbytes <= budget - reserve   # the reserve stays free
    assert results["96KiB"].resident_nbytes == results[reserve].resident_nbytes


# -- cache policies ----------------------------------------------------------------------------

class Twice(nn.Module):
    """One block called twice per forward, between two resident layers."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(64, 64)
        self.block = Block(64)
        self.post = nn.Linear(64, 64)

    def forward(self, x):
        return self.post(self.block(self.block(self.pre(x))))


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("cache, expected", [("pass", 1), ("none", 2)])
def test_block_used_twice_is_decoded_once_per_pass_under_pass_cache(cache, expected, prefetch):
    model = build(Twice, dtype=torch.bfloat16)
    x = make_input(2, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    with vzstream.session(model, device="cpu", units=["block"], cache=cache, prefetch=prefetch) as s:
        outputs = []
        per_pass = decodes_per_pass(s, lambda: outputs.append(s(x)))
        assert s.stats().units_streamed == 1
    assert per_pass == expected
    assert all(torch.equal(out, ref) for out in outputs)


@pytest.mark.parametrize("cache, extra", [("pass", 0), ("none", 1)])
def test_shared_moduledecodes_per_pass(cache, extra):
    model = build(Shared, dtype=torch.bfloat16)       # call order 0, 1, 0, 2
    x = make_input(2, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    with vzstream.session(model, device="cpu", units="blocks", cache=cache, prefetch=2) as s:
        outputs = []
        per_pass = decodes_per_pass(s, lambda: outputs.append(s(x)))
    assert per_pass == 3 + extra
    assert all(torch.equal(out, ref) for out in outputs)


@pytest.mark.parametrize("cache", ["pass", "none"])
def test_gpt2_tied_embedding_is_packed_once_and_cached_per_pass(cache, snapshot):
    model = build_hf("gpt2")                          # tie_word_embeddings: lm_head.weight is wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, gen_kwargs = hf_inputs()
    with torch.no_grad():
        ref_logits, ref_tokens = model(ids).logits, model.generate(ids, **gen_kwargs)
    snap = snapshot(model)
    with vzstream.session(model, device="cpu", units="leaves", cache=cache, prefetch=2) as s:
        logits = []
        per_pass = decodes_per_pass(s, lambda: logits.append(s(ids).logits))
        stats = s.stats()
        tokens = [s.generate(ids, **gen_kwargs) for _ in range(2)]
    assert stats.units_streamed == len(find_units(build_hf("gpt2"), "leaves"))
    # The tied matrix is one unit: "pass" decodes every unit once; "none" decodes wte twice.
    assert per_pass == stats.units_streamed + (cache == "none")
    assert stats.raw_nbytes == sum(p.numel() * p.element_size() for p in model.parameters())  # packed once
    assert all(torch.equal(out, ref_logits) for out in logits)
    assert all(torch.equal(out, ref_tokens) for out in tokens)
    snap.check(model)
    assert model.lm_head.weight is model.transformer.wte.weight


# -- nesting ------------------------------------------------------------------------------------

class Gained(nn.Module):
    """Three levels of parameter owners: gain -> Scaled.scale -> Scaled.inner (a Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(64) + 0.5)
        self.inner = Scaled(64)

    def forward(self, x):
        return self.inner(x) * self.gain


class DeepStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Gained() for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("model_cls", [NestedLeaves, DeepStack], ids=["two-deep", "three-deep"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_nested_parameter_owners_stay_within_the_budget(model_cls, prefetch):
    model = build(model_cls, dtype=torch.bfloat16)
    x = make_input(2, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    minimum = named_minimum(model, units="leaves", prefetch=prefetch)
    with vzstream.session(model, device="cpu", vram_budget=minimum, units="leaves", prefetch=prefetch) as s:
        assert all(torch.equal(s(x), ref) for _ in range(3))
        stats = s.stats()
    assert stats.slot_overflows == 0
    assert stats.peak_device_nbytes <= minimum


# -- activations measured on the traced pass -------------------------------------------------

def test_measured_activations_evict_resident_units_to_stay_in_budget(snapshot, reference):
    """No `activation_reserve`: the backend's measurement of the traced pass is fitted into the
    budget by evicting resident units; outputs stay exact and the model is restored."""
    ids, gen_kwargs, ref_logits, ref_tokens = reference
    model = _llama()
    snap = snapshot(model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    budget, activations = total + (64 << 10), total // 2
    fb = vzstream.FakeBackend(activation_nbytes=activations)
    with vzstream.session(model, backend=fb, vram_budget=budget, prefetch=1) as s:
        all_resident = s.stats().units_streamed
        assert all_resident == 0                       # fits before anything was measured
        assert torch.equal(s(ids).logits, ref_logits)  # the traced pass measures
        after = s.stats()
        assert after.units_streamed > 0 and after.units_resident < len(s.units)
        assert fb.device_nbytes + activations <= budget
        assert "streamed" in str(s.plan)
        for _ in range(2):
            assert torch.equal(s.generate(ids, **gen_kwargs), ref_tokens)
            assert torch.equal(s(ids).logits, ref_logits)
        assert fb.device_nbytes + activations <= budget
    snap.check(model)


def test_explicit_activation_reserve_is_not_remeasured(reference):
    ids = reference[0]
    model = _llama()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    fb = vzstream.FakeBackend(activation_nbytes=total // 2)
    with vzstream.session(model, backend=fb, vram_budget=total + (64 << 10), activation_reserve=0) as s:
        s(ids)
        assert s.stats().units_streamed == 0          # the user's reserve stands: nothing evicted
        # ...and the activations it leaves no room for are caught before the next pass crosses
        # the budget (issue 15, item 9), naming the reserve that would fit
        with pytest.raises(vzstream.ConfigError, match=f"`activation_reserve` to at least {total // 2} bytes"):
            s(ids)
        assert s.stats().units_streamed == 0


# -- a growing KV cache (issue 15, item 9) --------------------------------------------------------

def test_memory_growing_past_the_reserve_stops_the_next_pass_before_the_budget_is_crossed(reference):
    """Memory outside vzstream's weights (a KV cache) grows between passes past what the traced
    pass measured: the next pass raises ConfigError naming `activation_reserve` before it runs,
    exactly at the byte where it would cross; once the memory is gone, passes run exact again.
    Before, nothing checked: a long generation crossed the budget (or ran out of memory)."""
    ids, _, ref_logits, _ = reference
    model = _llama()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = 4096
    fb = vzstream.FakeBackend(activation_nbytes=activations)
    budget = total // 2 + (64 << 10)
    with vzstream.session(model, backend=fb, vram_budget=budget, prefetch=1) as s:
        assert torch.equal(s(ids).logits, ref_logits)          # the traced pass measures
        assert torch.equal(s(ids).logits, ref_logits)
        room = budget - fb.device_nbytes - activations          # what may still grow
        fb.held_nbytes = room
        assert torch.equal(s(ids).logits, ref_logits)          # exactly at the budget: runs
        fb.held_nbytes = room + 1
        binds = [op for op in fb.ops if op[0] == "bind"]
        with pytest.raises(vzstream.ConfigError, match="activation_reserve") as err:
            s(ids)
        assert f"at least {fb.held_nbytes + activations} bytes" in str(err.value)
        assert [op for op in fb.ops if op[0] == "bind"] == binds     # the refused pass bound nothing
        fb.held_nbytes = 0
        assert torch.equal(s(ids).logits, ref_logits)


def test_generate_reserves_the_kv_cache_that_max_new_tokens_implies(reference):
    ids, gen_kwargs, _, ref_tokens = reference
    model = _llama()
    cfg = model.config
    growth = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
              * 2 * ids.shape[0] * gen_kwargs["max_new_tokens"])
    activations = 4096
    fb = vzstream.FakeBackend(activation_nbytes=activations)
    budget = _model_nbytes(model, "blocks") + activations + growth // 2   # all resident fits, not with the cache
    with vzstream.session(model, backend=fb, vram_budget=budget) as s:
        s(ids)
        assert s.stats().units_streamed == 0
        assert torch.equal(s.generate(ids, **gen_kwargs), ref_tokens)
        assert s.member.needs.activation_reserve == activations + growth
        assert s.stats().units_streamed > 0                        # units made room for the cache
        assert fb.device_nbytes + activations + growth <= budget


def test_generate_whose_cache_cannot_fit_says_so_before_running(reference):
    ids, gen_kwargs, _, _ = reference
    model = _llama()
    fb = vzstream.FakeBackend(activation_nbytes=4096)
    budget = named_minimum(model, units="blocks", prefetch=PREFETCH, activation_reserve=4096)
    with vzstream.session(model, backend=fb, vram_budget=budget, prefetch=PREFETCH) as s:
        s(ids)
        binds = [op for op in fb.ops if op[0] == "bind"]
        with pytest.raises(vzstream.ConfigError, match="new tokens for 2 sequence"):
            s.generate(ids, **gen_kwargs)
        assert [op for op in fb.ops if op[0] == "bind"] == binds
