"""One slot layout (issue 13; issue 15 item 5): the plan fixes the slots' count and sizes before
the first call, a budgeted ring never grows past them, a traced pass that needs more names a
budget that works, and finer `units` never need more device memory than coarser ones.

The CPU backend counts what would live on the device (resident parameters + slots), so
`stats().peak_device_nbytes <= budget` is checked here exactly as it would be on a GPU.
"""

import re

import pytest
import torch
from torch import nn

import vzstream
from models import (DIM, VOCAB, Block, TinyLM, build, decodes_per_pass, hf_config, hf_inputs, make_input, named_minimum,
                    numbers_in, seeded)
from vzstream.units import find_units, unit_nbytes

BIG_VOCAB = 8192          # embeddings of 1 MiB each: larger than a decoder layer (73 KiB)


# -- models ---------------------------------------------------------------------------------------

class Level(nn.Module):
    """Owns a DIM x DIM matrix and, below it, `depth - 1` more levels that each own one (all the
    same size, so a tight budget streams every level). `twice`: the innermost level runs twice."""

    def __init__(self, depth: int = 3, twice: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(DIM, DIM) / DIM**0.5)
        self.child = Level(depth - 1, twice) if depth > 1 else None
        self.twice = twice and depth == 2

    def forward(self, x):
        y = torch.tanh(x @ self.w)
        if self.child is not None:
            y = self.child(y)
            if self.twice:
                y = self.child(y)
        return x + y


class Deep(nn.Module):
    """Four blocks of three nested parameter owners, called in `order` (a repeat reuses a block)."""

    def __init__(self, order=(0, 1, 2, 3), twice: bool = False) -> None:
        super().__init__()
        self.order = order
        self.blocks = nn.ModuleList(Level(3, twice) for _ in range(4))

    def forward(self, x):
        for i in self.order:
            x = self.blocks[i](x)
        return x


class Calling(Block):
    """A block that runs its sibling from inside its own forward (`sibling` is no child of it)."""

    def forward(self, x):
        x = super().forward(x)
        sibling = self.__dict__.get("sibling")
        return x if sibling is None else sibling(x)


class Chain(nn.Module):
    """Block i calls block i+1: all four are bound at once, which the module tree does not show."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Calling() for _ in range(4))
        for block, sibling in zip(self.blocks, self.blocks[1:]):
            object.__setattr__(block, "sibling", sibling)     # not registered: not a child

    def forward(self, x):
        return self.blocks[0](x)


def _llama(vocab: int = VOCAB, num_layers: int = 2) -> nn.Module:
    """The tiny Llama of `models.build_hf("llama")`, with `vocab` tokens."""
    import transformers as tf

    config = hf_config("llama", num_layers)
    config.vocab_size = vocab
    with seeded(0):
        model = tf.LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


# -- helpers ---------------------------------------------------------------------------------------

def _ring(plan) -> tuple[int, str]:
    """(slot count, the reason given for it or "") from the head line of `str(s.plan)`."""
    found = re.search(r"ring (\d+) x [^;(]*(?:\(([^)]*)\))?", str(plan).splitlines()[0])
    assert found, str(plan)
    return int(found.group(1)), found.group(2) or ""


# -- tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefetch", [0, 1, 2], ids=lambda p: f"prefetch={p}")
def test_three_deep_nesting_runs_at_the_smallest_budget_without_dropping_the_cache(prefetch, slots_ok):
    # Breaks if the plan stops counting nesting (num_slots = prefetch + 1): the first call at the
    # open minimum then raises; and if cache="pass" falls back to "none" when slots run short.
    model = build(Deep, dtype=torch.bfloat16, twice=True)
    x = make_input(2, 5, DIM, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    budget = named_minimum(model, units="leaves", prefetch=prefetch)
    with vzstream.session(model, device="cpu", vram_budget=budget, units="leaves", prefetch=prefetch) as s:
        outputs = []
        per_pass = decodes_per_pass(s, lambda: outputs.append(s(x)))
        slots_ok(s)
        stats, plan = s.stats(), s.plan
    assert len(outputs) == 5 and all(torch.equal(out, ref) for out in outputs)
    assert stats.slot_overflows == 0
    assert stats.peak_device_nbytes <= budget, f"peak {stats.peak_device_nbytes} over budget {budget}"
    streamed = {u.fqn for u in plan.units if u.streamed}
    assert any({f"blocks.{i}", f"blocks.{i}.child", f"blocks.{i}.child.child"} <= streamed for i in range(4)), \
        f"no block streams all three levels:\n{plan}"
    # Each streamed unit once a pass, the innermost level (run twice) included.
    assert per_pass == stats.units_streamed


@pytest.mark.parametrize("make, units", [
    pytest.param(lambda: build(Chain, dtype=torch.bfloat16), "blocks", id="sibling-call"),
    pytest.param(lambda: build(Deep, dtype=torch.bfloat16, order=(0, 1, 0, 2, 3)), "leaves", id="block-reused"),
])
def test_a_trace_needing_more_slots_names_a_budget_that_works(make, units, snapshot):
    model = make()
    x = make_input(2, 5, DIM, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    snap = snapshot(model)
    budget = named_minimum(model, units=units, prefetch=0)
    with vzstream.session(model, device="cpu", vram_budget=budget, units=units, prefetch=0) as s:
        with pytest.raises(vzstream.ConfigError, match="`vram_budget`") as info:
            s(x)                                  # the traced pass: more bound at once than counted
        first = s.stats()
    assert first.peak_device_nbytes <= budget, "the budget was exceeded before the error"
    assert first.slot_overflows == 0
    snap.check(model)
    # A pass stopped where the slots ran out (a block calling its sibling) cannot know how deep it
    # goes: the message may name the minimum for what it saw and a budget sure to hold it all.
    named = sorted(n for n in numbers_in(str(info.value)) if n > budget)
    assert named, f"no budget named in: {info.value}"
    named_budget = named[-1]
    with vzstream.session(model, device="cpu", vram_budget=named_budget, units=units, prefetch=0) as s:
        outputs = [s(x) for _ in range(3)]        # raises here if the named budget does not fit
        stats = s.stats()
    assert all(torch.equal(out, ref) for out in outputs)
    assert stats.slot_overflows == 0
    assert stats.peak_device_nbytes <= named_budget
    snap.check(model)


@pytest.mark.parametrize("vocab", [VOCAB, BIG_VOCAB], ids=["vocab-256", "vocab-8192"])
def test_leaves_never_peak_above_blocks(vocab):
    # vocab-8192 breaks if outsized units widen the ring instead of taking a slot of their own
    # (4 slots of 1 MiB under "leaves" against 2 MiB of resident embeddings under "blocks").
    ids, gen_kwargs = hf_inputs()
    model = _llama(vocab)
    with torch.no_grad():
        ref = model.generate(ids, **gen_kwargs)
    peaks, plans = {}, {}
    for units in ("blocks", "leaves"):
        with vzstream.session(model, device="cpu", units=units, prefetch=2) as s:
            for _ in range(2):
                assert torch.equal(s.generate(ids, **gen_kwargs), ref), f"units={units!r}"
            peaks[units], plans[units] = s.stats().peak_device_nbytes, str(s.plan)
    assert peaks["leaves"] <= peaks["blocks"], peaks
    embed = next(line for line in plans["leaves"].splitlines() if line.startswith("model.embed_tokens"))
    if vocab == BIG_VOCAB:
        assert "slot of its own" in embed and "dedicated slots" in plans["leaves"].splitlines()[0], plans["leaves"]


@pytest.mark.parametrize("units", ["blocks", "leaves"])
def test_budget_error_names_the_embeddings_and_a_budget_thatopens_at(units):
    # The issue: at 30 MiB a tiny Llama's error blamed the ring while the embeddings took 29.8 MiB.
    model = _llama(BIG_VOCAB, num_layers=8)
    sizes = {u.fqn: unit_nbytes(u, vzstream.CpuBackend.alignment) for u in find_units(model, units)}
    largest_in_layers = max(n for fqn, n in sizes.items() if fqn.startswith("model.layers."))
    assert sizes["model.embed_tokens"] > largest_in_layers    # outsized: resident under any budget
    ring = (2 + 1 + 1) * largest_in_layers                    # prefetch 2, the bind, nesting 1
    minimum = named_minimum(model, units=units)               # also: opens there, not a byte below
    assert ring + 1 < minimum
    for budget in (ring + 1, minimum - 1):
        with pytest.raises(vzstream.ConfigError, match="embed_tokens") as info:
            vzstream.session(model, device="cpu", vram_budget=budget, units=units).open()
        assert minimum in numbers_in(str(info.value)), str(info.value)
    ids, _ = hf_inputs()
    with torch.no_grad():
        ref = model(ids).logits
    with vzstream.session(model, device="cpu", vram_budget=minimum, units=units) as s:
        assert all(torch.equal(s(ids).logits, ref) for _ in range(2))
        assert s.stats().peak_device_nbytes <= minimum


@pytest.mark.parametrize("make, grows", [
    pytest.param(lambda: build(TinyLM), False, id="tiny-lm"),
    pytest.param(lambda: build(Chain), True, id="sibling-call"),
])
def test_the_plan_shows_its_slot_count_before_the_first_call(make, grows):
    # tiny-lm breaks if open counts fewer slots than a plain pass needs (or none until traced);
    # sibling-call, if the ring grows past the plan without `s.plan` saying so and why.
    model = make()
    x = (torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1)) if isinstance(model, TinyLM)
         else make_input(2, 5, DIM))
    with torch.no_grad():
        ref = model(x)
    with vzstream.session(model, device="cpu", prefetch=2) as s:
        before = _ring(s.plan)
        assert all(torch.equal(s(x), ref) for _ in range(2))
        after = _ring(s.plan)
    assert before[0] > 0 and before[1] == ""
    if grows:
        assert after[0] > before[0] and str(after[0]) in after[1], f"before {before}, after {after}"
    else:
        assert after == before
