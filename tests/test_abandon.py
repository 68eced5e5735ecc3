"""A session left open and dropped puts its model back (issue 15, item 3): its finalizer warns
with ResourceWarning and restores the model, never blocking on the pool's lock; and
`vzstream.restore(model)` recovers a model whose session object was lost."""

import gc
import sys
import threading

import pytest
import torch
from models import TinyLM, build

import vzstream

IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))


def _model_and_reference():
    model = build(TinyLM, dtype=torch.bfloat16)
    with torch.no_grad():
        return model, model(IDS)


def _vzstream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vzstream-")]


def test_a_dropped_open_session_puts_its_model_back(snapshot, open_models):
    model, ref = _model_and_reference()
    snap = snapshot(model)
    s = vzstream.session(model, device="cpu", prefetch=2)
    s.__enter__()
    assert torch.equal(s(IDS), ref)
    with pytest.warns(ResourceWarning, match="collected while still open"):
        del s
        gc.collect()
    snap.check(model)                                   # parameters back, no hook left
    assert model not in open_models and not _vzstream_threads()
    with vzstream.session(model, device="cpu") as s:    # and the model opens again
        assert torch.equal(s(IDS), ref)
    snap.check(model)


def test_a_session_collected_during_another_call_waits_for_that_call(snapshot):
    # The finalizer runs inside a call that holds the pool's lock: it must not block on it (a
    # deadlock) nor close then; the model goes back once that call ends.
    pool = vzstream.DevicePool("cpu")
    (kept, kept_ref), (dropped, dropped_ref) = _model_and_reference(), _model_and_reference()
    snap = snapshot(dropped)
    a = vzstream.session(kept, pool=pool).__enter__()
    b = vzstream.session(dropped, pool=pool).__enter__()
    assert torch.equal(b(IDS), dropped_ref)
    held = []

    def collect_inside(*_):
        if held == []:
            held.append(pool.lock.locked())
            nonlocal b
            with pytest.warns(ResourceWarning):
                b = None
                gc.collect()
            held.append(len(pool.pending))

    handle = kept.register_forward_hook(collect_inside)
    try:
        assert torch.equal(a(IDS), kept_ref)
    finally:
        handle.remove()
    assert held == [True, 1]                            # deferred while the call held the lock
    assert not pool.pending
    snap.check(dropped)                                 # ... and done when it ended
    assert torch.equal(a(IDS), kept_ref)
    a.close()


def test_restore_recovers_a_model_whose_session_was_lost(snapshot):
    model, ref = _model_and_reference()
    snap = snapshot(model)
    lost = [vzstream.session(model, device="cpu", prefetch=1).__enter__()]  # held somewhere unknown
    assert torch.equal(lost[0](IDS), ref)
    assert vzstream.restore(model) is True
    snap.check(model)
    assert not lost[0].is_open and not _vzstream_threads()
    assert vzstream.restore(model) is False             # nothing left to restore
    lost[0].close()                                     # a no-op now
    with vzstream.session(model, device="cpu") as s:
        assert torch.equal(s(IDS), ref)


@pytest.mark.parametrize("where", ["Workers.shutdown", "Streamer.abort"])
def test_a_ctrl_c_while_stopping_the_workers_leaves_no_thread(where, monkeypatch, snapshot, open_models):
    # Issue 15, item 4: a KeyboardInterrupt while leaving used to leave a decode thread alive
    # after the `with` block, one more at each interrupted close.
    from vzstream.pipeline import Pipeline, Workers
    from vzstream.runtime import Streamer

    monkeypatch.setattr(Pipeline, "inline_nbytes", 0)  # every unit decoded by the workers

    owner, name = {"Workers.shutdown": (Workers, "shutdown"), "Streamer.abort": (Streamer, "abort")}[where]
    original, raised = getattr(owner, name), []

    def interrupted(self, *args):
        if not raised:
            raised.append(True)
            raise KeyboardInterrupt
        return original(self, *args)

    model, ref = _model_and_reference()
    snap = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        with vzstream.session(model, device="cpu", prefetch=2) as s:
            assert torch.equal(s(IDS), ref)
            assert _vzstream_threads()                  # workers run
            monkeypatch.setattr(owner, name, interrupted)
    monkeypatch.undo()
    assert raised and not _vzstream_threads()
    snap.check(model)
    assert model not in open_models


# -- direct calls (issue 15, item 1) --------------------------------------------------------------

def _hammer(calls: dict, errors: list, n: int = 150):
    """Run each of `calls` (name -> zero-argument call returning (output, reference)) n times
    on its own thread (under no_grad: grad mode is per thread); record every mismatch or error."""
    def run(name, call):
        try:
            for i in range(n):
                torch.set_grad_enabled(False)
                out, ref = call()
                if not torch.equal(out, ref):
                    errors.append(f"{name} call {i}: wrong output")
        except BaseException as exc:                    # reported below, with its thread
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                         # interleave the threads as much as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)


@pytest.mark.parametrize("second", ["direct", "session"])
def test_direct_calls_from_two_threads_wait_for_each_other(second, decode_path, snapshot):
    # Before: a direct model(x) never took the pool's lock; 42 of 300 outputs were wrong, with
    # no error, and others raised KeyError or shape errors.
    model, ref = _model_and_reference()
    other = IDS.flip(0)
    with torch.no_grad():
        other_ref = model(other)
    snap = snapshot(model)
    errors: list = []
    with vzstream.session(model, device="cpu", prefetch=2) as s, torch.no_grad():
        second_call = (lambda: (model(other), other_ref)) if second == "direct" else (lambda: (s(other), other_ref))
        _hammer({"direct": lambda: (model(IDS), ref), second: second_call}, errors)
    assert errors == []
    snap.check(model)


def test_a_ctrl_c_inside_a_direct_call_leaves_the_lock_to_the_next_call(snapshot):
    # A KeyboardInterrupt inside a forward skips torch's always_call hooks, so a direct call's
    # hold of the pool is left behind: the next call, on this thread or another, takes it back.
    model, ref = _model_and_reference()
    snap = snapshot(model)
    fired = []

    def interrupt(*_):
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt

    with vzstream.session(model, device="cpu", prefetch=2) as s, torch.no_grad():
        assert torch.equal(model(IDS), ref)
        handle = model.blocks[1].register_forward_pre_hook(interrupt)
        with pytest.raises(KeyboardInterrupt):
            model(IDS)
        handle.remove()
        errors: list = []
        _hammer({"other thread": lambda: (model(IDS), ref)}, errors, n=3)    # reclaims the stale hold
        assert errors == []
        assert torch.equal(model(IDS), ref) and torch.equal(s(IDS), ref)
        handle = model.blocks[2].register_forward_pre_hook(interrupt)
        fired.clear()
        with pytest.raises(KeyboardInterrupt):
            model(IDS)
        handle.remove()
        assert torch.equal(model(IDS), ref)                                  # this thread takes it back
        with pytest.raises(KeyboardInterrupt):
            fired.clear()
            handle = model.blocks[0].register_forward_pre_hook(interrupt)
            model(IDS)
        handle.remove()
    snap.check(model)                                   # and leaving works with a stale hold
