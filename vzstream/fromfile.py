"""Opening a session from a packed file (`session(meta_model, weights=path)`, `vzstream.load`).

The model is built on `meta`: it has the structure and no data, and `.data` cannot move a
tensor between `meta` and a real device. So at open each meta Parameter is replaced, once (a
tied one keeps one object for all its names), by a real one whose `.data` is a stand-in of its
shape (no memory); each meta buffer by its values from the file. Streamed units get their
stores straight from the file (arenas read into the backend's host memory, crc32-checked);
resident ones are decoded onto the device unit by unit. The uncompressed model never exists
in host RAM. At close the meta tensors go back, unless `materialize=True` (then the weights
are decoded into the new parameters, on the CPU, and stay).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .codec import Codec
from .errors import ConfigError, FormatError
from .standin import stand_in
from .store import unpermute

CPU = torch.device("cpu")


def open_weights(cfg):
    """(the `PackedModel` at `cfg.weights`, `cfg` with the file's codec and units), or (None,
    cfg) without `weights`. A codec or `units` other than the file's is a ConfigError."""
    if cfg.weights is None:
        return None, cfg
    from .packread import open_packed

    packed = open_packed(cfg.weights)
    codec = Codec(packed.codec)
    if cfg.codec not in (Codec.AUTO, codec):
        raise ConfigError(f"`codec` {cfg.codec.value!r} conflicts with the file, packed with {codec.value!r}: a file "
                          f"fixes its codec. Leave `codec` unset, or pack the model again with the codec you want.")
    units = tuple(packed.units_spec) if isinstance(packed.units_spec, list) else packed.units_spec
    if cfg.units not in ("blocks", units):       # "blocks" is also the default: the file's grouping wins
        raise ConfigError(f"`units` {cfg.units!r} conflicts with the file, grouped as {units!r}: a file fixes its "
                          f"units. Leave `units` unset, or pack the model again grouped as you want.")
    return packed, dataclasses.replace(cfg, codec=codec, units=units)


def swap_in(model: nn.Module, packed) -> list:
    """Replace `model`'s meta parameters and buffers (checked against the file: names, shapes,
    dtypes, ties) with real ones; returns what to put back, [(module, "p"|"b", name, meta)]."""
    _check_matches(model, packed)
    stored = {name: s for name, (s, _) in packed.names.items()}
    new: dict[int, torch.Tensor] = {}
    swapped = []
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(stand_in(p.shape, p.dtype, CPU), requires_grad=p.requires_grad)
                mod._parameters[name] = new[id(p)]
                swapped.append((mod, "p", name, p))
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                if id(b) not in new:
                    new[id(b)] = packed.read_raw(stored[_join(prefix, name)])
                mod._buffers[name] = new[id(b)]
                swapped.append((mod, "b", name, b))
    return swapped


def put_back(swapped: list) -> None:
    """The meta tensors back where `swap_in` found them."""
    for mod, kind, name, meta in reversed(swapped):
        (mod._parameters if kind == "p" else mod._buffers)[name] = meta


def fill(unit, packed) -> None:
    """A resident unit's parameters get their values on the CPU: decoded from its image, or
    read raw (a unit that never streams, such as the embeddings, is stored raw)."""
    if unit.fqn not in packed.unit_names:
        for name, p in unit.params:
            p.data = packed.read_raw(name)
        return
    rec = packed.unit(unit.fqn)
    _, images = packed.unit_image(rec)
    for (_, p), t, image in zip(unit.params, rec.tensors, images):
        p.data = unpermute(image.decode(), t.perm)


def store(unit, packed, backend, pack, checksums: bool):
    """A streamed unit's store: its image as the file holds it (arena read into the backend's
    host memory, crc32-checked), or, for a unit the file stores raw (one a budget streams that
    never streams by default, such as the embeddings), packed here from its values (`pack`)."""
    if unit.fqn in packed.unit_names:
        return packed.unit_store(unit, backend, checksums=checksums)
    fill(unit, packed)
    return pack(unit)


def check_units(units: list, packed) -> None:
    """The model's streamable units are the file's, in order."""
    mine, theirs = [u.fqn for u in units if u.streamed], [u.fqn for u in packed.units]
    if mine != theirs:
        diff = next((f"{a!r} vs {b!r}" for a, b in zip(mine, theirs) if a != b), f"{len(mine)} vs {len(theirs)} units")
        raise FormatError(f"the model's units differ from the file's (first: {diff}): build the model from the same "
                          f"config the file was packed from")


def _check_matches(model: nn.Module, packed) -> None:
    """Names, shapes, dtypes and ties of `model` against the file: FormatError listing the first
    differences. A buffer takes the file's dtype (it is what the saved model held: a rotary
    `inv_freq` is fp32 or not depending on how the model was cast, not on its weights)."""
    shapes = {t.name: (tuple(t.shape), t.dtype) for u in packed.units for t in u.tensors}
    shapes.update({name: (tuple(r.shape), r.dtype) for name, r in packed.raw.items()})
    mine = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    mine.update(buffers)
    diffs = [f"`{n}` is not in the file" for n in mine if n not in packed.names]
    diffs += [f"`{n}` is in the file, not in the model" for n in packed.names if n not in mine]
    first_of: dict[int, str] = {}
    for name, t in mine.items():
        if name not in packed.names:
            continue
        stored = packed.names[name][0]
        want = shapes[stored]
        if (tuple(t.shape), t.dtype) != want and not (name in buffers and tuple(t.shape) == want[0]):
            diffs.append(f"`{name}` is {tuple(t.shape)} {t.dtype} in the model, {want[0]} {want[1]} in the file")
        if not t.is_meta:
            diffs.append(f"`{name}` is on {t.device}, not meta")
        first = first_of.setdefault(id(t), stored)
        if first != stored:
            diffs.append(f"`{name}` is tied in the model and not in the file (or the other way)")
    if diffs:
        raise FormatError(f"the model does not match the file `{packed.files[0]}`: {'; '.join(diffs[:5])}"
                          f"{f' (and {len(diffs) - 5} more)' if len(diffs) > 5 else ''}. Build the model on meta from "
                          f"the config it was packed from, in the dtype it was packed in.")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def load(path, **options):
    """`vzstream.load(path, device=..., **options)`: the Hugging Face causal LM packed at `path`,
    built on `meta` from its stored config, as an open session (`s.model`, `s.generate`);
    `with vzstream.load(path) as s:` closes it."""
    from .packread import open_packed
    from .session import session

    s = session(meta_model(open_packed(path)), weights=path, **options)
    s.open()
    return s


def meta_model(packed):
    """The Hugging Face causal LM a packed file holds, built on `meta` from its stored config,
    in the dtype of its weights."""
    path = packed.files[0].parent
    if not packed.config:
        raise ConfigError(f"`{path}` holds no model config (it was saved from a model without `config`): build the "
                          f"model on meta yourself and open `vzstream.session(model, weights=path)`.")
    try:
        import transformers as tf
    except ImportError as exc:
        from .errors import MissingDependencyError

        raise MissingDependencyError("`vzstream.load` builds the model with transformers: `pip install "
                                     "vzstream[hf]`") from exc
    values = dict(packed.config)
    config = tf.AutoConfig.for_model(values.pop("model_type"), **values)
    dtype = next(iter(packed.units), None)
    dtype = dtype.tensors[0].dtype if dtype is not None else torch.get_default_dtype()
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
