"""`vzstream.save`: write a model packed once, as the safetensors shards and index that
docs/format.md specifies, for a session to open later without packing.

From an open session its stores are written as they are; from a module, each unit is packed as a
session would pack it (`store.pack_all`, with no unit kept raw for speed). `packhf.py` writes
through `write` too, packing a checkpoint unit by unit. Each arena and raw tensor goes to disk as
it comes and only its record stays: the extra host RAM a save holds is the unit or tensor being
written, never a shard (a shard's header, which comes first, is written once the shard is full).
The container is written here, not by safetensors' writer, which needs a file's tensors all at
once and cannot place the data 64-byte aligned; `packread.py` parses it with safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import packfile as pf
from .backends import CpuBackend
from .checks import check_model, check_module
from .codec import Codec
from .config import SessionConfig, available_cores, parse_nbytes
from .errors import ConfigError
from .store import Calibration, pack_all, pack_unit, storage_order
from .units import align, find_units


def save(source, path, *, codec: str | None = None, units=None, level: int | None = None,
         max_shard_nbytes=pf.MAX_SHARD_NBYTES) -> Path:
    """Write `source` (a `vzstream.session`, or an `nn.Module` with its weights) packed into the
    directory `path`: shards of at most `max_shard_nbytes` (a size: 1 GiB by default) and
    `vzstream.index.json`. `codec` ("zstd", the default, or "nibble"), `units` ("blocks") and
    `level` are fixed in the file; a session's are its own (a different value is a ConfigError),
    and an open one is saved from its stores as they are. Returns the path of the index."""
    from .session import Session, _open_models

    session = source if isinstance(source, Session) else None
    model = session.model if session is not None else source
    check_module(model)
    if session is None and model in _open_models:
        raise ConfigError("`source` has an open vzstream session, which holds its weights: save the session "
                          "(`vzstream.save(s, path)`), or the model once the session is closed.")
    cfg = file_config(codec, units, level, session)
    limit = shard_limit(max_shard_nbytes)
    if session is not None and session.is_open:
        with session.pool.gate.held(None):             # no call moves a unit while the save reads it
            return write(model, Path(path), cfg, *_session_parts(session, cfg), limit)
    check_model(model, cfg.units)                      # what a session would refuse to give back as found
    found = find_units(model, cfg.units)
    stores = pack_all([u for u in found if u.streamed], CpuBackend(), level=cfg.level, codec=cfg.codec, raw_fraction=0.0,
                      workers=1, threads=min(16, available_cores()), calibration=Calibration())
    raw_params = [(n, p.detach()) for u in found if not u.streamed for n, p in u.params]
    return write(model, Path(path), cfg, found, {u.index for u in found if u.streamed}, stores, raw_params, limit)


def shard_limit(max_shard_nbytes) -> int:
    """`max_shard_nbytes` (a size) in bytes, checked."""
    limit = parse_nbytes(max_shard_nbytes, "max_shard_nbytes")
    if limit < pf.DATA_ALIGNMENT:
        raise ConfigError(f"`max_shard_nbytes` must be at least {pf.DATA_ALIGNMENT} bytes; got {max_shard_nbytes!r}.")
    return limit


def file_config(codec, units, level, session=None) -> SessionConfig:
    """The codec, units and level of the file, checked as `session()` checks them."""
    given = {"codec": codec, "units": units, "level": level}
    if session is not None:
        ours = {name: getattr(session.config, name) for name in given}
        ours["codec"] = "zstd" if ours["codec"] == Codec.AUTO else ours["codec"].value   # AUTO: never opened
        for name, value in given.items():
            if value is not None and getattr(SessionConfig(device="cpu", **{name: value}), name) != ours[name]:
                raise ConfigError(f"`{name}` is fixed by the session being saved ({ours[name]!r}); got {value!r}. "
                                  f"Leave it out, or save the model once the session is closed.")
        given = ours
    cfg = SessionConfig(device="cpu", codec=given["codec"] or Codec.ZSTD, units=given["units"] or "blocks",
                        level=given["level"])
    if cfg.codec == Codec.AUTO:
        raise ConfigError("`codec` must be \"zstd\" or \"nibble\" for a file: a file fixes its codec, whatever device "
                          "opens it. \"zstd\" stores the least; \"nibble\" is what a GPU expands fastest.")
    return cfg


def _session_parts(session, cfg: SessionConfig) -> tuple:
    """An open session's units, those that stream by its `units` (the planner may keep some of them
    resident: they are packed here), their stores, and the resident parameters (on the device)."""
    found, packed, backend = session.units, set(session.member.needs.streamed), CpuBackend()
    stores = ((u, u.store if u.streamed else pack_unit(u, backend, cfg.level, True, cfg.codec))
              for u in found if u.index in packed)
    raw_params = [(n, p.detach()) for u in found if u.index not in packed for n, p in u.params]
    return found, packed, stores, raw_params


def write(model: nn.Module, directory: Path, cfg: SessionConfig, found, packed, stores, raw_params, limit,
          load=None) -> Path:
    """Write the file of `model` (its structure, buffers and config) into `directory`: the units
    `found` grouped by `cfg.units`, of which those whose index is in `packed` are stored packed,
    from `stores` ((unit, UnitStore) pairs, taken one at a time), and `raw_params` (name,
    tensor) stored raw. `load(name, t)` gives a raw tensor's values when it is written (default:
    `t`; on `meta` until then, it needs only its dtype and shape). Returns the index's path."""
    names, buffers = _names(model, found, packed)
    tensors = [t for _, t in raw_params + buffers] + [p for u in found for _, p in u.params]
    unsupported = sorted({str(t.dtype) for t in tensors if pf.dtype_name(t.dtype) is None})
    if unsupported:
        raise ConfigError(f"`model` has tensors of dtype {', '.join(unsupported)}, which a packed file cannot hold "
                          f"(it holds {', '.join(pf.DTYPES)}).")
    head = {"format": pf.FORMAT, "version": pf.VERSION, "writer": pf.writer(), "id": uuid.uuid4().hex, "model": {
        "codec": str(cfg.codec), "level": cfg.level, "alignment": CpuBackend.alignment,
        "units_spec": cfg.units if isinstance(cfg.units, str) else list(cfg.units), "config": _model_config(model),
        "units": [{"fqn": u.fqn, "params": [n for n, _ in u.params]} for u in found if u.index in packed],
        "resident": [n for n, _ in raw_params], "buffers": [n for n, _ in buffers], "names": names}}
    directory.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(directory, head, limit)
    try:
        for unit, store in stores:
            writer.add_unit(unit, store)
            del store                   # before the next is packed: a store written is not kept
        # Largest element first: each raw tensor then starts at a multiple of its element size.
        for name, t in sorted(raw_params + buffers, key=lambda r: -r[1].element_size()):
            writer.add_raw(name, t if load is None else load(name, t))
        return writer.finish()
    except BaseException:
        writer.discard()
        raise


def _names(model: nn.Module, found, packed) -> tuple[list, list]:
    """Every parameter and buffer name in `state_dict` order, as [name, the name it is stored
    under, whether `state_dict` holds it] (a tied tensor is stored once), and the buffers to
    store, each once, non-persistent ones included: a model on `meta` has no other source."""
    stored = {id(p): n for u in found for n, p in u.params}
    names, buffers = [], []
    for fqn, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{fqn}." if fqn else ""
        for n, p in mod._parameters.items():
            if p is not None:
                names.append([prefix + n, stored[id(p)], True])
        for n, b in mod._buffers.items():
            if b is not None:
                if id(b) not in stored:
                    stored[id(b)] = prefix + n
                    buffers.append((prefix + n, b.detach()))
                names.append([prefix + n, stored[id(b)], n not in mod._non_persistent_buffers_set])
    return names, buffers


def _model_config(model: nn.Module) -> dict | None:
    """The model's config.json as a dict (a Hugging Face `config`), or None."""
    config = getattr(model, "config", None)
    if callable(getattr(config, "to_dict", None)):
        return json.loads(json.dumps(config.to_dict(), default=str))
    if callable(getattr(config, "to_json_string", None)):
        return json.loads(config.to_json_string())
    return None


class _ShardWriter:
    """Appends each arena and raw tensor to the data file of the shard being filled, keeping only
    its record; once the shard is full, writes its header and then its data behind it."""

    def __init__(self, directory: Path, head: dict, limit: int) -> None:
        self.directory, self.head, self.limit = directory, head, limit
        self.written: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.data_path = directory / ".vzstream-data.partial"
        self._start()

    def _start(self) -> None:
        self.docs: dict = {"units": [], "raw": []}
        self.entries: dict = {}                  # safetensors header entries, by tensor name
        self.nbytes = 0                          # data offset of the next tensor in this shard
        self.data = open(self.data_path, "wb")

    def add_unit(self, unit, store) -> None:
        """Arenas come first in a shard: each starts 64-byte aligned, padded with zeros."""
        data = store.image.host
        stored = align(data.size, pf.DATA_ALIGNMENT)
        self._make_room(stored)
        self.docs["units"].append(pf.unit_doc(unit.fqn, [n for n, _ in unit.params], store, self.nbytes,
                                              zlib.crc32(data)))
        self._append(pf.ARENA_PREFIX + unit.fqn, "U8", [stored], data, stored - data.size)

    def add_raw(self, name: str, t: torch.Tensor) -> None:
        ordered, perm = storage_order(t)
        ordered = ordered.to("cpu").contiguous()        # a resident of an open session is on its device
        data = ordered.reshape(-1).view(torch.uint8).numpy()
        self._make_room(data.size)
        self.docs["raw"].append(pf.tensor_doc(name, ordered, perm, self.nbytes, zlib.crc32(data)))
        self._append(name, pf.DTYPES[pf.dtype_name(ordered.dtype)], list(ordered.shape), data, 0)

    def _make_room(self, nbytes: int) -> None:
        if self.nbytes and self.nbytes + nbytes > self.limit:
            self._flush()
            self._start()

    def _append(self, name: str, dtype: str, shape: list, data: np.ndarray, padding: int) -> None:
        self.data.write(memoryview(data))
        self.data.write(bytes(padding))
        self.entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [self.nbytes, self.nbytes + data.size + padding]}
        self.nbytes += data.size + padding

    def _flush(self) -> None:
        """Write the shard: its header (the records of everything in it), then its data."""
        index = len(self.written)
        doc = {**self.head, "shard": {"index": index, **self.docs}}
        path = self.directory / f".vzstream-{index + 1:05d}.partial"
        self.written.append(path)
        self.data.close()
        write_safetensors(path, {"__metadata__": {pf.METADATA_KEY: pf.seal(doc)}, **self.entries}, self.data_path)
        self.data_path.unlink()
        self.weight_map.update((name, index) for name in self.entries)

    def finish(self) -> Path:
        """Write the last shard, give every shard its final name, then the index."""
        if self.entries or not self.written:
            self._flush()
        else:
            self.data.close()
            self.data_path.unlink()
        n = len(self.written)
        names = [pf.shard_name(i, n) for i in range(n)]
        for i, path in enumerate(self.written):
            os.replace(path, self.directory / names[i])
            self.written[i] = self.directory / names[i]
        index = {"metadata": {"format": pf.FORMAT, "version": pf.VERSION, "writer": self.head["writer"],
                              "id": self.head["id"], "shards": names,
                              "total_size": sum(p.stat().st_size for p in self.written)},
                 "weight_map": {name: names[i] for name, i in self.weight_map.items()}}
        path = self.directory / pf.INDEX_NAME
        path.write_text(json.dumps(index, indent=2) + "\n")
        return path

    def discard(self) -> None:
        """A save that failed leaves no shard behind (a previous save's index stays as it was)."""
        self.data.close()
        for path in [*self.written, self.data_path]:
            path.unlink(missing_ok=True)


def write_safetensors(path: Path, header: dict, data_path: Path) -> None:
    """A safetensors file: the header JSON padded with spaces so that the data section starts at a
    multiple of DATA_ALIGNMENT, then the bytes of the file `data_path` (copied by the kernel where
    it can: no buffer of a shard's size)."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % pf.DATA_ALIGNMENT)
    with open(path, "wb") as out, open(data_path, "rb") as data:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        out.flush()
        try:
            while os.copy_file_range(data.fileno(), out.fileno(), 1 << 30):
                pass
        except (AttributeError, OSError):             # not Linux, or a filesystem that refuses it
            data.seek(0)
            out.seek(8 + len(text))
            out.truncate()
            shutil.copyfileobj(data, out, 16 << 20)
