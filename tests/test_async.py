"""The async API: `async with`, `agenerate`, `stream`; a responsive event loop; cancellation
that stops generation at the next token and leaves the session usable and exact."""

import asyncio
import contextlib
import time

import pytest
import torch

import vzstream
from models import TinyLM, build, build_hf, greedy_resident, hf_inputs

LONG = 500            # max_new_tokens of generations that are meant to be cancelled


@pytest.fixture(scope="module")
def llama():
    """A tiny 4-layer bf16 Llama, its inputs, and its resident greedy tokens for 6 and 30 steps."""
    model = build_hf("llama", num_layers=4)
    ids, gen_kwargs = hf_inputs()
    with torch.no_grad():
        short = model.generate(ids, **gen_kwargs)
        long = model.generate(ids, **{**gen_kwargs, "max_new_tokens": 30})
    return model, ids, gen_kwargs, short, long


def _kwargs(gen_kwargs, max_new_tokens):
    return {**gen_kwargs, "max_new_tokens": max_new_tokens}


@pytest.mark.asyncio
@pytest.mark.parametrize("units", ["blocks", "leaves"])
async def test_agenerate_and_stream_match_generate(llama, units, snapshot):
    model, ids, gen_kwargs, short, long = llama
    snap = snapshot(model)
    async with vzstream.session(model, device="cpu", units=units, prefetch=2) as s:
        for _ in range(2):
            assert torch.equal(await s.agenerate(ids, **gen_kwargs), short)
            assert torch.equal(s.generate(ids, **gen_kwargs), short)
            steps = [new async for new in s.stream(ids, **gen_kwargs)]
            assert len(steps) == gen_kwargs["max_new_tokens"]
            assert all(step.shape == (ids.shape[0], 1) for step in steps)        # [B, 1] per step
            assert torch.equal(torch.cat([ids, *steps], dim=1), short)
        assert s.stats().trace_misses == 0
    snap.check(model)


@pytest.mark.asyncio
async def test_plain_module_agenerate_and_stream_are_greedy():
    model = build(TinyLM, dtype=torch.bfloat16)
    ids, _ = hf_inputs()
    expected = greedy_resident(model, ids, 5)
    async with vzstream.session(model, device="cpu", prefetch=2) as s:
        assert torch.equal(await s.agenerate(ids, max_new_tokens=5), expected)
        steps = [new async for new in s.stream(ids, max_new_tokens=5)]
        assert torch.equal(torch.cat([ids, *steps], dim=1), expected)


@pytest.mark.asyncio
async def test_event_loop_stays_responsive_during_agenerate(llama):
    model, ids, gen_kwargs, _, long = llama
    async with vzstream.session(model, device="cpu", units="leaves", prefetch=2) as s:
        ticks, running = 0, True

        async def ticker():
            nonlocal ticks
            while running:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)                       # let the ticker start before generation
        t0 = time.perf_counter()
        out = await s.agenerate(ids, **_kwargs(gen_kwargs, 30))
        elapsed = time.perf_counter() - t0
        running = False
        await task
    assert torch.equal(out, long)
    assert elapsed > 0.02, "generation too short to judge responsiveness"
    assert ticks >= 5, f"the event loop ticked {ticks} times in {elapsed:.3f} s of generation"


async def _stream_into(s, ids, gen_kwargs, got):
    async for new in s.stream(ids, **_kwargs(gen_kwargs, LONG)):
        got.append(new)


async def _wait_for(predicate, timeout_s=30.0):
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        assert time.perf_counter() < deadline, "timed out"
        await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_cancelling_a_stream_stops_generation_and_keeps_the_session_usable(llama):
    model, ids, gen_kwargs, short, long = llama
    async with vzstream.session(model, device="cpu", prefetch=2) as s:
        got = []
        task = asyncio.create_task(_stream_into(s, ids, gen_kwargs, got))
        await _wait_for(lambda: len(got) >= 3)
        passes_at_cancel = s.stats().passes
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The generation thread has finished: the pool lock is free and no more passes run.
        assert not s.pool.lock.locked()
        passes = s.stats().passes
        assert passes - passes_at_cancel < 20, "generation ran on after the stream was cancelled"
        await asyncio.sleep(0.05)
        assert s.stats().passes == passes
        assert torch.equal(torch.cat([ids, *got[:3]], dim=1), long[:, : ids.shape[1] + 3])

        t0 = time.perf_counter()
        assert torch.equal(await s.agenerate(ids, **gen_kwargs), short)
        assert s.stats().passes - passes == gen_kwargs["max_new_tokens"]   # nothing else ran meanwhile
        assert time.perf_counter() - t0 < 10
        assert torch.equal(s.generate(ids, **gen_kwargs), short)


@pytest.mark.asyncio
async def test_cancelling_agenerate_stops_at_the_next_token(llama):
    model, ids, gen_kwargs, short, _ = llama
    async with vzstream.session(model, device="cpu", prefetch=2) as s:
        start = s.stats().passes
        task = asyncio.create_task(s.agenerate(ids, **_kwargs(gen_kwargs, LONG)))
        await _wait_for(lambda: s.stats().passes >= start + 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not s.pool.lock.locked()
        passes = s.stats().passes
        assert passes - start < 30, "agenerate ran on after it was cancelled"
        assert torch.equal(await s.agenerate(ids, **gen_kwargs), short)
        assert s.stats().passes - passes == gen_kwargs["max_new_tokens"]


@pytest.mark.asyncio
@pytest.mark.parametrize("closing", [False, True], ids=["plain-break", "aclosing"])
async def test_breaking_out_of_a_stream_keeps_the_session_usable(llama, closing):
    model, ids, gen_kwargs, short, long = llama
    async with vzstream.session(model, device="cpu", prefetch=2) as s:
        got = []
        stream = s.stream(ids, **_kwargs(gen_kwargs, LONG))
        async with (contextlib.aclosing(stream) if closing else contextlib.nullcontext(stream)) as it:
            async for new in it:
                got.append(new)
                if len(got) == 3:
                    break
        if not closing:
            del it, stream                      # the loop finalises the generator (aclose) soon
        t0 = time.perf_counter()
        out = await s.agenerate(ids, **gen_kwargs)     # waits for the abandoned thread to stop
        assert torch.equal(out, short)
        assert time.perf_counter() - t0 < 10
        assert s.stats().passes < LONG, "the abandoned stream generated to the end"
        assert torch.equal(torch.cat([ids, *got], dim=1), long[:, : ids.shape[1] + 3])


@pytest.mark.asyncio
async def test_async_with_restores_the_model_on_exit_and_on_error(llama, snapshot, open_models):
    model, ids, gen_kwargs, short, _ = llama
    snap = snapshot(model)
    async with vzstream.session(model, device="cpu", prefetch=2) as s:
        assert s.is_open and model in open_models
        assert torch.equal(await s.agenerate(ids, **gen_kwargs), short)
    snap.check(model)
    assert model not in open_models and not s.is_open

    with pytest.raises(RuntimeError, match="boom"):
        async with vzstream.session(model, device="cpu", units="leaves", prefetch=2) as s:
            await s.agenerate(ids, **gen_kwargs)
            raise RuntimeError("boom")
    snap.check(model)
    assert model not in open_models


@pytest.mark.asyncio
async def test_agenerate_and_stream_keep_caller_stopping_criteria_and_streamer(llama):
    """Regression: the cancel criterion once replaced the caller's `stopping_criteria`, and
    `stream`'s token hand-off the caller's `streamer`."""
    import transformers

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ended = True

    class StopAtLength(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 11, dtype=torch.bool)

    model, ids, gen_kwargs, _, _ = llama
    kwargs = {**gen_kwargs, "max_new_tokens": 20,
              "stopping_criteria": transformers.StoppingCriteriaList([StopAtLength()])}
    async with vzstream.session(model, device="cpu", prefetch=2) as s:
        expected = s.generate(ids, **kwargs)
        assert expected.shape[1] == 11
        assert torch.equal(await s.agenerate(ids, **kwargs), expected)
        mine = Collect()
        steps = [new async for new in s.stream(ids, **kwargs, streamer=mine)]
        assert torch.equal(torch.cat([ids, *steps], dim=1), expected)
        assert len(mine.puts) == 1 + len(steps) and mine.ended     # the prompt, then each step


@pytest.mark.asyncio
async def test_leaving_the_session_cancels_an_abandoned_stream(llama):
    """Regression: with the generator still referenced after `break`, leaving the session once
    waited for the whole generation."""
    model, ids, gen_kwargs, _, _ = llama
    budgeted_tokens = 40                                # kept small: a regression costs all 40 passes
    async with vzstream.session(model, device="cpu", prefetch=2) as s:
        stream = s.stream(ids, **_kwargs(gen_kwargs, budgeted_tokens))
        async for _ in stream:
            break                                       # `stream` is still referenced: not finalised
    assert s.stats().passes < budgeted_tokens // 2, "close() waited for the abandoned generation"
    await stream.aclose()


@pytest.mark.asyncio
async def test_cancelled_while_opening_leaves_the_model_restored(monkeypatch, snapshot):
    """`asyncio.wait_for(...)` timing out while `async with` packs: __aexit__ never runs, so
    __aenter__ itself must undo the open the thread finishes."""
    from models import Stack

    import vzstream.store as store

    model = build(Stack)
    snap = snapshot(model)
    real_pack = store.pack_unit

    def slow_pack(*args, **kwargs):
        time.sleep(0.1)
        return real_pack(*args, **kwargs)

    monkeypatch.setattr(store, "pack_unit", slow_pack)

    async def use():
        async with vzstream.session(model, device="cpu"):
            pass

    with pytest.raises((asyncio.TimeoutError, TimeoutError)):
        await asyncio.wait_for(use(), timeout=0.05)
    snap.check(model)
    with vzstream.session(model, device="cpu"):          # not left "already open"
        pass


@pytest.mark.asyncio
async def test_cancelled_while_leaving_returns_only_once_the_model_is_back(monkeypatch, snapshot, open_models):
    """`asyncio.wait_for(...)` timing out while `async with` restores (or Ctrl-C under
    `asyncio.run`, which cancels the main task): the cancellation is raised only after the
    thread has put every parameter back."""
    import threading

    from vzstream.install import Original

    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    snap, leaving, restore = snapshot(model), threading.Event(), Original.restore
    stuck = "blocks.3.up.weight"

    def slow_restore(orig):
        leaving.set()
        time.sleep(0.02)
        if orig.name == stuck:                          # the close's own error is kept too
            raise vzstream.VzstreamError(f"`{stuck}` failed")
        restore(orig)

    monkeypatch.setattr(Original, "restore", slow_restore)

    async def use():
        async with vzstream.session(model, device="cpu", workers=1) as s:
            s(ids)

    task = asyncio.ensure_future(use())
    while not leaving.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError) as err:
        await task
    snap.check(model, skip=(stuck,))                    # already back when the cancel arrives
    assert isinstance(err.value.__context__, vzstream.VzstreamError) and stuck in str(err.value.__context__)
    assert model not in open_models
