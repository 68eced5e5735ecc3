"""The stand-in a streamed parameter is between uses: the same Parameter object, its class
swapped to one that refuses every use of its values with a `StreamedWeightError`.

Why a class swap: assigning `.data` strips a tensor subclass, so the stand-in cannot be a
subclass tensor placed in `.data`; swapping the Parameter's own `__class__` keeps its identity,
`isinstance(p, nn.Parameter)`, ties, and what optimizers or hooks hold. Its `.data` is a
zero-stride expand of one element, so metadata stays true: `shape`, `dtype`, `device`,
`requires_grad`, `numel()` (`model.device`, `model.dtype`, `num_parameters()` are right) cost
no memory. Anything that would read or write the values (`.sum()`, `.data`, `state_dict()`,
`add_`, `.half()`, `deepcopy`) raises instead of computing on the placeholder. The swaps cost
~0.15 µs per parameter per bind and release (measured, docs/reliability.md).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import StreamedWeightError

# Metadata a stand-in answers truthfully (tensor properties are getset descriptors: their
# `__get__` reaches `__torch_function__`); everything else refuses.
_TRUE_ATTRS = frozenset({"shape", "dtype", "device", "requires_grad", "is_leaf", "grad", "grad_fn", "ndim",
                         "layout", "is_cuda", "is_meta", "is_cpu", "is_sparse", "is_quantized", "is_mkldnn",
                         "is_nested", "names", "itemsize"})
_TRUE_METHODS = frozenset({"size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
                           "get_device", "requires_grad_", "__hash__", "__format__"})

refusals = 0                         # uses refused so far: a runtime seeing it move undoes partial edits
_names: dict[int, str] = {}          # id(param) -> its name in the model, while a session streams it
_scalars: dict[tuple, torch.Tensor] = {}
_classes: dict[type, type] = {}      # Parameter class -> its stand-in class
_bases: dict[type, type] = {}        # stand-in class -> the Parameter class it stands in for


class _Refusing:
    """Mixed in before a Parameter class: the stand-in's behaviour."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__"):          # a property: which one is the descriptor's name
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            allowed = prop in _TRUE_ATTRS and (name == "__get__" or prop == "requires_grad")
            name = f"{'' if name == '__get__' else 'assigning '}.{prop}"
        else:
            allowed = name in _TRUE_METHODS
        if allowed:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        if name in ("__repr__", "__format__"):
            p = args[0]
            return f"StreamedParameter({_names.get(id(p), '?')}, shape={tuple(p.shape)}, dtype={p.dtype}: streamed by vzstream)"
        global refusals
        refusals += 1
        raise StreamedWeightError(_message(args, name))

    def __reduce_ex__(self, protocol):
        raise StreamedWeightError(_message((self,), "copy/pickle"))

    def __deepcopy__(self, memo):
        raise StreamedWeightError(_message((self,), "copy.deepcopy"))


def _message(args, what: str) -> str:
    p = next((a for a in args if isinstance(a, _Refusing)), None)
    name = _names.get(id(p), "a parameter") if p is not None else "a parameter"
    return (f"`{name}` is streamed by vzstream: its values exist only inside its module's forward, so "
            f"`{what.lstrip('.')}` cannot use it here (it would read a placeholder). Read, copy, save "
            f"(`state_dict()`), convert (`.half()`, `.to()`) or edit the model before the session opens or after "
            f"it closes; inside a session, run it (`s(...)`, `s.generate(...)`, or `model(...)` under no_grad).")


def stand_in(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `shape` that stores one element: what a parked parameter's `.data` is."""
    key = (dtype, device)
    if key not in _scalars:
        _scalars[key] = torch.zeros((), dtype=dtype, device=device)
    return _scalars[key].expand(shape)


def refusing_class(cls: type) -> type:
    if cls not in _classes:
        _classes[cls] = type(f"Streamed{cls.__name__}", (_Refusing, cls), {})
        _bases[_classes[cls]] = cls
    return _classes[cls]


def adopt(p: nn.Parameter, name: str, device: torch.device) -> tuple:
    """`p` streams from now on: park it, and return what binding and parking it takes, made
    once (`(stand-in tensor, its own class, its refusing class)`: reading `p`'s shape or dtype
    per bind would cost a torch call each)."""
    _names[id(p)] = name
    cls = _bases.get(type(p), type(p))
    entry = (stand_in(p.shape, p.dtype, device), cls, refusing_class(cls))
    park(p, entry)
    return entry


def disown(p: nn.Parameter) -> None:
    """`p` is back for good: a plain Parameter again, whose `.data` may be assigned."""
    _names.pop(id(p), None)
    p.__class__ = _bases.get(type(p), type(p))


def name_it(p: nn.Parameter, name: str) -> None:
    """What the errors call `p` (a stand-in left after a failed restore)."""
    _names[id(p)] = name


def park(p: nn.Parameter, entry: tuple) -> None:
    """`p` between uses: as its own class (a unit whose bind failed is released still parked),
    `.data` first (a stand-in refuses assignment), then the refusing class."""
    stand, cls, refusing = entry
    p.__class__ = cls
    p.data = stand
    p.__class__ = refusing

