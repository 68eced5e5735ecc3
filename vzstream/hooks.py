"""Install and remove hooks; bind and release parameters.

Hooks are registered through `register_forward_pre_hook` / `register_forward_hook` handles
only: no rewritten `forward`, nothing written onto user modules. Removing the handles leaves
the modules exactly as they were.

Between uses a streamed parameter is a *stand-in* (`standin.py`): the same Parameter, with
its true shape and dtype on the session's device, that raises `StreamedWeightError` when its
values are used outside its module's forward; never another unit's bytes in a reused slot.
The hooks themselves refuse to be copied or pickled, so `copy.deepcopy(model)` inside a session
says why instead of failing on a lock.
"""

from __future__ import annotations

from torch import nn

from .errors import StreamedWeightError


def bind_params(params: list[tuple[str, nn.Parameter]], views: list, stand_ins: list) -> None:
    """Point each parameter at its view of the slot (`standin.park` undone, inlined: this runs per
    parameter per unit per pass)."""
    for (_, p), view, (_, cls, _) in zip(params, views, stand_ins):
        p.__class__ = cls
        p.data = view


def unbind_params(params: list[tuple[str, nn.Parameter]], stand_ins: list) -> None:
    """Make each parameter its stand-in again (`standin.park`, inlined; `stand_ins` from
    `standin.adopt`, made at install)."""
    for (_, p), (stand, cls, refusing) in zip(params, stand_ins):
        p.__class__ = cls
        p.data = stand
        p.__class__ = refusing


class _Hook:
    """A hook calling `fn(*args)`, whatever torch passes it, and returning None (a value would
    replace the module's input or output)."""

    __slots__ = ("fn", "args")

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __call__(self, *_) -> None:
        self.fn(*self.args)

    def __reduce_ex__(self, protocol):
        raise StreamedWeightError(
            "a model inside a vzstream session cannot be copied or pickled (`copy.deepcopy`, `torch.save(model)`): "
            "its streamed weights are not in it, and its hooks hold the session's threads. Copy or save the model "
            "before the session opens or after it closes (`vzstream.restore(model)` recovers one whose session "
            "was lost).")


def install(model: nn.Module, units, streamer) -> list:
    """Pass hooks on the root and bind/release hooks on every module of every streamed unit.

    The pass-start hook is prepended and the pass-end hook registered last, so when the root
    is itself a unit module its bind happens inside the pass and its release before the end.
    """
    handles = [model.register_forward_pre_hook(_Hook(streamer.pass_start), prepend=True)]
    for unit in units:
        if not unit.streamed:
            continue
        for mod in unit.modules:
            handles.append(mod.register_forward_pre_hook(_Hook(streamer.bind, unit.index)))
            # always_call: release even when the module's forward raises
            handles.append(mod.register_forward_hook(_Hook(streamer.release, unit.index), always_call=True))
    # A plain hook ends a pass that returned; torch calls only always_call hooks when the
    # forward raised, so the second one sees the pass still open exactly when it failed.
    handles.append(model.register_forward_hook(_Hook(streamer.pass_end)))
    handles.append(model.register_forward_hook(_Hook(streamer.pass_failed), always_call=True))
    return handles


def remove(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
