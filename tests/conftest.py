"""Shared fixtures: the `cuda` marker, model snapshots (residue checks), slot accounting, and
cached resident references for the tiny Hugging Face models.

Toy models and HF builders live in `tests/models.py` (import them as `from models import ...`).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from models import build_hf, hf_inputs
from torch import nn

# -- markers ----------------------------------------------------------------------------------


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests skip without a GPU (never an inline `return`)."""
    if torch.cuda.is_available():      # asks the driver; does not initialise CUDA
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:   # not `in item.keywords`: ids match too
            item.add_marker(skip)


# -- the codec "auto" stands for -----------------------------------------------------------------
# `VZSTREAM_TEST_CODEC=nibble pytest tests/` runs the whole suite with every session that leaves
# `codec` at its default ("auto", zstd on the CPU) packing wire images instead: the CPU backend
# then expands them as the GPU would. Tests that name a codec keep it.

_TEST_CODEC = os.environ.get("VZSTREAM_TEST_CODEC")


@pytest.fixture(autouse=True)
def _auto_codec(monkeypatch):
    if _TEST_CODEC:
        from vzstream.codec import Codec

        resolve = Codec.resolve
        monkeypatch.setattr(Codec, "resolve", lambda self, backend: Codec(_TEST_CODEC) if self is Codec.AUTO
                            else resolve(self, backend))
    yield


# -- residue checks ---------------------------------------------------------------------------

_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_always_called", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of `t`: comparing these tells -0.0 from 0.0 and compares NaN payloads."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _meta(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, tuple(t.shape), t.stride(), t.requires_grad)


class ModelSnapshot:
    """Everything a session must leave as it found it: values (bit for bit), devices, dtypes,
    strides, requires_grad, parameter identity (optimisers hold references), tied weights, hooks,
    and the key set of every module's `__dict__`."""

    def __init__(self, model: nn.Module) -> None:
        self.values = {k: (_meta(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
        self.modules = {}
        for fqn, mod in model.named_modules(remove_duplicate=False):
            self.modules[fqn] = dict(
                dict_keys=set(mod.__dict__),
                params={n: (id(p), _meta(p)) if p is not None else None for n, p in mod._parameters.items()},
                buffers={n: _meta(b) if b is not None else None for n, b in mod._buffers.items()},
                hooks={name: dict(getattr(mod, name)) for name in _HOOK_DICTS},
            )
        self.global_hooks = {name: dict(getattr(nn.modules.module, name)) for name in _GLOBAL_HOOKS}

    def check(self, model: nn.Module, skip: tuple[str, ...] = ()) -> None:
        """Assert `model` is as snapshotted. `skip`: state-dict keys not to compare."""
        state = model.state_dict(keep_vars=True)
        assert set(state) == set(self.values)
        for key, (meta, before) in self.values.items():
            if key in skip:
                continue
            after = state[key]
            assert _meta(after) == meta, f"{key}: device, dtype, shape, stride or requires_grad changed"
            assert torch.equal(tensor_bytes(after), tensor_bytes(before)), f"{key} changed value"
        now = dict(model.named_modules(remove_duplicate=False))
        assert list(now) == list(self.modules)
        for fqn, seen in self.modules.items():
            mod = now[fqn]
            assert set(mod.__dict__) == seen["dict_keys"], f"module `{fqn}`: __dict__ keys changed"
            for name, hooks in seen["hooks"].items():
                assert dict(getattr(mod, name)) == hooks, f"module `{fqn}`: {name} changed"
            for n, p in mod._parameters.items():
                if f"{fqn}.{n}".lstrip(".") not in skip:       # a skipped one may be a stand-in
                    now_p = (id(p), _meta(p)) if p is not None else None
                    assert now_p == seen["params"][n], f"parameter `{fqn}.{n}` identity or metadata changed"
            buffers = {n: _meta(b) if b is not None else None for n, b in mod._buffers.items()}
            assert buffers == seen["buffers"], f"module `{fqn}`: buffers changed"
        for name, hooks in self.global_hooks.items():
            assert dict(getattr(nn.modules.module, name)) == hooks, f"global {name} changed"


@pytest.fixture
def snapshot():
    """`snap = snapshot(model)` before a session; `snap.check(model)` after it."""
    return ModelSnapshot


def check_slots(s) -> None:
    """Every device slot is in exactly one place: the free list, an in-flight ticket, or a held
    unit. Call between passes (held is empty then: every unit was released at its last use)."""
    streamer = s.member.runtime
    pool = streamer.ring
    owners = ([slot.index for slot in pool.free]
              + [pool.own[key].index for key in pool.own_free]
              + [t.slot.index for t in streamer.tickets.values()]
              + [entry[0].slot.index for entry in streamer.held.values()])
    dedicated = [-1 - i for i in range(len(pool.own))]     # an outsized unit's own slot
    assert sorted(owners) == sorted(dedicated + list(range(len(pool.slots)))), "a slot leaked or is owned twice"
    assert not streamer.held, "a unit is still held between passes"
    assert not streamer.in_pass


@pytest.fixture
def slots_ok():
    """`slots_ok(s)`: assert the session's slot pool is fully accounted for (see `check_slots`)."""
    return check_slots


@pytest.fixture(params=["inline", "workers"])
def decode_path(request, monkeypatch):
    """Run the test twice: every unit decoded inline on the forward thread at bind, and every
    unit decoded ahead by the worker threads (whatever the pipeline's size threshold is)."""
    from vzstream.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "inline_nbytes", 1 << 62 if request.param == "inline" else 0)
    return request.param


@pytest.fixture
def open_models():
    """The session module's registry of models with an open session."""
    return sys.modules["vzstream.session"]._open_models


# -- resident references ----------------------------------------------------------------------

_HF_REFERENCE: dict = {}


@pytest.fixture(scope="session")
def hf_reference():
    """`hf_reference(name)` -> (logits of one forward, tokens of one greedy generate), computed
    once per model from a fresh seeded model run fully resident."""

    def get(name: str):
        if name not in _HF_REFERENCE:
            model = build_hf(name)
            ids, gen_kwargs = hf_inputs()
            with torch.no_grad():
                logits = model(ids).logits
                tokens = model.generate(ids, **gen_kwargs)
            _HF_REFERENCE[name] = (logits, tokens)
        return _HF_REFERENCE[name]

    return get
