"""`vzstream.open_packed`: read what `vzstream.save` wrote (docs/format.md).

Opening parses every shard's header with safetensors (its errors become FormatError), checks
each shard's metadata (version, checksum) and that the shards make up one whole save: every unit
and tensor the metadata names is found exactly once. Nothing else is read then: a unit's arena
is read when asked for (into a buffer from `alloc`, e.g. a backend's pinned `host_buffer`, or
mapped), and checked against its crc32 before anything can use it; each tensor decoded is
checked against the crc32 of its values.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from . import codec
from . import packfile as pf
from .errors import ConfigError, FormatError, MissingDependencyError
from .image import Image, ImageTensor
from .store import UnitStore, piece_crcs, unpermute
from .units import align, unit_nbytes


def open_packed(path) -> "PackedModel":
    """The packed model at `path`: the directory `vzstream.save` wrote, its index, or one shard
    (a save that made one)."""
    return PackedModel(_shard_files(Path(path)))


class PackedModel:
    """A packed model's metadata, and its arenas and tensors read on demand."""

    def __init__(self, files: list[Path]) -> None:
        shards = [_read_shard(f) for f in files]
        try:
            self._parse(shards)
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise FormatError(f"`{files[0]}`: malformed vzstream metadata ({type(exc).__name__}: {exc})") from None
        self.files = files

    def _parse(self, shards: list) -> None:
        first = shards[0][1]
        for file, doc, _ in shards:
            if doc["id"] != first["id"] or doc["model"] != first["model"]:
                raise FormatError(f"`{file}` belongs to another save than `{shards[0][0]}`: write the model again")
        model = first["model"]
        self.id, self.config = first["id"], model["config"]       # config: the model's config.json, or None
        self.codec, self.level, self.alignment = model["codec"], model["level"], model["alignment"]
        self.units_spec = model["units_spec"]
        if self.codec not in codec.CODINGS or type(self.alignment) is not int or self.alignment < 16 or self.alignment % 16:
            raise FormatError(f"`{shards[0][0]}`: codec {self.codec!r:.20} or slot alignment {self.alignment!r:.20} "
                              f"is not one vzstream writes")
        self.units: list[pf.UnitRecord] = []
        self.raw: dict[str, pf.TensorRecord] = {}
        for i, (file, doc, (data_nbytes, stored)) in enumerate(shards):
            if doc["shard"]["index"] != i:
                raise FormatError(f"`{file}` is shard {doc['shard']['index']!r:.20} of its save, listed as shard {i}")
            for u in doc["shard"]["units"]:
                self.units.append(_checked(pf.parse_unit(u, file, data_nbytes, self.alignment), stored))
            for t in doc["shard"]["raw"]:
                rec = _checked(pf.parse_tensor(t, data_nbytes, file), stored)
                if self.raw.setdefault(rec.name, rec) is not rec:
                    raise FormatError(f"tensor `{rec.name}` is stored twice ({file})")
        want = [(u["fqn"], u["params"]) for u in model["units"]]
        have = [(u.fqn, [t.name for t in u.tensors]) for u in self.units]
        if want != have:
            missing = [f for f, _ in want if f not in {u.fqn for u in self.units}]
            raise FormatError(f"the shards hold {len(have)} units, the save {len(want)}; missing: {missing[:4]} "
                              f"(a shard is missing, or from another save)")
        self.unit_names = {u.fqn for u in self.units}
        self.resident, self.buffers = list(model["resident"]), list(model["buffers"])
        if set(self.raw) != set(self.resident + self.buffers):
            missing = sorted(set(self.resident + self.buffers) - set(self.raw))
            raise FormatError(f"tensors {missing[:4]} are missing from the shards (a shard is missing)")
        self.names = {name: (stored, bool(persistent)) for name, stored, persistent in model["names"]}
        known = {t.name for u in self.units for t in u.tensors} | set(self.raw)
        if not {stored for stored, _ in self.names.values()} <= known:
            raise FormatError("the metadata names tensors that are not stored")

    def unit(self, fqn: str) -> pf.UnitRecord:
        for u in self.units:
            if u.fqn == fqn:
                return u
        raise FormatError(f"the file has no unit `{fqn}` (it has {[u.fqn for u in self.units][:6]}...): the model's "
                          f"units differ from the file's")

    # -- reading ---------------------------------------------------------------------------------

    def read_arena(self, unit: pf.UnitRecord, alloc=None, mmap: bool = False) -> torch.Tensor:
        """`unit`'s arena, crc32 checked: read into `alloc(nbytes)` (a uint8 CPU tensor; default
        an ordinary one), or mapped copy-on-write from the file (`mmap`)."""
        data = _read(unit.file, unit.offset, unit.nbytes, alloc, mmap)
        crc = zlib.crc32(data.numpy())
        if crc != unit.crc32:
            raise FormatError(f"unit `{unit.fqn}` in `{unit.file}`: its stored bytes have crc32 {crc:#010x}, "
                              f"{unit.crc32:#010x} was recorded when saving: the file is corrupt")
        return data

    def unit_image(self, unit: pf.UnitRecord, alloc=None, mmap: bool = False) -> tuple[Image, list[ImageTensor]]:
        """`unit`'s wire image over its arena read from the file, and an ImageTensor per tensor."""
        return pf.build_image(unit, self.read_arena(unit, alloc, mmap))

    def unit_store(self, unit, backend, mmap: bool = False, checksums: bool = False) -> UnitStore:
        """The UnitStore a session streams `unit` (a `units.Unit` of the model being opened) from,
        its arena in `backend.host_buffer` memory. A unit whose tensors differ from the file's
        (names, shapes, dtypes) or a backend of another slot alignment is a FormatError."""
        rec = self.unit(unit.fqn)
        want = [(n, tuple(p.shape), p.dtype) for n, p in unit.params]
        have = [(t.name, t.shape, t.dtype) for t in rec.tensors]
        if want != have or backend.alignment != self.alignment:
            diffs = [f"{w} vs {h}" for w, h in zip(want, have) if w != h] or [f"{len(want)} vs {len(have)} tensors"]
            raise FormatError(f"unit `{unit.fqn}`: the model's (name, shape, dtype) differ from the file's: "
                              f"{'; '.join(diffs[:3])} (alignment {backend.alignment} vs {self.alignment})")
        image, packed = self.unit_image(rec, backend.host_buffer, mmap)
        store = UnitStore(unit, packed, [t.offset for t in rec.tensors], unit_nbytes(unit, backend.alignment),
                          image.arena, [t.perm for t in rec.tensors], image=image)
        if checksums:                       # verify="stream": per piece, over the bytes just checked whole
            store.crcs = piece_crcs(store)
        return store

    def read_raw(self, name: str) -> torch.Tensor:
        """A tensor stored raw (a resident parameter or a buffer), crc32 checked."""
        rec = self.raw[name]
        out = torch.empty(rec.stored_shape, dtype=rec.dtype)
        data = out.reshape(-1).view(torch.uint8)
        _read(rec.file, rec.offset, rec.nbytes, lambda n: data, False)
        crc = zlib.crc32(data.numpy())
        if crc != rec.crc32:
            raise FormatError(f"tensor `{name}` in `{rec.file}`: its bytes have crc32 {crc:#010x}, {rec.crc32:#010x} "
                              f"was recorded when saving: the file is corrupt")
        return unpermute(out, rec.perm)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer by every name the model has for it (tied ones share one
        tensor; non-persistent buffers included), decoded and checked, in `state_dict` order."""
        values = {name: self.read_raw(name) for name in self.raw}
        for unit in self.units:
            _, packed = self.unit_image(unit)
            for rec, t in zip(unit.tensors, packed):
                try:
                    values[rec.name] = unpermute(t.decode(), rec.perm)
                except (ValueError, IndexError) as exc:     # FormatError, or records that misread their bytes
                    raise FormatError(f"unit `{unit.fqn}`, tensor `{rec.name}`: {exc}") from None
        return {name: values[stored] for name, (stored, _) in self.names.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the model's `state_dict()` held: `tensors()` less the non-persistent buffers."""
        return {name: t for name, t in self.tensors().items() if self.names[name][1]}


def _shard_files(path: Path) -> list[Path]:
    if path.is_dir():
        path = path / pf.INDEX_NAME
    if not path.is_file():
        raise ConfigError(f"`path` must be a directory `vzstream.save` wrote, its {pf.INDEX_NAME} or a shard; "
                          f"`{path}` does not exist")
    if path.suffix != ".json":
        return [path]
    try:
        index = json.loads(path.read_text())
        meta = index["metadata"]
        if meta["format"] != pf.FORMAT:
            raise FormatError(f"`{path}` is not a vzstream index (its `format` is not {pf.FORMAT!r})")
        pf.check_version(meta, f"`{path}`")
        names = meta["shards"]
        if not names or not all(isinstance(n, str) and n == os.path.basename(n)
                                                               and n.endswith(".safetensors") for n in names):
            raise FormatError(f"`{path}` is not a vzstream index: it must list the shard files beside it")
    except FormatError:
        raise
    except (ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as exc:
        raise FormatError(f"`{path}` is not a valid vzstream index ({type(exc).__name__}: {exc})") from None
    return [path.parent / n for n in names]


def _read_shard(file: Path) -> tuple[Path, dict, tuple[int, dict]]:
    """(file, its checked metadata, (bytes of its data section, {tensor name: (dtype, shape)}))."""
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise MissingDependencyError("reading a packed file needs `safetensors`: `pip install vzstream[hf]` "
                                     "(or `pip install safetensors`)") from exc
    try:
        with safe_open(str(file), framework="pt") as f:
            text = (f.metadata() or {}).get(pf.METADATA_KEY)
            stored = {n: (f.get_slice(n).get_dtype(), f.get_slice(n).get_shape()) for n in f.keys()}
        with open(file, "rb") as f:
            (header_nbytes,) = struct.unpack("<Q", f.read(8))
    except Exception as exc:            # safetensors' own errors, and a file gone since listed
        raise FormatError(f"`{file}` is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    if text is None:
        raise FormatError(f"`{file}` has no `{pf.METADATA_KEY}` metadata: not a file `vzstream.save` wrote")
    doc = pf.unseal(text, f"`{file}`")
    data_start = 8 + header_nbytes
    return file, doc, (file.stat().st_size - data_start, stored)


def _checked(rec, stored: dict):
    """`rec` (a unit or raw tensor record) once safetensors' header agrees on its dtype and shape."""
    if isinstance(rec, pf.UnitRecord):
        name, want = pf.ARENA_PREFIX + rec.fqn, ("U8", [align(rec.nbytes, pf.DATA_ALIGNMENT)])
    else:
        name, want = rec.name, (pf.DTYPES[pf.dtype_name(rec.dtype)], list(rec.stored_shape))
    if stored.get(name) != want:
        raise FormatError(f"`{rec.file}`: tensor `{name}` is {stored.get(name)} in the safetensors header, "
                          f"{want} in the vzstream metadata")
    return rec


def _read(file: Path, offset: int, nbytes: int, alloc, mmap: bool) -> torch.Tensor:
    """Bytes [offset, offset + nbytes) of `file`'s data section, as a uint8 CPU tensor."""
    with open(file, "rb") as f:
        (header_nbytes,) = struct.unpack("<Q", f.read(8))
        start = 8 + header_nbytes + offset
        if mmap and nbytes:
            return torch.from_numpy(np.memmap(f, np.uint8, "c", start, (nbytes,)))
        out = (alloc or _empty)(nbytes)
        view, done = memoryview(out.numpy()), 0
        f.seek(start)
        while done < nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise FormatError(f"`{file}` ends {nbytes - done} bytes early: it changed since it was opened")
            done += got
        return out


def _empty(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)
