"""Issue 14's budgets of host work per streamed unit, counted exactly on the fake GPU.

A `TorchFunctionMode` (per thread) counts every torch-level call the forward thread makes,
attribute getters included, except `.data` sets (the binding, one per parameter each way).
Wrapping the runtime's hooks attributes each call to the unit (or pass) that made it. The
workers are counted the same way, through `Workers.around`. A steady-state unit, however large,
with either code, may cost the forward thread at most 12 calls and no new CUDA event; its upload
at most 2 host→device copies per 32 MiB chunk; nobody synchronises with the device. Every count
is written out exactly, so a change that adds a call fails here first.
"""

import threading
from collections import Counter

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import vzstream
from vzstream import image, pipeline, runtime
from vzstream.backends import cuda as cuda_mod
from vzstream.backends.cuda import CudaBackend
from fake_cuda import FakeCuda, FakeEvent

_DATA = torch._C.TensorBase.data       # its setter reaches the mode as a fresh method-wrapper


class Count(TorchFunctionMode):
    """Counts the torch calls of the thread it is entered on, by name."""

    def __init__(self, calls: Counter) -> None:
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not (getattr(func, "__name__", "") == "__set__" and getattr(func, "__self__", None) is _DATA):
            self.calls[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


class Block(nn.Module):
    """A Llama decoder block's parameters (7 Linear, 2 norms) with a cheap forward that reads
    all of them: what streams is what counts here, not the attention."""

    def __init__(self, hidden: int, inter: int, kv: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.q, self.o = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
        self.k, self.v = nn.Linear(hidden, kv, bias=False), nn.Linear(hidden, kv, bias=False)
        self.gate, self.up = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.o(self.q(h)) + (self.k(h).sum(-1, keepdim=True) + self.v(h).sum(-1, keepdim=True))
        h = self.norm2(x)
        return x + self.down(self.gate(h) * self.up(h))


class Stack(nn.Module):
    def __init__(self, n: int, **dims) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(**dims) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


TINYLLAMA = dict(hidden=2048, inter=5632, kv=256)          # 88 MiB a block in bf16: 3 chunks
FOUR_TIMES = dict(hidden=4096, inter=11264, kv=512)        # 4x the bytes: 11 chunks


def _counted(monkeypatch, forward: dict, workers: Counter, ops: list) -> None:
    """Attribute the forward thread's calls to the runtime's hooks; count the workers' calls,
    the host→device copies and the new events (per thread)."""
    for name in ("bind", "release", "pass_start", "pass_end", "pass_failed"):
        original = getattr(runtime.Streamer, name)

        def hooked(self, *args, _original=original, _name=name):
            mode = forward.get("mode")
            if mode is None:
                return _original(self, *args)
            before = sum(mode.calls.values())
            _original(self, *args)
            forward[_name] = forward.get(_name, 0) + sum(mode.calls.values()) - before

        monkeypatch.setattr(runtime.Streamer, name, hooked)
    monkeypatch.setattr(pipeline.Workers, "around", staticmethod(lambda: Count(workers)))
    upload_many = cuda_mod.upload_many
    monkeypatch.setattr(cuda_mod, "upload_many", lambda pairs: ops.append(("h2d", len(pairs))) or upload_many(pairs))
    init = FakeEvent.__init__
    monkeypatch.setattr(FakeEvent, "__init__",
                        lambda self, *a, **k: ops.append(("event", threading.get_ident())) or init(self, *a, **k))


@pytest.mark.parametrize("codec", ["auto", "zstd"])
@pytest.mark.parametrize("dims, chunks", [(TINYLLAMA, 3), (FOUR_TIMES, 11)], ids=["tinyllama", "4x"])
def test_a_steady_state_unit_costs_the_forward_thread_a_fixed_handful_of_calls(dims, chunks, codec, monkeypatch):
    torch.manual_seed(0)
    model = Stack(3, **dims).to(torch.bfloat16).eval()
    x = torch.randn(1, 1, dims["hidden"], dtype=torch.bfloat16)
    resident = Counter()
    with torch.no_grad(), Count(resident):
        ref = model(x)
    forward, workers, ops = {}, Counter(), []
    _counted(monkeypatch, forward, workers, ops)
    fake = FakeCuda()
    backend = CudaBackend("cpu", cuda=fake)
    with vzstream.session(model, backend=backend, prefetch=1, workers=2, codec=codec) as s, torch.no_grad():
        assert s.config.codec == {"auto": "nibble", "zstd": "zstd"}[codec]      # "auto" on a CUDA backend
        stores = list(s.stores.values())
        assert [len(st.image.chunks) for st in stores] == [chunks] * 3
        for _ in range(8):            # trace; then the schedule runs until every (unit, slot) was seen
            assert torch.equal(s(x), ref)
        for ticket in list(s.member.runtime.tickets.values()):
            ticket.ready.wait()                           # the previous pass's prefetches issued
        forward.clear(), workers.clear(), ops.clear()
        start = len(fake.ops)
        streamed = Counter()
        forward["mode"] = Count(streamed)
        with forward["mode"]:
            out = s(x)
        s.member.runtime.pipeline.workers.shutdown()      # every worker's job counted
        during = fake.ops[start:]
    assert torch.equal(out, ref)
    units, mine = 3, threading.get_ident()
    # The forward thread: per unit, a bind and a release; besides, per pass, its start and end.
    want = EXPECTED[s.config.codec]
    per_unit = (forward["bind"] + forward["release"]) / units
    assert per_unit <= 12 and per_unit == want["forward"], (forward, streamed - resident)   # the budget, today's count
    assert forward["pass_start"] == forward["pass_end"] == forward["pass_failed"] == 0, forward
    assert streamed - resident == Counter(_set_grad_enabled=2, **want["forward_calls"])   # and nothing else
    assert [op for op in ops if op == ("event", mine)] == []          # no event made by the forward thread
    # The workers: per chunk (each <= 32 MiB of output) one copy (nibble: the chunk as stored) or
    # two (zstd: the low plane from the arena, the top plane from staging); no raw area (the
    # norms are bf16); zstd alone makes an event per fetch (`copied`, the staging gate's fence).
    assert [op for op in ops if op[0] == "h2d"] == [("h2d", want["copies"])] * units * chunks
    assert len([op for op in ops if op[0] == "event"]) == want["events"] * units
    per_chunk = {k: v / (units * chunks) for k, v in workers.items()}
    assert per_chunk == want["workers"], per_chunk
    syncs = [op for op in during if "synchronize" in op[1]]
    assert not [op for op in syncs if op[0] == mine]                   # the forward thread never waits
    assert bool(syncs) == (s.config.codec == "zstd")                   # workers: only zstd's staging gate
    assert image.CHUNK_NBYTES == 32 << 20


# Per codec: the forward thread's calls per unit (and which), the copies per chunk, the events the
# workers make per unit, and the workers' torch calls per chunk. nibble's are its copy, then the
# torch fallback's expansion (the CPU has no Triton device): 4 kernels (to, index_select, stack,
# _index_put_impl_) and the views and sizes around them; on CUDA with Triton, 1 or 2 launches
# replace the kernels. Events are not torch calls.
EXPECTED = {
    "nibble": dict(forward=0, forward_calls={}, copies=1, events=0,
                   workers={"copy_": 1, "__get__": 1, "numel": 2, "to": 1, "view": 4, "index_select": 1,
                            "__getitem__": 2, "stack": 1, "_index_put_impl_": 1}),
    "zstd": dict(forward=0, forward_calls={}, copies=2, events=1,             # the top plane sliced from staging,
                 workers={"numel": 1, "__getitem__": 1, "copy_": 2, "stack": 1}),   # one merge kernel
}
