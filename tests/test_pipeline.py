"""Pipeline and Streamer: exact op order on the fake backend, slot ownership, per-pass caching,
trace misses under random routing, and worker failures surfacing at bind."""

import gc
import os
import re
import subprocess
import sys
import threading
import weakref
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import DIM, NestedLeaves, Routed, Shared, Stack, TinyLM, build, make_input

import vzstream
from vzstream import image
from vzstream.pipeline import Workers, gil_switch_interval
from vzstream.ring import SlotPool

FUZZ = os.environ.get("VZSTREAM_FUZZ") == "1"        # longer hypothesis runs, as in test_codec
FORWARD_OPS = ("request", "bind", "release")   # ops the forward thread performs, in program order


class RecordingBackend(vzstream.FakeBackend):
    """The fake backend, also logging `request` when the forward thread submits a ticket (the
    fake's `decode` is logged by whichever thread starts decoding, so its place races)."""

    def decode_jobs(self, ticket):
        self.log("request", ticket)
        return super().decode_jobs(ticket)


def forward_ops(ops):
    return [op for op in ops if op[0] in FORWARD_OPS]


def ticket_cycles(ops) -> list[tuple[int, str, str]]:
    """Split the log into tickets, per slot: (slot, fqn, "request decode upload bind release").
    Asserts one unit per ticket and that a slot's next ticket starts only after its release."""
    by_slot = defaultdict(list)
    for op, fqn, slot in ops:
        by_slot[slot].append((op, fqn))
    cycles = []
    for slot, seq in by_slot.items():
        current = None
        for op, fqn in seq:
            if op == "request":
                assert current is None, f"slot {slot} requested for {fqn} before {current} released it"
                current = (fqn, [op])
                continue
            assert current is not None and current[0] == fqn, f"slot {slot}: {op} of {fqn} outside its ticket"
            current[1].append(op)
            if op == "release":
                cycles.append((slot, fqn, " ".join(current[1])))
                current = None
        assert current is None, f"slot {slot}: ticket of {current[0]} never released"
    return cycles


# A ticket is bound at most once (a reuse under cache="pass" binds nothing new); a dropped one may
# never have started (inline decode) or may have finished decoding first (workers).
BOUND = re.compile(r"request decode upload bind release")
DROPPED = re.compile(r"request( decode upload)? release")


def check_lifecycles(ops, drained: int) -> None:
    cycles = ticket_cycles(ops)
    kinds = [c for _, _, c in cycles]
    assert all(BOUND.fullmatch(c) or DROPPED.fullmatch(c) for c in kinds), kinds
    assert sum(bool(DROPPED.fullmatch(c)) for c in kinds) == drained


# -- exact op order -------------------------------------------------------------------------

@pytest.mark.parametrize("prefetch", [0, 1, 2, 4], ids=lambda k: f"prefetch{k}")
def test_fake_backend_exact_order_on_sequential_model(prefetch, decode_path):
    n = 4
    model = build(Stack, num_blocks=n)
    x = make_input(2, 64)
    fb = RecordingBackend()
    with vzstream.session(model, backend=fb, prefetch=prefetch) as s:
        s(x)                                           # learning pass: synchronous fetches
        first = forward_ops(fb.ops)
        mark = len(fb.ops)
        s(x)
        s(x)
        steady = forward_ops(fb.ops[mark:])
        num_slots = len(s.member.runtime.ring.slots)
        assert s.stats().drained == 0
    blocks = [f"blocks.{i}" for i in range(n)]

    # First pass: fetch, bind, release each block in turn; at its end, wrap around by
    # requesting the next pass's first `prefetch` blocks.
    expected = [op for b in blocks for op in (("request", b), ("bind", b), ("release", b))]
    expected += [("request", blocks[i % n]) for i in range(prefetch)]
    assert [(op, fqn) for op, fqn, _ in first] == expected

    # Steady state: before binding block i, blocks up to i + prefetch (wrapping) are requested.
    expected = [op for _ in range(2) for i in range(n)
                for op in (("request", blocks[(i + prefetch) % n]), ("bind", blocks[i]), ("release", blocks[i]))]
    assert [(op, fqn) for op, fqn, _ in steady] == expected

    # Fetch g is requested once and bound once, into the same slot: the g-th request from the
    # first wrap request on is the g-th bind of the steady passes.
    requests = [(f, slot) for op, f, slot in first[3 * n:] + steady if op == "request"]
    binds = [(f, slot) for op, f, slot in steady if op == "bind"]
    assert requests[: len(binds)] == binds
    assert num_slots == prefetch + 1
    assert {slot for _, _, slot in fb.ops} == set(range(prefetch + 1))
    assert s.stats().drained == prefetch               # close dropped the wrap-around prefetches
    check_lifecycles(fb.ops, drained=prefetch)


@pytest.mark.parametrize("model_cls, units", [
    pytest.param(Shared, "blocks", id="shared-blocks"),
    pytest.param(TinyLM, "leaves", id="tinylm-leaves"),
    pytest.param(NestedLeaves, "leaves", id="nested-leaves"),
])
@pytest.mark.parametrize("cache", ["pass", "none"], ids=lambda c: f"cache_{c}")
@pytest.mark.parametrize("prefetch", [0, 1, 3], ids=lambda k: f"prefetch{k}")
def test_every_ticket_is_decoded_uploaded_bound_released_in_order(model_cls, units, cache, prefetch, decode_path):
    model = build(model_cls)
    x = torch.randint(0, 256, (2, 8)) if model_cls is TinyLM else make_input(2, 64)
    with torch.no_grad():
        ref = model(x)
    fb = RecordingBackend()
    with vzstream.session(model, backend=fb, prefetch=prefetch, units=units, cache=cache) as s:
        for _ in range(3):
            assert torch.equal(s(x), ref)
    stats = s.stats()                                  # after close: counts the drops at close too
    assert stats.trace_misses == 0
    assert stats.decodes == stats.prefetched + stats.sync_fetches + stats.drained
    check_lifecycles(fb.ops, drained=stats.drained)


def test_miss_drops_in_flight_prefetches(decode_path, slots_ok):
    model = build(Stack)
    x = make_input(2, 64)
    with torch.no_grad():
        ref_skip = model(x, skip=1)
    fb = RecordingBackend()
    with vzstream.session(model, backend=fb, prefetch=2) as s:
        s(x)
        s(x)
        mark = len(fb.ops)
        assert torch.equal(s(x, skip=1), ref_skip)     # binds blocks.2 where blocks.1 was planned
        slots_ok(s)
        stats = s.stats()
        missed = [(op, fqn) for op, fqn, _ in forward_ops(fb.ops[mark:])]
    assert stats.trace_misses == 1 and stats.drained == 2
    assert missed == [
        ("request", "blocks.2"), ("bind", "blocks.0"), ("release", "blocks.0"),   # on plan
        ("release", "blocks.1"), ("release", "blocks.2"),     # the miss drops both in-flight tickets
        ("request", "blocks.2"), ("bind", "blocks.2"), ("release", "blocks.2"),   # off plan: sync
        ("request", "blocks.3"), ("bind", "blocks.3"), ("release", "blocks.3"),
        ("request", "blocks.0"), ("request", "blocks.2"),     # relearned (0, 2, 3): wrap-around
    ]
    check_lifecycles(fb.ops, drained=s.stats().drained)


# -- per-pass cache ---------------------------------------------------------------------------

@pytest.mark.parametrize("cache, fetches_per_pass", [("pass", 3), ("none", 4)])
@pytest.mark.parametrize("prefetch", [0, 2], ids=lambda k: f"prefetch{k}")
def test_shared_module_decoded_once_per_pass_with_cache_pass(cache, fetches_per_pass, prefetch, decode_path, slots_ok):
    model = build(Shared)                              # calls blocks 0, 1, 0, 2
    x = make_input(2, 64)
    with torch.no_grad():
        ref = model(x)
    with vzstream.session(model, device="cpu", prefetch=prefetch, cache=cache) as s:
        assert torch.equal(s(x), ref)
        assert torch.equal(s(x), ref)
        before = s.stats().decodes
        for _ in range(3):
            assert torch.equal(s(x), ref)
            slots_ok(s)
        stats = s.stats()
        assert s.member.runtime.schedule.num_fetches == fetches_per_pass
    assert stats.decodes - before == 3 * fetches_per_pass
    assert stats.trace_misses == 0


# -- random routing: misses, relearning, no leaks -------------------------------------------------

_REFS: dict = {}
orders = st.one_of(st.none(), st.lists(st.integers(0, 3), max_size=6).map(tuple))


@settings(max_examples=400 if FUZZ else 40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=st.lists(orders, min_size=1, max_size=6), prefetch=st.integers(0, 4),
       cache=st.sampled_from(["pass", "none"]))
def test_random_routing_stays_exact_and_leaks_no_slot(paths, prefetch, cache, decode_path, slots_ok):
    model = build(Routed)
    x = make_input(2, 64)

    def reference(order):
        if order not in _REFS:
            with torch.no_grad():
                _REFS[order] = model(x, order=order)
        return _REFS[order]

    with vzstream.session(model, device="cpu", prefetch=prefetch, cache=cache) as s:
        for order in paths:
            assert torch.equal(s(x, order=order), reference(order))
            slots_ok(s)
        # Repeating the last path: on plan from now on, with a static pool.
        assert torch.equal(s(x, order=paths[-1]), reference(paths[-1]))
        stats = s.stats()
        pool_size = len(s.member.runtime.ring.slots)
        for _ in range(2):
            assert torch.equal(s(x, order=paths[-1]), reference(paths[-1]))
            slots_ok(s)
        after = s.stats()
        sched = s.member.runtime.schedule
    assert after.trace_misses == stats.trace_misses
    assert after.slot_overflows == stats.slot_overflows
    assert after.decodes - stats.decodes == 2 * sched.num_fetches
    assert pool_size <= prefetch + 1 + len(s.units)   # bounded whatever the routing did


@pytest.mark.parametrize("skip", [0, 1, 3], ids=["first", "middle", "last"])
@pytest.mark.parametrize("prefetch", [0, 1, 2], ids=lambda k: f"prefetch{k}")
@pytest.mark.parametrize("cache", ["pass", "none"], ids=lambda c: f"cache_{c}")
def test_skipped_block_is_a_miss_then_relearned(skip, prefetch, cache, decode_path, slots_ok):
    model = build(Stack)
    x = make_input(2, 64)
    with torch.no_grad():
        ref, ref_skip = model(x), model(x, skip=skip)
    with vzstream.session(model, device="cpu", prefetch=prefetch, cache=cache) as s:
        for _ in range(3):
            assert torch.equal(s(x), ref)
        assert s.stats().trace_misses == 0
        assert torch.equal(s(x, skip=skip), ref_skip)
        slots_ok(s)
        assert s.stats().trace_misses == 1
        assert torch.equal(s(x), ref)                  # misses the skip-pass trace: relearn
        slots_ok(s)
        misses = s.stats().trace_misses
        assert misses <= 2
        overflows, pool_size = s.stats().slot_overflows, len(s.member.runtime.ring.slots)
        before = s.stats().decodes
        for _ in range(3):
            assert torch.equal(s(x), ref)
            slots_ok(s)
        stats = s.stats()
    assert stats.trace_misses == misses                # relearned: no further misses
    assert stats.slot_overflows == overflows           # steady state allocates nothing
    assert len(s.units) == 4 and pool_size <= prefetch + 2
    assert stats.decodes - before == 3 * 4


def test_nested_units_need_no_slot_beyond_the_schedule():
    model = build(NestedLeaves)
    x = make_input(2, 64)
    with vzstream.session(model, device="cpu", units="leaves", prefetch=1) as s:
        s(x)                                           # learning pass (off plan)
        before = s.stats().slot_overflows
        for _ in range(3):
            s(x)
        assert s.stats().slot_overflows == before
        assert len(s.member.runtime.ring.slots) == s.member.runtime.schedule.num_slots


@pytest.mark.parametrize("prefetch", [0, 2], ids=lambda k: f"prefetch{k}")
@pytest.mark.parametrize("cache", ["pass", "none"], ids=lambda c: f"cache_{c}")
def test_nested_and_cross_block_tied_units_are_exact(prefetch, cache, decode_path, slots_ok):
    nested = build(NestedLeaves)
    tied = build(Stack)
    tied.blocks[2].up.weight = tied.blocks[0].up.weight   # blocks.2 binds blocks.0's unit inside itself
    x = make_input(2, 64)
    for model, units in ((nested, "leaves"), (tied, "blocks")):
        with torch.no_grad():
            ref = model(x)
        with vzstream.session(model, device="cpu", prefetch=prefetch, units=units, cache=cache) as s:
            for _ in range(3):
                assert torch.equal(s(x), ref)
                slots_ok(s)
            assert s.stats().trace_misses == 0
        assert tied.blocks[2].up.weight is tied.blocks[0].up.weight


# -- worker failures ------------------------------------------------------------------------

def frame_in_arena(store) -> tuple[str, int, int]:
    """(fqn of a tensor it codes, arena offset, nbytes) of the first zstd frame of a unit's image."""
    img = store.image
    for c in img.chunks:
        for f in c.frames:
            data = np.frombuffer(f.data, dtype=np.uint8)
            first, last = (c.start + f.start) * img.itemsize, (c.start + f.start + f.nbytes) * img.itemsize
            name = next(n for (n, _), t in zip(store.unit.params, store.packed)
                        if t.raw_nbytes and t.slot_offset < last and first < t.slot_offset + t.raw_nbytes)
            return name, data.ctypes.data - store.arena.data_ptr(), data.size
    raise AssertionError(f"unit {store.unit.fqn} has no compressed frame")


def corrupt(store) -> tuple[str, int]:
    """Flip a byte in the middle of a compressed frame; returns (tensor fqn, arena offset)."""
    name, offset, nbytes = frame_in_arena(store)
    at = offset + nbytes // 2
    store.arena[at] ^= 0xFF
    return name, at


def corrupt_raw(store) -> tuple[str, int]:
    """Flip one bit that no zstd checksum covers, mid-tensor: a low byte of a coded element (a
    nibble chunk's `lo`, a zstd chunk's plane 0) or a byte of the raw area. Returns (tensor fqn,
    arena offset)."""
    img = store.image
    for (name, _), t in zip(store.unit.params, store.packed):
        if not t.numel:
            continue
        if t.slot_offset >= img.coded_nbytes:
            at = img.raw_offset + t.slot_offset - img.coded_nbytes + t.raw_nbytes // 2
        else:
            e = t.slot_offset // img.itemsize + t.numel // 2
            c = next(c for c in img.chunks if c.start <= e < c.start + c.numel)
            at = c.offset + (image.PAIRS_NBYTES if img.coding == "nibble" else 0) + e - c.start
        store.arena[at] ^= 0x01
        return name, at
    raise AssertionError(f"unit {store.unit.fqn} has no tensor")


def unit_index(s, fqn: str) -> int:
    return next(u.index for u in s.units if u.fqn == fqn)


def _watched_stack():
    """A bf16 Stack, its input and resident output, and `ran`: the blocks whose forward ran (a
    hook each; remove `handles` at the end)."""
    model = build(Stack, dtype=torch.bfloat16)
    x = make_input(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(model.blocks)]
    return model, x, ref, ran, handles


def test_corrupt_frame_surfaces_at_that_units_bind(decode_path, snapshot, slots_ok):
    model, x, ref, ran, handles = _watched_stack()
    snap = snapshot(model)
    with vzstream.session(model, device="cpu", prefetch=2, codec="zstd") as s:
        assert torch.equal(s(x), ref)                  # learned; blocks.0 and .1 already prefetched
        store = s.stores[unit_index(s, "blocks.3")]
        tensor, at = corrupt(store)
        ran.clear()
        with pytest.raises(vzstream.FormatError, match=r"unit `blocks\.3`") as err:
            s(x)
        assert f"`{tensor}`" in str(err.value)
        assert isinstance(err.value.__cause__, vzstream.FormatError)   # chained, nothing swallowed
        assert ran == [0, 1, 2]                        # raised at blocks.3's bind, not earlier
        slots_ok(s)
        with pytest.raises(vzstream.FormatError, match=r"blocks\.3"):
            s(x)                                       # still corrupt: fails again, never wrong numbers
        store.arena[at] ^= 0xFF                        # repair: the session keeps working
        assert torch.equal(s(x), ref)
        assert torch.equal(s(x), ref)
    snap.check(model)
    for h in handles:
        h.remove()


def _exit_with_corrupt_unit(model, x):
    """Open a session, corrupt blocks.1 once learned, hit the error at its bind, then leave.
    Returns (the error raised on leaving, the corrupted tensor's fqn)."""
    with pytest.raises(vzstream.FormatError) as err:
        with vzstream.session(model, device="cpu", prefetch=1, codec="zstd") as s:   # corrupts a frame
            s(x)
            tensor, _ = corrupt(s.stores[unit_index(s, "blocks.1")])
            with pytest.raises(vzstream.FormatError):
                s(x)
    return err.value, tensor


def test_exit_with_a_corrupt_unit_restores_every_other_parameter(snapshot, open_models):
    model = build(Stack, dtype=torch.bfloat16)
    x = make_input(2, 64, dtype=torch.bfloat16)
    snap = snapshot(model)
    _exit_with_corrupt_unit(model, x)
    # The corrupted unit cannot be restored (its original storage is gone); everything else is
    # back exactly, with no residue, and the model can be streamed again.
    corrupted = tuple(n for n, _ in model.blocks[1].named_parameters(prefix="blocks.1"))
    snap.check(model, skip=corrupted)
    assert model not in open_models


def test_exit_with_a_corrupt_unit_names_unit_and_tensor():
    model = build(Stack, dtype=torch.bfloat16)
    error, tensor = _exit_with_corrupt_unit(model, make_input(2, 64, dtype=torch.bfloat16))
    assert "`blocks.1`" in str(error) and f"`{tensor}`" in str(error)


@pytest.mark.parametrize("codec_name", ["zstd", "nibble"])
def test_exit_after_a_raw_plane_changed_raises_instead_of_restoring_it(codec_name, snapshot):
    # Streaming reads raw planes unchecked; leaving checks each tensor's crc32, so a changed
    # weight is never put back as if it were the user's.
    model = build(Stack, dtype=torch.bfloat16)
    x = make_input(2, 64, dtype=torch.bfloat16)
    snap = snapshot(model)
    with pytest.raises(vzstream.FormatError, match="crc32") as err:
        with vzstream.session(model, device="cpu", prefetch=1, codec=codec_name) as s:
            s(x)
            tensor, _ = corrupt_raw(s.stores[unit_index(s, "blocks.1")])
    assert "`blocks.1`" in str(err.value) and f"`{tensor}`" in str(err.value)
    snap.check(model, skip=(tensor,))


# -- slot pool --------------------------------------------------------------------------------

def test_slot_pool_reserve_acquire_limit_dedicated_close():
    # Rewritten for the one slot layout: the ring allocates up to the limit it is given and
    # says None past it (the runtime decides: wait, grow, or a budget error); an outsized unit
    # has a slot of its own.
    backend = vzstream.CpuBackend()
    pool = SlotPool(backend, 1024, dedicated={"big": 4096})
    pool.reserve(2)
    assert [s.index for s in pool.slots] == [0, 1] and len(pool.free) == 2
    assert backend.device_nbytes == 2048
    a, b = pool.acquire("x", 2), pool.acquire("y", 2)
    assert a is not b and pool.acquire("z", 2) is None          # at the plan's count
    c = pool.acquire("z", None)                                   # no limit: grows rather than deadlock
    assert len(pool.slots) == 3 and c.tensor.numel() == 1024
    big = pool.acquire("big", 2)
    assert big.index == -1 and big.tensor.numel() == 4096 and pool.acquire("big", None) is None
    for slot in (a, b, c, big):
        pool.release(slot)
    assert pool.acquire("big", 2) is big
    pool.release(big)
    pool.reserve(2)                                    # never shrinks
    assert len(pool.slots) == 3 and len(pool.free) == 3 and pool.nbytes == 3 * 1024 + 4096
    pool.close()
    assert backend.device_nbytes == 0 and backend.peak_device_nbytes == 3072 + 4096


# -- the GIL switch interval ------------------------------------------------------------------


def _interval_seen_by_forward(model, **options):
    """sys.getswitchinterval() inside a streamed call, and the output of that call."""
    seen = []
    handle = model.register_forward_pre_hook(lambda *_: seen.append(sys.getswitchinterval()))
    try:
        with vzstream.session(model, device="cpu", **options) as s:
            out = s(make_input(2, DIM))
    finally:
        handle.remove()
    return seen, out


def test_streamed_calls_lower_the_switch_interval_and_restore_it():
    before = sys.getswitchinterval()
    seen, _ = _interval_seen_by_forward(build(Stack), gil_switch_interval=2e-4)
    assert seen == [pytest.approx(2e-4)]
    assert sys.getswitchinterval() == before
    seen, _ = _interval_seen_by_forward(build(Stack), gil_switch_interval=None)
    assert seen == [before]


def test_the_switch_interval_is_never_raised_and_comes_back_after_overlapping_calls():
    before = sys.getswitchinterval()
    with gil_switch_interval(1e-3):
        with gil_switch_interval(1.0):                # never above what is already set
            assert sys.getswitchinterval() == pytest.approx(1e-3)
        assert sys.getswitchinterval() == pytest.approx(1e-3)   # the outer user still holds it
    assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError), gil_switch_interval(1e-4):
        raise RuntimeError("a failed call restores it too")
    assert sys.getswitchinterval() == before


def test_the_switch_interval_survives_a_tiny_setting_and_keeps_one_set_meanwhile():
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(5e-7)                # CPython keeps 0 us: asking for that raises
        for _ in range(2):
            with gil_switch_interval(1e-4):
                assert sys.getswitchinterval() == pytest.approx(1e-6)
        assert sys.getswitchinterval() == 0.0      # what was there before, back
        sys.setswitchinterval(before)
        with gil_switch_interval(1e-4):
            sys.setswitchinterval(2e-3)            # the user's own, set during the call, stays
        assert sys.getswitchinterval() == pytest.approx(2e-3)
    finally:
        sys.setswitchinterval(before)


def test_workers_run_jobs_in_order_survive_a_raising_job_and_finish_what_was_queued(caplog):
    workers = Workers(1, "vzstream-test")
    gate, done = threading.Event(), []
    workers.submit(gate.wait)                          # holds the thread while more jobs queue
    workers.submit(lambda: 1 / 0)                       # logged; the thread goes on
    for i in range(5):
        workers.submit(done.append, i)
    gate.set()
    workers.shutdown()                                  # runs what was queued, then joins
    assert done == [0, 1, 2, 3, 4]
    assert "ZeroDivisionError" in caplog.text
    assert not any(t.name.startswith("vzstream-test") for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="shut down"):
        workers.submit(done.append, 5)                  # would never run: refused
    workers.shutdown()                                  # twice is harmless


def test_an_idle_worker_keeps_nothing_of_its_last_job_alive():
    """A ticket holds its slot (and on CUDA pinned staging): an idle worker must not keep it."""
    class Payload:
        pass

    workers, ran = Workers(1, "vzstream-test"), threading.Event()
    payload = Payload()
    ref = weakref.ref(payload)
    workers.submit(lambda p: ran.set(), payload)
    assert ran.wait(5)
    del payload
    for _ in range(50):                                 # the worker drops it right after the job
        gc.collect()
        if ref() is None:
            break
        threading.Event().wait(0.01)
    assert ref() is None
    workers.shutdown()


def test_workers_left_running_finish_their_jobs_before_the_interpreter_exits():
    """As with ThreadPoolExecutor: a session left open at exit must not have its workers killed
    inside a job (a daemon thread inside a torch call aborts the process)."""
    code = ("import time\nfrom vzstream.pipeline import Workers\n"
            "w = Workers(2, 'vzstream-exit')\n"
            "w.submit(lambda: (time.sleep(0.3), print('job done', flush=True)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "job done\n"


@pytest.mark.parametrize("inline", [False, True])
def test_a_fetch_with_nothing_to_decode_is_uploaded_by_a_worker_unless_inline(inline):
    """A wire image on CUDA leaves the host nothing to decode: a worker runs an empty job and
    uploads (the forward thread only waits), except a unit small enough to be fetched inline.
    Either way the ticket is ready for `wait` only once its upload was issued."""
    from vzstream.pipeline import Pipeline
    from vzstream.ring import Slot
    from vzstream.runtime import Counters

    uploaded = []

    class NothingToDecode(vzstream.FakeBackend):
        def decode_jobs(self, ticket):
            return []

        def upload(self, ticket):
            uploaded.append(threading.get_ident())

    model = build(Stack)
    with vzstream.session(model, device="cpu") as s:
        store = next(iter(s.stores.values()))
    pipeline = Pipeline(NothingToDecode(), 2, Counters())
    pipeline.inline_nbytes = store.raw_nbytes + 1 if inline else 0
    try:
        ticket = pipeline.submit(store, Slot(0, torch.empty(store.slot_nbytes, dtype=torch.uint8)))
        pipeline.wait(ticket)
        assert ticket.ready.is_set() and len(uploaded) == 1
        assert (uploaded[0] == threading.get_ident()) == inline
    finally:
        pipeline.close()


@pytest.mark.parametrize("direct", [False, True], ids=["session_call", "direct_model_call"])
def test_an_interrupt_inside_a_workers_upload_is_raised_at_that_units_bind_and_leaks_no_slot(direct, slots_ok):
    """A fetch with nothing to decode (a wire image on CUDA) is uploaded by a worker. A
    KeyboardInterrupt inside one (here the wrap-around prefetch issued as the first pass ends)
    is raised where that unit is bound, in the next call, also when the model is called directly
    (no session call to abort). The session then runs on exactly, with every slot accounted for."""
    class InterruptOnce(vzstream.FakeBackend):
        calls = 0

        def decode_jobs(self, ticket):
            super().decode_jobs(ticket)
            return []                               # nothing to decode, as with a wire image

        def upload(self, ticket):
            InterruptOnce.calls += 1
            if InterruptOnce.calls == 7:
                raise KeyboardInterrupt
            for job in vzstream.FakeBackend.decode_jobs(self, ticket):   # the CPU "upload": decode
                for _, work in job:
                    work()

    InterruptOnce.calls = 0
    model, x = build(Stack, num_blocks=6), make_input(2, DIM)
    with torch.no_grad():
        ref = model(x)
    with vzstream.session(model, backend=InterruptOnce(), prefetch=2, codec="nibble") as s:
        s.member.runtime.pipeline.inline_nbytes = 0
        outcomes = []
        for i in range(4):
            try:
                if direct and i == 0:
                    with torch.no_grad():
                        outcomes.append(torch.equal(model(x), ref))
                else:
                    outcomes.append(torch.equal(s(x), ref))
            except KeyboardInterrupt:
                outcomes.append("interrupted")
            slots_ok(s)
    assert outcomes == [True, "interrupted", True, True], outcomes      # raised at that unit's bind


@pytest.mark.parametrize("codec_name", ["zstd", "nibble"])
def test_verify_stream_stops_a_changed_raw_byte_before_any_forward_reads_it(codec_name, slots_ok, snapshot):
    """Issue 15 item 8: raw bytes (low planes, the raw area, nibble codes) carry no checksum of
    their own while streaming. With verify="stream" each fetch checks every stored byte of its
    unit first, on a worker, before the upload: a flipped bit raises FormatError at that unit's
    bind, naming it, and its forward never runs; repaired, the session goes on exactly. (Without
    it, the flipped bit reaches the forward: the second half.)"""
    model, x, ref, ran, handles = _watched_stack()
    snap = snapshot(model)
    for verify in ("stream", "exit"):
        with vzstream.session(model, device="cpu", prefetch=2, codec=codec_name, verify=verify) as s:
            assert torch.equal(s(x), ref)
            store = s.stores[unit_index(s, "blocks.2")]
            tensor, at = corrupt_raw(store)
            ran.clear()
            if verify == "stream":
                with pytest.raises(vzstream.FormatError, match=r"unit `blocks\.2`.*crc32") as err:
                    s(x)
                assert f"`{tensor}`" in str(err.value) and ran == [0, 1]      # blocks.2 never computed
                slots_ok(s)
            else:
                s(x)                                                            # what verify="stream" stops:
                assert ran == [0, 1, 2, 3]                                      # blocks.2 computed on it
            store.arena[at] ^= 0x01                                             # repaired
            assert torch.equal(s(x), ref)
    snap.check(model)
    for h in handles:
        h.remove()
