"""`pack_checkpoint` (`python -m vzstream pack`): a Hugging Face safetensors checkpoint packed
into the file `vzstream.save` writes, without the model ever existing in host RAM.

The model is built on `meta` from config.json, as `from_pretrained` builds it (same class, same
dtype), to find the units as a session would. Then each unit's tensors are read from the
checkpoint, cast to the model's dtype, packed and written before the next unit's are read; the
resident parameters follow one at a time. Buffers are made as `from_pretrained` makes them:
non-persistent ones (rotary `inv_freq`) by the model's own `initialize_weights` (on meta
parameters that is a no-op), persistent ones from the checkpoint. The file holds the same
tensors and metadata as `vzstream.save(AutoModelForCausalLM.from_pretrained(src), ...)`.

Memory: safetensors maps a file and hands out views of it, and every page read stays in RSS
while the mapping lives; so each unit opens the files it needs and lets them go with its
tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from . import packfile as pf
from .backends import CpuBackend
from .checks import check_model
from .errors import ConfigError, FormatError, MissingDependencyError
from .packwrite import file_config, shard_limit, write
from .store import pack_unit
from .units import find_units

HF_INDEX_NAME = "model.safetensors.index.json"


def pack_checkpoint(src, out, *, dtype: torch.dtype | None = None, codec: str = "zstd", units="blocks",
                    level: int | None = None, max_shard_nbytes=pf.MAX_SHARD_NBYTES, progress=None) -> Path:
    """Pack the Hugging Face model directory `src` (config.json and `*.safetensors`, sharded or
    not) into the directory `out`; returns the index's path. `dtype`: cast every floating weight
    (default: the dtype `from_pretrained` would load, config.json's). `codec`, `units`, `level`,
    `max_shard_nbytes` as for `vzstream.save`. `progress(done_nbytes, total_nbytes, units_done,
    num_units)` is called once before the first unit is read, then after each unit or tensor written."""
    cfg = file_config(codec, units, level)
    limit = shard_limit(max_shard_nbytes)
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"`OUT` {str(out)!r} is a file; a packed model is a directory (shards and its index). "
                          f"Pass a new or existing directory.")
    checkpoint = Checkpoint(Path(src))
    model = build_meta_model(Path(src), dtype, checkpoint)
    check_model(model, cfg.units, meta_ok=True)            # what a session would refuse
    found = find_units(model, cfg.units)
    fill_buffers(model, checkpoint)
    streamed = [u for u in found if u.streamed]
    raw_params = [(n, p) for u in found if not u.streamed for n, p in u.params]
    tally = _Tally(progress, sum(u.raw_nbytes for u in found), len(streamed))
    tally.add(0)                            # the clock of a progress bar starts here, not at import

    def stores():
        for unit in streamed:
            loaded = dataclasses.replace(unit, params=checkpoint.read(model, unit.params))
            store = pack_unit(loaded, CpuBackend(), cfg.level, True, cfg.codec)
            store.unit = unit               # the meta unit: the tensors read go now, before the arena is written
            del loaded
            yield unit, store
            del store                       # before the next unit is read: one unit in RAM at a time
            tally.add(unit.raw_nbytes, units=1)

    def load(name: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_meta:                   # a buffer, made above
            return t
        (_, value), = checkpoint.read(model, [(name, t)])
        tally.add(value.numel() * value.element_size())
        return value

    return write(model, Path(out), cfg, found, {u.index for u in streamed}, stores(), raw_params, limit, load)


class Checkpoint:
    """The tensors of a Hugging Face safetensors checkpoint, by name, read on demand."""

    def __init__(self, directory: Path) -> None:
        if not directory.is_dir():
            raise ConfigError(f"`SRC_DIR` {str(directory)!r}: no such directory. Pass a local Hugging Face model "
                              f"directory (config.json and *.safetensors, as `save_pretrained` writes it).")
        if not (directory / "config.json").is_file():
            raise ConfigError(f"`SRC_DIR` {str(directory)!r} has no config.json, so it is not a Hugging Face model "
                              f"directory; pass the directory `save_pretrained` wrote.")
        self.directory = directory
        self.file_of = self._index()            # tensor name -> its file

    def _index(self) -> dict[str, Path]:
        index = self.directory / HF_INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                return {name: self.directory / file for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError) as exc:
                raise FormatError(f"`{index}` is not a valid safetensors index ({type(exc).__name__}: {exc})") from None
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"`SRC_DIR` {str(self.directory)!r} has no *.safetensors weights (only safetensors "
                              f"checkpoints are packed); save the model with `save_pretrained(dir)`, which writes them.")
        return {name: file for file in files for name in _open(file).keys()}

    def first_float_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating tensor of the first file: what `from_pretrained` loads a
        checkpoint in when config.json names none."""
        first = min(self.file_of.values())
        with _open(first) as f:
            for name in f.keys():
                dtype = _DTYPES.get(f.get_slice(name).get_dtype())
                if dtype is not None and dtype.is_floating_point:
                    return dtype
        return None

    def read(self, model: nn.Module, params: list) -> list[tuple[str, torch.Tensor]]:
        """(name, value) for each (name, meta tensor) of `model` in `params`, read from the
        checkpoint under the name or, for a tied tensor, any other name of it, checked for shape
        and cast to the model's dtype. Each file is opened only for this read (see the module doc)."""
        aliases = _aliases(model)
        keys = [next((k for k in aliases.get(id(t), [name]) if k in self.file_of), None) for name, t in params]
        missing = [name for (name, _), key in zip(params, keys) if key is None]
        if missing:
            raise FormatError(f"the checkpoint in {str(self.directory)!r} has no tensor {missing[:3]} that the model "
                              f"built from its config.json has: the weights do not belong to this config.json")
        out = []
        with contextlib.ExitStack() as stack:   # a file's mapping then lives on with the tensors read, no longer
            handles = {}
            for (name, t), key in zip(params, keys):
                file = self.file_of[key]
                if file not in handles:
                    handles[file] = stack.enter_context(_open(file))
                value = handles[file].get_tensor(key)
                if value.shape != t.shape:
                    raise FormatError(f"checkpoint tensor `{key}` has shape {tuple(value.shape)}; the model built from "
                                      f"config.json has {tuple(t.shape)} for `{name}`: the weights do not belong to it")
                out.append((name, value.to(t.dtype)))
        return out


def build_meta_model(directory: Path, dtype: torch.dtype | None, checkpoint: Checkpoint) -> nn.Module:
    """The model `from_pretrained(directory, dtype=dtype or "auto")` would load, on `meta`:
    the class config.json names (else a causal LM, else a base model), ties made."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError("packing a Hugging Face checkpoint needs `transformers`: "
                                     "`pip install vzstream[hf]`") from exc
    config = transformers.AutoConfig.from_pretrained(directory)
    dtype = dtype or getattr(config, "dtype", None) or checkpoint.first_float_dtype() or torch.get_default_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    names = getattr(config, "architectures", None) or []
    known = [getattr(transformers, n) for n in names if isinstance(getattr(transformers, n, None), type)]
    with torch.device("meta"):
        if known:                           # the head class it was saved from (the Auto classes map to it too)
            return known[0]._from_config(config, dtype=dtype).eval()
        try:
            return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        except ValueError:                  # not a causal LM: an encoder, say
            return transformers.AutoModel.from_config(config, dtype=dtype).eval()


def fill_buffers(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Give `model`'s meta buffers their values as `from_pretrained` does: empty on the CPU, then
    the model's `initialize_weights` (which computes the non-persistent ones; it leaves the meta
    parameters alone), then each persistent one the checkpoint holds."""
    persistent = []
    for fqn, mod in model.named_modules():
        for name, b in mod._buffers.items():
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.empty_like(b, device="cpu")
                if name not in mod._non_persistent_buffers_set:
                    persistent.append((mod, name, f"{fqn}.{name}" if fqn else name))
    if callable(getattr(model, "initialize_weights", None)):
        model.initialize_weights()
    stored = [(mod, name, fqn) for mod, name, fqn in persistent if fqn in checkpoint.file_of]
    values = checkpoint.read(model, [(fqn, mod._buffers[name]) for mod, name, fqn in stored])
    for (mod, name, _), (_, value) in zip(stored, values):
        mod._buffers[name] = value.clone()      # its own memory: not a view keeping a file mapped


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter and buffer, by id (a tied weight has several)."""
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(name)
    return names


def _open(file: Path):
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise MissingDependencyError("packing a checkpoint needs `safetensors`: `pip install vzstream[hf]`") from exc
    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:                # safetensors' own errors, and a file the index names but lacks
        raise FormatError(f"`{file}` is not a readable safetensors file ({type(exc).__name__}: {exc})") from None


_DTYPES = {code: getattr(torch, name) for name, code in pf.DTYPES.items()}


class _Tally:
    """Bytes and units written so far, for `progress`."""

    def __init__(self, progress, total_nbytes: int, num_units: int) -> None:
        self.progress, self.total_nbytes, self.num_units = progress, total_nbytes, num_units
        self.done_nbytes = self.units_done = 0

    def add(self, nbytes: int, units: int = 0) -> None:
        self.done_nbytes += nbytes
        self.units_done += units
        if self.progress is not None:
            self.progress(self.done_nbytes, self.total_nbytes, self.units_done, self.num_units)

