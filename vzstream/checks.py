"""Checks at open: refuse, before anything is allocated, a model a session would give back
changed, or would fail on later with a raw torch error.

A streamed parameter is restored into a fresh dense tensor of its own, in the layout
`store.storage_order` packed it in; so every parameter must already be exactly that (a strided,
expanded or storage-sharing one would come back different; a tied one, one Parameter under two
names, is fine). A parameter with no data (meta, uninitialised lazy) cannot be packed, and a unit
module with no forward of its own (`nn.ModuleList`) never runs its hooks. Nothing is changed.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError, ModelTypeError, TraceError
from .store import storage_order

_SHOWN = 3          # offending names an error spells out


def check_module(model) -> None:
    """Raise `ModelTypeError` unless `model` is an `nn.Module`: hooks, parameters and the restore
    all work on modules, so a function or a pipeline object is refused before any option is read."""
    if not isinstance(model, nn.Module):
        hint = (" A Hugging Face pipeline holds its module as `.model`." if hasattr(model, "model") else "")
        raise ModelTypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}. Pass the module "
                             f"itself (e.g. from `AutoModelForCausalLM.from_pretrained(...)`).{hint}")


def check_model(model: nn.Module, units_spec, meta_ok: bool = False) -> None:
    """Raise `TraceError` (a parameter cannot be streamed and given back as it is) or
    `ConfigError` (`units` names modules whose hooks would never run); else return None.
    `meta_ok`: the weights come from a file (`fromfile` checks the meta tensors against it)."""
    check_module(model)
    _check_owner(model)
    lazy, meta, layout, storages = [], [], [], {}
    for fqn, p in model.named_parameters():         # a tied parameter comes once, under its first name
        if isinstance(p, nn.parameter.UninitializedTensorMixin):
            lazy.append(fqn)
        elif p.is_meta:
            meta.append(fqn)
        elif meta_ok:
            raise ConfigError(f"`weights` opens a model built on the meta device; `{fqn}` is on {p.device}. Build the "
                              f"model under `torch.device(\"meta\")`, or leave `weights` unset to stream its own weights.")
        else:
            problems = [x for x in (_layout_problem(p), _shared_problem(p, fqn, storages)) if x]
            if problems:
                layout.append(f"`{fqn}` ({'; '.join(problems)})")
    for fqn, b in model.named_buffers():            # buffers are moved to the device too
        if isinstance(b, nn.parameter.UninitializedTensorMixin):
            lazy.append(fqn)
        elif b.is_meta:
            meta.append(fqn)
    if lazy:
        raise TraceError(
            f"`model` has uninitialised parameters or buffers of a lazy module ({_names(lazy)}): they have no "
            f"shape or data to stream yet. Run one forward with a real input first (`model(x)`), then open the "
            f"session.")
    if meta and not meta_ok:
        raise TraceError(
            f"`model` has parameters or buffers on the meta device, with no data to stream ({_names(meta)}). "
            f"Load the weights first (e.g. `model.load_state_dict(state_dict, assign=True)`), then open the session.")
    _check_unit_modules(model, units_spec)
    if layout:
        raise TraceError(
            f"`model` has parameters whose memory a session would not give back as it found it: {_listed(layout)}. "
            f"A streamed parameter comes back dense, in a storage of its own. Before opening, give each one its "
            f"own dense copy: `p.data = p.data.clone(memory_format=torch.contiguous_format)`; to tie two "
            f"parameters, assign one nn.Parameter to both names.")


def _check_owner(model: nn.Module) -> None:
    """Refuse a model that accelerate already places (`device_map=`, `cpu_offload`): its hooks
    move weights in and out around every forward too, so both would own the same parameters."""
    hooked = [fqn or "(root)" for fqn, m in model.named_modules() if getattr(m, "_hf_hook", None) is not None]
    device_map = getattr(model, "hf_device_map", None)
    if hooked or (isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1):
        where = f"accelerate hooks on {_names(hooked)}" if hooked else f"`hf_device_map` {device_map!r}"
        raise TraceError(
            f"`model` is already placed by accelerate ({where}): its hooks and vzstream's would both move the "
            f"weights. Load it without `device_map=` (or call `accelerate.hooks.remove_hook_from_submodules(model)` "
            f"and move it to one device), then open the session: vzstream decides what lives on the device.")


def _layout_problem(p: torch.Tensor) -> str | None:
    """What is unusual about `p`'s memory, or None when it is a dense block filling its storage
    in the layout a restore gives back (contiguous, or a permutation of it: a transposed weight)."""
    shape, stride = tuple(p.shape), p.stride()
    expanded = [d for d, (n, s) in enumerate(zip(shape, stride)) if s == 0 and n > 1]
    if expanded:
        return (f"expanded: stride 0 in dim {expanded[0]}, {p.untyped_storage().nbytes() // p.element_size()} "
                f"stored elements read as {p.numel()}")
    restored = _restored_stride(p)
    if stride != restored:
        return f"strides {stride} for shape {shape}, would come back as {restored}"
    nbytes, own_nbytes = p.untyped_storage().nbytes(), p.numel() * p.element_size()
    if p.storage_offset() != 0 or nbytes != own_nbytes:
        return f"a view: its {own_nbytes} bytes start at element {p.storage_offset()} of a {nbytes}-byte storage"
    return None


def _restored_stride(p: torch.Tensor) -> tuple[int, ...]:
    """The strides `p` comes back with: packed in `storage_order`, decoded dense, un-permuted."""
    order = storage_order(p.detach())[1] or range(p.dim())
    stride, step = [0] * p.dim(), 1
    for d in reversed(list(order)):
        stride[d] = step
        step *= max(p.shape[d], 1)              # as torch.empty does for a size-0 dim
    return tuple(stride)


def _shared_problem(p: torch.Tensor, fqn: str, storages: dict) -> str | None:
    """Another (distinct) parameter already seen on `p`'s storage, or None; records `p`'s."""
    storage = p.untyped_storage()
    if storage.nbytes() == 0:                    # empty storages may all sit at address 0
        return None
    key = (p.device, storage.data_ptr())
    if key in storages:
        return f"shares its storage with `{storages[key]}`"
    storages[key] = fqn
    return None


def _check_unit_modules(model: nn.Module, units_spec) -> None:
    """A unit is fetched by hooks on its modules' forward; a module without a forward of its own
    (ModuleList, ModuleDict, ParameterList) is never called, so its weights would never arrive."""
    if units_spec == "blocks":
        return
    modules = dict(model.named_modules(remove_duplicate=False))
    if units_spec == "leaves":
        bad = [f for f, m in modules.items() if _no_forward(m) and any(v is not None for v in m._parameters.values())]
        if bad:
            raise ConfigError(
                f"`units='leaves'` would stream {_names(bad)}, which own parameters but have no forward of their "
                f"own: they are never called, so their weights would never be fetched. Use `units='blocks'`, or "
                f"list the modules whose forward uses those parameters.")
        return
    bad = [f for f in units_spec if f in modules and _no_forward(modules[f])]   # unknown names: find_units says
    if bad:
        first = modules[bad[0]]
        children = [repr(f"{bad[0]}.{name}") for name, _ in first.named_children()]
        more = ", ..." if len(children) > _SHOWN else ""
        instead = (f"its children (`units=[{', '.join(children[:_SHOWN])}{more}]`)" if children
                   else "the module whose forward uses its parameters")
        raise ConfigError(
            f"`units` names {_names(bad)}, a {type(first).__name__} with no forward of its own: it is never called, "
            f"so its hooks never run and its weights would never be fetched. List {instead} instead, "
            f"or use `units='blocks'`.")


def _no_forward(module: nn.Module) -> bool:
    return type(module).forward is nn.Module.forward and "forward" not in vars(module)


def _names(fqns: list[str]) -> str:
    return _listed([f"`{f}`" for f in fqns])


def _listed(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")
