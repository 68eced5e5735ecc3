"""Session: bit-exact outputs against the resident model, residue-free exit (normally and by
exception), exceptions inside forward, one session per model, stats, plain-module generate."""

import asyncio
import contextlib
import math
import sys
import threading

import numpy as np
import pytest
import torch
from models import (
    HF_MODELS,
    NEW_TOKENS,
    BlockFailure,
    Stack,
    TinyLM,
    build,
    build_hf,
    greedy_resident,
    hf_inputs,
    make_input,
    stack_with_reference,
)

import vzstream
from vzstream.pipeline import Pipeline

UNITS = ("blocks", "leaves")

# Full prefetch matrix for Llama, prefetch {0, 2} for the others; cache="none" on Llama only.
# At the pipeline's size threshold these blocks decode on worker threads and leaves inline.
HF_CASES = [
    pytest.param(name, units, k, "pass", id=f"{name}-{units}-prefetch{k}")
    for name in HF_MODELS for units in UNITS for k in ((0, 1, 2, 4) if name == "llama" else (0, 2))
]
HF_CASES += [pytest.param("llama", units, 2, "none", id=f"llama-{units}-prefetch2-cache_none") for units in UNITS]


@pytest.mark.parametrize("name, units, prefetch, cache", HF_CASES)
def test_hf_generate_and_forward_bit_exact(name, units, prefetch, cache, hf_reference, snapshot):
    ref_logits, ref_tokens = hf_reference(name)
    model = build_hf(name)
    ids, gen_kwargs = hf_inputs()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu", prefetch=prefetch, units=units, cache=cache) as s:
        first = s.generate(ids, **gen_kwargs)          # learns the trace on its first pass
        second = s.generate(ids, **gen_kwargs)         # runs entirely on the learned schedule
        logits = s(ids).logits
        stats = s.stats()
        trace_len = len(s.member.runtime.tracer.trace)
        num_fetches = s.member.runtime.schedule.num_fetches
    assert torch.equal(first, ref_tokens)
    assert torch.equal(second, ref_tokens)
    assert logits.dtype == ref_logits.dtype and torch.equal(logits, ref_logits)
    assert stats.passes == 2 * NEW_TOKENS + 1
    assert stats.trace_misses == 0
    assert stats.sync_fetches == trace_len                        # only the first pass is synchronous
    assert stats.prefetched == (stats.passes - 1) * num_fetches   # every later fetch was scheduled
    snap.check(model)          # includes GPT-2's tie: lm_head.weight is still wte.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("cache", ["pass", "none"], ids=lambda c: f"cache_{c}")
def test_toy_lm_bit_exact_over_repeated_calls(dtype, cache, decode_path, snapshot, slots_ok):
    model = build(TinyLM, dtype=dtype, tied=True)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    snap = snapshot(model)
    with vzstream.session(model, device="cpu", prefetch=2, units="leaves", cache=cache) as s:
        for _ in range(3):
            assert torch.equal(s(ids), ref)
            slots_ok(s)
    snap.check(model)


def test_plain_module_generate_is_resident_greedy():
    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    expected = greedy_resident(model, ids, 5)
    with vzstream.session(model, device="cpu", prefetch=2) as s:
        assert torch.equal(s.generate(ids, max_new_tokens=5), expected)
        assert torch.equal(s.generate(ids, max_new_tokens=5), expected)
        assert s.stats().trace_misses == 0


# -- leaving the session ----------------------------------------------------------------------

@pytest.mark.parametrize("units", UNITS)
@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt], ids=["RuntimeError", "KeyboardInterrupt"])
def test_exception_in_body_restores_model(units, exc_type, decode_path, snapshot, open_models):
    model = build(TinyLM, dtype=torch.bfloat16, tied=True)
    model.norm.weight.requires_grad_(False)            # requires_grad must survive either way
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    snap = snapshot(model)
    with pytest.raises(exc_type, match="in the body"):
        with vzstream.session(model, device="cpu", prefetch=2, units=units) as s:
            s(ids)
            s(ids)                                     # prefetches for the next pass are in flight
            raise exc_type("in the body")
    snap.check(model)
    assert not s.is_open and model not in open_models


@pytest.mark.parametrize("raised", [None, RuntimeError, KeyboardInterrupt],
                         ids=["normal", "RuntimeError", "KeyboardInterrupt"])
def test_exit_joins_threads_and_frees_device_memory(raised, monkeypatch):
    monkeypatch.setattr(Pipeline, "inline_nbytes", 0)  # every decode on a worker thread
    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with pytest.raises(raised) if raised else contextlib.nullcontext():
        with vzstream.session(model, device="cpu", prefetch=2, units="leaves", workers=2) as s:
            s(ids)
            s(ids)                                     # prefetches in flight when we leave
            assert any(t.name.startswith("vzstream") for t in threading.enumerate())
            assert s.backend.device_nbytes > 0
            if raised:
                raise raised("leave")
    assert not [t.name for t in threading.enumerate() if t.name.startswith("vzstream")]
    assert s.backend.device_nbytes == 0                # slots and resident copies freed
    assert s.backend.peak_device_nbytes > 0


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt], ids=["RuntimeError", "KeyboardInterrupt"])
def test_a_parameter_that_fails_to_restore_leaves_every_other_restored(exc_type, monkeypatch, snapshot, open_models):
    # Streamed parameters are decoded back on threads of their own; one failing (here not a
    # FormatError, so it propagates, after a corrupt one that does not) must not keep the
    # others, the resident parameters or the buffers from coming back.
    from vzstream.install import Original

    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    snap = snapshot(model)
    corrupt, broken, threads, restore = "blocks.0.down.weight", "blocks.1.up.weight", set(), Original.restore

    def failing_restore(orig):
        threads.add(threading.current_thread().name)
        if orig.name == corrupt:
            raise vzstream.FormatError("corrupt")
        if orig.name == broken:
            raise exc_type("restore failed")
        restore(orig)

    monkeypatch.setattr(Original, "restore", failing_restore)
    with pytest.raises(exc_type, match="restore failed") as err:
        with vzstream.session(model, device="cpu", prefetch=2, workers=2) as s:
            s(ids)
            moved = []
            from_device = s.backend.from_device
            monkeypatch.setattr(s.backend, "from_device", lambda t, d: moved.append(d) or from_device(t, d))
    snap.check(model, skip=(corrupt, broken))
    if sys.version_info >= (3, 11):                    # the corrupt one is named, not lost
        assert any(f"`{corrupt}`" in note for note in err.value.__notes__)
    assert len(moved) == sum(1 for u in s.units if not u.streamed for _ in u.params) > 0
    assert threads and all(name.startswith("vzstream-restore") for name in threads)
    assert model not in open_models and not [t for t in threading.enumerate() if t.name.startswith("vzstream")]


@pytest.fixture
def numpy_arenas(monkeypatch):
    """CPU arenas backed by numpy arrays: {address: weak reference to the array}. A weak
    reference to the array dies only with the memory itself (any view into it, such as a
    an image's memoryview, keeps it alive), unlike one to the arena tensor object."""
    import weakref

    from vzstream.backends.cpu import CpuBackend

    arrays = {}

    def host_buffer(self, nbytes):
        array = np.empty(nbytes, np.uint8)
        arrays[array.ctypes.data] = weakref.ref(array)
        return torch.from_numpy(array)

    monkeypatch.setattr(CpuBackend, "host_buffer", host_buffer)
    return arrays


@pytest.mark.parametrize("corrupt", [False, True], ids=["clean", "with_a_corrupt_tensor"])
def test_a_ctrl_c_while_leaving_is_raised_once_every_parameter_is_back(corrupt, monkeypatch, snapshot, open_models):
    # A real SIGINT, raised while the main thread waits for the restore threads: Python runs
    # its handler there, so without holding it the units after it would stay empty. A corrupt
    # tensor's FormatError is kept as the KeyboardInterrupt's context, not lost.
    import signal

    from vzstream.install import Original

    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    snap = snapshot(model)
    sent, restore, bad = [], Original.restore, "blocks.2.up.weight"

    def interrupting_restore(orig):
        if not sent:
            sent.append(orig.name)
            signal.raise_signal(signal.SIGINT)
        if corrupt and orig.name == bad:
            raise vzstream.FormatError("corrupt")
        restore(orig)

    monkeypatch.setattr(Original, "restore", interrupting_restore)
    # Python's own handler, whatever started pytest (a background job may ignore SIGINT).
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as err:
            with vzstream.session(model, device="cpu", prefetch=2, workers=2) as s:
                s(ids)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, handler)
    assert sent
    snap.check(model, skip=(bad,) if corrupt else ())
    assert model not in open_models and not s.is_open
    if corrupt:
        assert isinstance(err.value.__context__, vzstream.FormatError) and bad in str(err.value.__context__)


def test_a_second_ctrl_c_while_leaving_is_obeyed_at_once(monkeypatch, open_models):
    # A hang while restoring must stay escapable: the first Ctrl-C is held (with a warning that
    # says what a second one costs), the second raises at once and the session still closes.
    import logging
    import signal

    from vzstream.session import Session
    from vzstream.install import Original

    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    warned, calls, restore = threading.Event(), [], Original.restore

    class Warned(logging.Handler):
        def emit(self, record):
            if "press Ctrl-C again" in record.getMessage():
                warned.set()

    def interrupting_restore(orig):
        calls.append(orig.name)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)
        elif len(calls) == 2:                 # once the first was handled (signals coalesce)
            assert warned.wait(5)
            signal.raise_signal(signal.SIGINT)
        restore(orig)

    monkeypatch.setattr(Original, "restore", interrupting_restore)
    monkeypatch.setattr(Session, "_host_threads", lambda self: 1)
    handler, catcher = signal.signal(signal.SIGINT, signal.default_int_handler), Warned()
    logging.getLogger("vzstream").addHandler(catcher)
    try:
        with pytest.raises(KeyboardInterrupt):
            with vzstream.session(model, device="cpu", prefetch=2) as s:
                s(ids)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        logging.getLogger("vzstream").removeHandler(catcher)
        signal.signal(signal.SIGINT, handler)
    assert warned.is_set() and len(calls) < sum(1 for u in s.units if u.streamed for _ in u.params)
    assert model not in open_models and not s.is_open


def test_a_backend_that_fails_to_free_a_store_still_gets_every_parameter_back(monkeypatch, snapshot, open_models):
    from vzstream.session import Session

    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    snap = snapshot(model)
    monkeypatch.setattr(Session, "_host_threads", lambda self: 1)     # units after the failure wait for it
    with pytest.raises(RuntimeError, match="cannot free"):
        with vzstream.session(model, device="cpu", prefetch=2) as s:
            s(ids)

            def failing_clear():
                raise RuntimeError("cannot free")

            monkeypatch.setattr(s.backend, "clear_caches", failing_clear)
    snap.check(model)
    assert model not in open_models and not s.is_open      # closed, though the pool failed to free


def test_parameters_that_cannot_go_back_to_their_device_are_kept_on_the_cpu(snapshot, open_models):
    # E.g. their GPU is out of memory: the weights must not be lost with the store, keep their
    # strides (one is transposed), and every one of them is named.
    model = build(TinyLM, dtype=torch.bfloat16)
    w = model.blocks[2].down.weight
    w.data = w.data.t().contiguous().t()               # same values, transposed strides
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    snap, stuck = snapshot(model), ("blocks.1.up.weight", "blocks.2.down.weight")
    with pytest.raises(vzstream.VzstreamError, match="could not be moved back .* left on the CPU, intact") as err:
        with vzstream.session(model, device="cpu", prefetch=2) as s:
            s(ids)
            for orig in [o for u in s.units for o in u.originals]:
                if orig.name in stuck:
                    orig.device = "no-such-device"      # .to() raises, as it would out of memory
    snap.check(model)                                   # came from the CPU: exactly as it was
    assert model not in open_models
    told = str(err.value) + "".join(getattr(err.value, "__notes__", []))
    if sys.version_info >= (3, 11):                     # the second is in a note
        assert all(f"`{name}`" in told for name in stuck)


def test_leaving_frees_the_ring_before_restoring_parameters(monkeypatch):
    # A model that came from the device needs the room there: the slots' memory goes first, not
    # only the count. Device buffers are numpy-backed here, so a weak reference to the array
    # dies only with the memory itself.
    import gc
    import weakref

    from vzstream.backends.cpu import CpuBackend
    from vzstream.install import Original

    slots = []

    def device_buffer(self, nbytes):
        self.account(nbytes)
        array = np.empty(nbytes, np.uint8)
        slots.append(weakref.ref(array))
        return torch.from_numpy(array)

    monkeypatch.setattr(CpuBackend, "device_buffer", device_buffer)
    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    held, alive, restore = [], [], Original.restore

    def recording_restore(orig):
        if not held:
            gc.collect()
            alive.extend(ref for ref in slots if ref() is not None)
        held.append(s.backend.device_nbytes)
        restore(orig)

    monkeypatch.setattr(Original, "restore", recording_restore)
    with vzstream.session(model, device="cpu", prefetch=2) as s:
        s(ids)
        resident = sum(n for u in s.units if not u.streamed for n in u.param_nbytes)
        assert s.backend.device_nbytes > resident and slots    # the ring holds slots
    assert held and max(held) == resident and not alive


def test_leaving_when_no_thread_can_start_restores_on_the_caller(monkeypatch, snapshot, open_models):
    # A session left from an atexit handler: the interpreter refuses new work to thread pools.
    from concurrent.futures import ThreadPoolExecutor

    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    snap = snapshot(model)
    with vzstream.session(model, device="cpu", prefetch=2) as s:
        s(ids)

        def refuse(self, fn, *args, **kwargs):
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

        monkeypatch.setattr(ThreadPoolExecutor, "submit", refuse)
    snap.check(model)
    assert model not in open_models


def test_a_kept_format_error_keeps_no_store_alive(numpy_arenas, snapshot):
    # The error (and its chain: zstd's, the frame's, the plane's) must not hold the frame data,
    # and so its unit's arena (pinned memory, on CUDA), for as long as the user keeps it.
    import gc

    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with pytest.raises(vzstream.FormatError) as err:
        with vzstream.session(model, device="cpu", prefetch=2, codec="zstd") as s:
            s(ids)
            store = next(st for st in s.stores.values() if st.unit.fqn == "blocks.1")
            frame = store.image.frames[0]
            np.frombuffer(frame.data, np.uint8)[len(frame.data) // 2 :][:1] ^= 0xFF
            del store, frame
    kept = err.value
    assert "blocks.1" in str(kept) and kept.__cause__ is not None
    gc.collect()
    assert numpy_arenas and all(memory() is None for memory in numpy_arenas.values())


def test_leaving_frees_each_units_store_once_its_parameters_are_back(numpy_arenas, monkeypatch, snapshot):
    # Host RAM while leaving: the model's size plus the units in flight, not plus every store.
    from vzstream.session import Session
    from vzstream.install import Original

    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    snap = snapshot(model)
    monkeypatch.setattr(Session, "_host_threads", lambda self: 1)     # restore in order
    alive_at, restored, restore = [], [], Original.restore

    def recording_restore(orig):
        alive_at.append((orig.unit_fqn, [fqn for fqn, memory in arenas if memory() is not None]))
        restored.append(orig)
        restore(orig)

    monkeypatch.setattr(Original, "restore", recording_restore)
    with vzstream.session(model, device="cpu", prefetch=2) as s:
        s(ids)
        arenas = [(st.unit.fqn, numpy_arenas[st.arena.data_ptr()]) for st in s.stores.values()]
    order = [fqn for fqn, _ in arenas]
    assert len(order) == len(model.blocks) and [fqn for fqn, _ in alive_at] == sorted(
        (fqn for fqn, _ in alive_at), key=order.index)
    for fqn, alive in alive_at:                   # every earlier unit's memory is gone already
        assert alive == order[order.index(fqn):]
    assert all(memory() is None for _, memory in arenas)
    assert restored and all(orig.packed is None for orig in restored)
    snap.check(model)


def test_exit_is_idempotent_and_session_refuses_calls_after_exit(snapshot):
    model = build(Stack)
    x = make_input(2, 64)
    snap = snapshot(model)
    with vzstream.session(model, device="cpu") as s:
        s(x)
    s.close()                                          # a second close is harmless
    snap.check(model)
    with pytest.raises(vzstream.TraceError, match="not open"):
        s(x)


@pytest.mark.asyncio
async def test_async_context_manager(snapshot):
    model, x, ref = stack_with_reference()
    snap = snapshot(model)
    async with vzstream.session(model, device="cpu", prefetch=1) as s:
        assert torch.equal(s(x), ref)
        await asyncio.sleep(0)
        assert torch.equal(s(x), ref)
    snap.check(model)


# -- exceptions raised inside a module's forward ------------------------------------------------

@pytest.mark.parametrize("prefetch", [0, 2], ids=lambda k: f"prefetch{k}")
@pytest.mark.parametrize("fail_at", [0, 2, 3], ids=["first", "middle", "last"])
@pytest.mark.parametrize("exc_type", [BlockFailure, KeyboardInterrupt], ids=["Exception", "KeyboardInterrupt"])
def test_exception_in_forward_then_session_keeps_working(prefetch, fail_at, exc_type, decode_path, snapshot, slots_ok):
    # KeyboardInterrupt is not an Exception: torch skips always_call hooks, the session tidies up.
    model = build(Stack, dtype=torch.bfloat16)
    x = make_input(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    snap = snapshot(model)
    with vzstream.session(model, device="cpu", prefetch=prefetch) as s:
        with pytest.raises(exc_type):                  # the learning pass itself fails
            s(x, fail_at=fail_at, fail_with=exc_type)
        for _ in range(2):
            assert torch.equal(s(x), ref)
        with pytest.raises(exc_type):                  # a pass on the learned schedule fails
            s(x, fail_at=fail_at, fail_with=exc_type)
        slots_ok(s)
        for _ in range(2):
            assert torch.equal(s(x), ref)              # and the next ones are exact, on plan
        slots_ok(s)
        stats = s.stats()
        assert stats.trace_misses == 0                 # a failed pass is forgotten, not learned
        assert stats.passes == 4
        assert stats.sync_fetches == len(model.blocks) + fail_at + 1   # the first failed pass + learning pass
    snap.check(model)


def test_exception_in_forward_of_direct_model_call(snapshot, slots_ok):
    """The model called directly (not through `s(...)`) inside the session still recovers."""
    model, x, ref = stack_with_reference()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu", prefetch=2) as s:
        s(x)
        s(x)
        with torch.no_grad(), pytest.raises(BlockFailure):
            model(x, fail_at=1)
        slots_ok(s)
        assert torch.equal(s(x), ref)
        assert torch.equal(s(x), ref)
    snap.check(model)


def test_exception_in_forward_propagating_out_of_session_restores_model(snapshot):
    model = build(TinyLM)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))

    def boom(module, args):
        raise BlockFailure("from a forward pre-hook")

    handle = model.blocks[1].down.register_forward_pre_hook(boom)
    snap = snapshot(model)                             # the user's hook is part of the model
    with pytest.raises(BlockFailure):
        with vzstream.session(model, device="cpu", prefetch=2, units="leaves") as s:
            s(ids)
    snap.check(model)
    handle.remove()


# -- user state the session must not disturb -------------------------------------------------------

def test_user_hooks_keep_running_and_survive_the_session(snapshot):
    model = build(Stack)
    x = make_input(2, 64)
    calls = []
    handles = [
        model.register_forward_pre_hook(lambda m, a: calls.append("root-pre")),
        model.blocks[1].register_forward_hook(lambda m, a, o: calls.append("block1-post")),
    ]
    with torch.no_grad():
        ref = model(x)
    calls.clear()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu", prefetch=1) as s:
        assert torch.equal(s(x), ref)
        assert torch.equal(s(x), ref)
    assert calls == ["root-pre", "block1-post"] * 2
    snap.check(model)
    for h in handles:
        h.remove()


def test_exit_preserves_strides_of_noncontiguous_parameter(snapshot):
    model = build(Stack)
    weight = model.blocks[1].up.weight                 # [2D, D]
    model.blocks[1].up.weight = torch.nn.Parameter(weight.detach().t().contiguous().t())
    assert not model.blocks[1].up.weight.is_contiguous()
    snap = snapshot(model)
    x = make_input(2, 64)
    with torch.no_grad():
        ref = model(x)
    seen = []
    model.blocks[1].up.register_forward_pre_hook(lambda m, a: seen.append(m.weight.stride()))
    with vzstream.session(model, device="cpu") as s:
        for _ in range(2):                             # traced pass, then the learned schedule
            assert torch.equal(s(x), ref)
    assert seen == [(1, 128)] * 2                      # bound with the original strides
    model.blocks[1].up._forward_pre_hooks.clear()
    snap.check(model)


# -- one session per model ------------------------------------------------------------------

def test_second_session_on_same_model_is_refused_and_first_keeps_working(snapshot):
    model, x, ref = stack_with_reference()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu", prefetch=2) as s:
        assert torch.equal(s(x), ref)
        with pytest.raises(vzstream.TraceError, match="`model`"):
            with vzstream.session(model, device="cpu"):
                pass
        assert torch.equal(s(x), ref)
        assert torch.equal(s(x), ref)
    snap.check(model)
    with vzstream.session(model, device="cpu") as s2:   # free again once the first one closed
        assert torch.equal(s2(x), ref)
    snap.check(model)


def test_session_requires_a_module():
    with pytest.raises(vzstream.ModelTypeError, match="`model` must be a torch.nn.Module; got function") as info:
        vzstream.session(lambda x: x)
    assert isinstance(info.value, TypeError) and isinstance(info.value, vzstream.VzstreamError)


# -- stats ------------------------------------------------------------------------------------

STAT_FIELDS = ("passes", "trace_misses", "units_streamed", "units_resident", "decodes", "packed_nbytes",
               "raw_nbytes", "decode_s", "stall_s", "wall_s")


def test_stats_fields_dict_and_table():
    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with vzstream.session(model, device="cpu", prefetch=2) as s:
        before = s.stats()
        for _ in range(3):
            s(ids)
        stats = s.stats()
    num_blocks = len(model.blocks)
    assert before.passes == 0 and before.decodes == 0
    assert stats.passes == 3
    assert stats.trace_misses == 0
    assert stats.units_streamed == num_blocks
    assert stats.units_resident == 3                   # embed, norm, head
    # 3 passes of 4 fetches, plus the wrap-around prefetch of the next pass's first 2.
    assert stats.decodes == 3 * num_blocks + 2
    raw = sum(p.numel() * p.element_size() for p in model.blocks.parameters())
    assert stats.raw_nbytes == raw
    assert 0 < stats.packed_nbytes < raw               # bf16 weights do compress
    assert stats.decode_s > 0 and stats.wall_s > 0 and stats.stall_s >= 0
    assert stats.stall_s <= stats.wall_s
    d = stats.as_dict()
    for key in STAT_FIELDS:
        assert d[key] == getattr(stats, key)
    assert math.isclose(d["ratio"], raw / stats.packed_nbytes)
    table = str(stats)
    for label in ("passes", "trace misses", "units streamed / resident", "decodes", "packed / raw",
                  "decode time", "stall"):
        assert label in table
    assert f"{stats.units_streamed} / {stats.units_resident}" in table


def test_stats_slot_overflows_stays_zero_on_plan():
    model = build(Stack)
    x = make_input(2, 64)
    with vzstream.session(model, device="cpu", prefetch=1) as s:
        for _ in range(4):
            s(x)
        assert s.stats().slot_overflows == s.member.runtime.counters.slot_overflows == 0


def test_session_called_inside_except_block_still_streams():
    model, x, ref = stack_with_reference()
    with vzstream.session(model, device="cpu", prefetch=2) as s:
        for _ in range(3):
            try:
                raise ValueError("handled by the caller")
            except ValueError:
                assert torch.equal(s(x), ref)          # exact either way
        stats = s.stats()
    assert stats.passes == 3
    assert stats.sync_fetches == len(model.blocks)     # only the first pass fetches synchronously


# -- re-entry, shared parameters (regressions from review) ------------------------------------

def _runs_within(fn, seconds: float = 10.0):
    """Run `fn` on a thread; return (finished, its exception). A hang is a failure, not a stall."""
    box = {}

    def target():
        try:
            fn()
        except BaseException as exc:   # noqa: BLE001 - handed to the test
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive(), box.get("exc")


def test_call_from_inside_its_own_forward_is_refused_not_a_deadlock():
    model = build(Stack)
    x = make_input(2, 64)
    with vzstream.session(model, device="cpu") as s:
        handle = model.blocks[0].register_forward_hook(lambda m, a, o: s(x))
        finished, exc = _runs_within(lambda: s(x))
        handle.remove()
        assert finished, "a re-entrant call deadlocked on the pool lock"
        assert isinstance(exc, vzstream.TraceError) and "inside another call" in str(exc)
        with torch.no_grad():
            ref = model(x)                              # still streams: the session recovered
        assert torch.equal(s(x), ref)


def test_models_sharing_parameters_cannot_both_be_open(snapshot):
    a = build(Stack)
    b = torch.nn.Module()
    b.blocks = torch.nn.ModuleList([a.blocks[0], torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)])
    snap = snapshot(a)
    with vzstream.session(a, device="cpu"):
        with pytest.raises(vzstream.TraceError, match="shares parameters"):
            vzstream.session(b, device="cpu").open()
    snap.check(a)


def test_block_registered_under_two_names_is_one_unit():
    model = build(Stack)
    model.first = model.blocks[0]                       # an alias registered before the list
    x = make_input(2, 64)
    with torch.no_grad():
        ref = model(x)
    with vzstream.session(model, device="cpu", prefetch=1) as s:
        assert torch.equal(s(x), ref) and torch.equal(s(x), ref)


@pytest.mark.parametrize("raw_fraction", [0.5, 1.0])
def test_raw_fraction_keeps_units_uncompressed_and_outputs_exact(raw_fraction, decode_path, snapshot, slots_ok):
    """Units kept raw (no decode, more host RAM) stream like the others: the same outputs."""
    model = build(TinyLM, dtype=torch.bfloat16, tied=True)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    snap = snapshot(model)
    held = {}
    for fraction in (0.0, raw_fraction):
        with vzstream.session(model, device="cpu", prefetch=2, units="leaves", raw_fraction=fraction, codec="zstd") as s:
            for _ in range(2):
                assert torch.equal(s(ids), ref)
                slots_ok(s)
            compressed = [st.compressed for st in s.stores.values()]
            held[fraction] = s.stats().packed_nbytes
        snap.check(model)
        if fraction == 1.0:
            assert not any(compressed)
        elif fraction == 0.5:
            assert 0 < compressed.count(False) < len(compressed)
    assert held[raw_fraction] > held[0.0]          # what it costs: host RAM


@pytest.mark.parametrize("name, units", [("llama", "blocks"), ("gpt2", "leaves")])
def test_nibble_codec_streams_bit_exact(name, units, hf_reference, decode_path, snapshot, slots_ok):
    """codec="nibble": each unit one wire image, top bytes as 4-bit codes, which the CPU
    backend's workers expand (the reference for what the CUDA backend expands on the device):
    the same tokens and logits."""
    ref_logits, ref_tokens = hf_reference(name)
    model = build_hf(name)
    ids, gen_kwargs = hf_inputs()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu", prefetch=2, units=units, codec="nibble") as s:
        tokens = [s.generate(ids, **gen_kwargs) for _ in range(2)]
        logits = s(ids).logits
        slots_ok(s)
        coded = [st.image is not None and bool(st.image.chunks) for st in s.stores.values()]
        stats = s.stats()
    assert all(torch.equal(t, ref_tokens) for t in tokens) and torch.equal(logits, ref_logits)
    assert any(coded)
    assert stats.raw_nbytes * 0.6 < stats.packed_nbytes < stats.raw_nbytes * 0.9
    snap.check(model)


def test_nothing_reachable_from_the_model_refers_to_the_session(snapshot, open_models):
    # Hooks call the runtime, workers run the pipeline's jobs: the session itself can be
    # collected while open (so a finalizer can restore an abandoned one). Its parts are kept
    # here to put the model back by hand afterwards.
    import gc
    import weakref

    from vzstream.assemble import close_member

    model = build(TinyLM, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    snap = snapshot(model)
    s = vzstream.session(model, device="cpu", prefetch=2)
    s.__enter__()
    assert torch.equal(s(ids), ref)
    pool, member, alive = s.pool, s.member, weakref.ref(s)
    del s
    gc.collect()
    assert alive() is None, [type(r).__name__ for r in gc.get_referrers(alive())]
    with pool.lock:
        close_member(member, pool, 2, lambda: None, lambda: pool.leave(member))
    open_models.discard(model)
    snap.check(model)
