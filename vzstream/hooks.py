"""Install and remove hooks; bind and release parameters.

Hooks are registered through `register_forward_pre_hook` / `register_forward_hook` handles
only: no rewritten `forward`, nothing written onto user modules. Removing the handles leaves
the modules exactly as they were.

Between uses a streamed parameter points at an *empty* tensor of its dtype on the session's
device, never at another unit's bytes in a reused slot. Reading it outside its module's forward
is not supported: a use that needs its shape fails, but a reduction of the empty tensor (say
`.sum()`) quietly gives 0 (docs/guide.md, "Known limits").
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

_placeholders: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    if key not in _placeholders:
        _placeholders[key] = torch.empty(0, dtype=dtype, device=device)
    return _placeholders[key]


def bind_params(params: list[tuple[str, nn.Parameter]], views: list[torch.Tensor]) -> None:
    """Point each parameter at its view of the slot."""
    for (_, p), view in zip(params, views):
        p.data = view


def unbind_params(params: list[tuple[str, nn.Parameter]], empties: list[torch.Tensor]) -> None:
    """Point each parameter back at its placeholder (`empties`, made at install: reading a
    parameter's dtype or device here would cost a torch call each, per unit, per pass)."""
    for (_, p), empty in zip(params, empties):
        p.data = empty


def install(model: nn.Module, units, streamer) -> list:
    """Pass hooks on the root and bind/release hooks on every module of every streamed unit.

    The pass-start hook is prepended and the pass-end hook registered last, so when the root
    is itself a unit module its bind happens inside the pass and its release before the end.
    """
    handles = [model.register_forward_pre_hook(lambda *_: streamer.pass_start(), prepend=True)]
    for unit in units:
        if not unit.streamed:
            continue
        for mod in unit.modules:
            handles.append(mod.register_forward_pre_hook(partial(_pre, streamer, unit.index)))
            # always_call: release even when the module's forward raises
            handles.append(mod.register_forward_hook(partial(_post, streamer, unit.index), always_call=True))
    # A plain hook ends a pass that returned; torch calls only always_call hooks when the
    # forward raised, so the second one sees the pass still open exactly when it failed.
    handles.append(model.register_forward_hook(lambda *_: streamer.pass_end()))
    handles.append(model.register_forward_hook(lambda *_: streamer.pass_failed(), always_call=True))
    return handles


def _pre(streamer, unit: int, module, args) -> None:
    streamer.bind(unit)


def _post(streamer, unit: int, module, args, output) -> None:
    streamer.release(unit)


def remove(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
