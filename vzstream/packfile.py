"""The packed file's format (docs/format.md specifies it): names, the versioned metadata JSON and
its checksum, and the records that describe each unit's wire image (`image.py`) and each tensor
stored raw. `packwrite.py` writes files from these records, `packread.py` reads them back.

Invariants: the metadata is trusted only once its version and checksum are; every record is then
checked (types, ranges, offsets inside the bytes that hold it) before anything is allocated or
read from it, so a record that does not add up is a FormatError, never a raw exception.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import codec
from .errors import FormatError
from .image import Chunk, Image, ImageTensor, chunk_elems
from .store import unpermute
from .units import align

FORMAT = "vzstream"
VERSION = 1                          # bump on any change a version-1 reader would misread
METADATA_KEY = "vzstream"            # the one entry of safetensors' `__metadata__`
INDEX_NAME = "vzstream.index.json"
ARENA_PREFIX = "vzstream:"           # a unit's arena is the uint8 tensor ARENA_PREFIX + its fqn
DATA_ALIGNMENT = 64                  # file offset of the data section and of every arena
MAX_SHARD_NBYTES = 1 << 30
_MAX_DIMS = 64

# Tensor dtypes a file holds, by their torch name, with safetensors' code (raw tensors keep theirs).
DTYPES = {name: code for name, code in [
    ("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16"), ("int64", "I64"),
    ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL"),
    ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"),
    ("uint64", "U64")] if hasattr(torch, name)}


def shard_name(i: int, num_shards: int) -> str:
    return f"vzstream-{i + 1:05d}-of-{num_shards:05d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str | None:
    """The name a file records `dtype` under; None: a file cannot hold it."""
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPES else None


# -- the metadata JSON -----------------------------------------------------------------------------

def _canonical(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _checksum(doc: dict) -> str:
    return "sha256:" + hashlib.sha256(_canonical(doc).encode()).hexdigest()


def seal(doc: dict) -> str:
    """`doc` as the metadata string, carrying the checksum of everything else in it."""
    return _canonical({**doc, "checksum": _checksum(doc)})


def unseal(text: str, where: str) -> dict:
    """The metadata `seal` wrote, once its format, version and checksum are right."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{where}: the vzstream metadata is not valid JSON ({exc}): the file is corrupt") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FormatError(f"{where}: no vzstream metadata (`format` is not {FORMAT!r}): not a file `vzstream.save` wrote")
    check_version(doc, where)
    recorded = doc.pop("checksum", None)
    if recorded != _checksum(doc):
        raise FormatError(f"{where}: the metadata's checksum is {recorded!r} but its contents hash to {_checksum(doc)}: "
                          f"the metadata (model config, unit grouping or a tensor record) changed after it was written")
    return doc


def check_version(doc: dict, where: str) -> None:
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        from . import __version__

        raise FormatError(
            f"{where} is vzstream format version {version!r}, written by {doc.get('writer', 'an unknown writer')!s:.60}; "
            f"this vzstream ({__version__}) reads format version {VERSION} only. Read it with the vzstream version that "
            f"wrote it or a newer one (`pip install -U vzstream`), or save the model again with this one.")


def writer() -> str:
    from . import __version__

    return f"vzstream {__version__}"


# -- records ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorRecord:
    """One tensor: what it is, and where its bytes lie (in storage order, `perm`)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]              # as the model holds it
    stride: tuple[int, ...]             # the strides it is given back with
    perm: tuple[int, ...] | None        # dim order it is stored in (`store.storage_order`); None: as is
    offset: int                         # unit tensor: byte offset in the unit's slot; raw: in its file's data
    crc32: int                          # of its values, as stored
    file: Path | None = None            # raw tensors: the shard holding it

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.shape if self.perm is None else tuple(self.shape[d] for d in self.perm)

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class UnitRecord:
    """One unit's wire image: its arena's place in a shard and how to read the image in it."""

    fqn: str
    file: Path
    offset: int                         # byte offset of the arena in the file's data section
    nbytes: int                         # the arena's (stored padded with zeros to DATA_ALIGNMENT)
    crc32: int                          # of the arena's bytes
    coding: str | None
    itemsize: int
    coded_nbytes: int
    raw_offset: int
    raw_nbytes: int
    chunks: tuple                       # (start, numel, offset, patches, ((start, nbytes, data_nbytes), ...))
    tensors: tuple[TensorRecord, ...]


def tensor_doc(name: str, t: torch.Tensor, perm, offset: int, crc32: int) -> dict:
    """The record of `t`, stored in storage order (`perm`), as the metadata holds it."""
    return {"name": name, "dtype": dtype_name(t.dtype), "shape": list(unpermute(t, perm).shape),
            "stride": list(unpermute(torch.empty(t.shape, device="meta"), perm).stride()),
            "perm": None if perm is None else list(perm), "offset": offset, "crc32": crc32}


def unit_doc(fqn: str, names: list[str], store, offset: int, crc32: int) -> dict:
    """The record of a `store.UnitStore` (its image and tensors) whose arena lies at `offset`."""
    img = store.image
    chunks = [[c.start, c.numel, c.offset, c.patches, [[f.start, f.nbytes, memoryview(f.data).nbytes]
                                                        for f in c.frames]] for c in img.chunks]
    tensors = [tensor_doc(n, torch.empty(t.shape, dtype=t.dtype, device="meta"), perm, t.slot_offset, t.crc32)
               for n, t, perm in zip(names, store.packed, store.perms)]
    return {"fqn": fqn, "offset": offset, "nbytes": img.arena.numel(), "crc32": crc32, "coding": img.coding,
            "itemsize": img.itemsize, "coded_nbytes": img.coded_nbytes, "raw_offset": img.raw_offset,
            "raw_nbytes": img.raw_nbytes, "chunks": chunks, "tensors": tensors}


def parse_tensor(doc: dict, limit: int, file: Path | None = None) -> TensorRecord:
    """A tensor record whose bytes must fit in `limit` (a slot, or the file's data)."""
    dtype = _dtype(doc["dtype"])
    shape = tuple(_int(d, "shape") for d in _list(doc["shape"], "shape"))
    perm = doc["perm"] if doc["perm"] is None else tuple(_int(d, "perm") for d in _list(doc["perm"], "perm"))
    if len(shape) > _MAX_DIMS or (perm is not None and sorted(perm) != list(range(len(shape)))):
        raise FormatError(f"tensor `{doc['name']}`: shape {shape} or dim order {perm} is not possible")
    t = TensorRecord(_str(doc["name"]), dtype, shape, (), perm, _int(doc["offset"], "offset"),
                     _int(doc["crc32"], "crc32"), file)
    if t.offset + t.nbytes > limit:     # checked before the stride below builds anything of that size
        raise FormatError(f"tensor `{t.name}`: {t.nbytes} bytes at offset {t.offset} overrun the {limit} bytes holding it")
    stride = _strides(t.stored_shape, perm)
    if _list(doc["stride"], "stride") != list(stride):
        raise FormatError(f"tensor `{t.name}`: strides {doc['stride']} do not match shape {shape} stored in order {perm}")
    return TensorRecord(t.name, dtype, shape, stride, perm, t.offset, t.crc32, file)


def parse_unit(doc: dict, file: Path, data_nbytes: int, alignment: int) -> UnitRecord:
    """A unit record, its image checked to lie inside its arena and its arena inside the file;
    `alignment`: of the slot offsets (the model's, a multiple of 16: a nibble tensor starts on an
    even element)."""
    fqn, offset, nbytes = _str(doc["fqn"]), _int(doc["offset"], "offset"), _int(doc["nbytes"], "nbytes")
    coding, k = doc["coding"], _int(doc["itemsize"], "itemsize")
    if offset % DATA_ALIGNMENT or offset + align(nbytes, DATA_ALIGNMENT) > data_nbytes:
        raise FormatError(f"unit `{fqn}`: its arena ({nbytes} bytes at {offset}) is misplaced in the file's {data_nbytes}")
    if coding not in (None, *codec.CODINGS) or k not in (1, 2, 4, 8) or (coding and k == 1) or (
            coding == codec.Codec.NIBBLE and k != 2):
        raise FormatError(f"unit `{fqn}`: coding {coding!r} with {k}-byte elements is not one vzstream writes")
    chunks, end = [], 0
    for start, numel, at, patches, frames in _list(doc["chunks"], "chunks"):
        chunks.append(_chunk(fqn, coding, k, nbytes, end, start, numel, at, patches, frames))
        end += chunks[-1][1]
    coded, raw_offset, raw_nbytes = (_int(doc[key], key) for key in ("coded_nbytes", "raw_offset", "raw_nbytes"))
    if coded != end * k or (coding is None) != (not chunks) or raw_offset + raw_nbytes > nbytes:
        raise FormatError(f"unit `{fqn}`: its image's areas do not add up inside its {nbytes}-byte arena")
    tensors = tuple(parse_tensor(t, coded + raw_nbytes) for t in _list(doc["tensors"], "tensors"))
    for t in tensors:                   # slot offsets are aligned; a lane tensor lies inside the lane
        if t.offset % alignment or (t.offset < coded and (t.nbytes % k or t.offset + t.nbytes > coded)):
            raise FormatError(f"unit `{fqn}`: tensor `{t.name}` is not placed as a slot places it")
    return UnitRecord(fqn, file, offset, nbytes, _int(doc["crc32"], "crc32"), coding, k, coded, raw_offset,
                      raw_nbytes, tuple(chunks), tensors)


def _chunk(fqn, coding, k, arena_nbytes, expected, start, numel, at, patches, frames) -> tuple:
    """One chunk, checked: it follows the one before, and its bytes lie in the arena."""
    start, numel, at, patches = (_int(v, "chunk") for v in (start, numel, at, patches))
    frames = tuple(tuple(_int(v, "frame") for v in _list(f, "frame")) for f in _list(frames, "frames"))
    ok = start == expected and 0 < numel <= chunk_elems(k) and all(len(f) == 3 for f in frames)
    if coding == codec.Codec.NIBBLE:
        ok = ok and not frames and start % 2 == 0
        end = at + Chunk(start, numel, at, patches).nbytes(2)
    else:
        starts = [0] + [f[0] + f[1] for f in frames]
        ok = ok and patches == 0 and frames and [f[0] for f in frames] == starts[:-1] and starts[-1] == numel
        ok = ok and all(0 < f[1] <= codec.FRAME_NBYTES and f[2] > 0 for f in frames)
        end = at + (k - 1) * numel + sum(f[2] for f in frames)
    if not ok or end > arena_nbytes:
        raise FormatError(f"unit `{fqn}`: chunk at element {start} is not a valid {coding} chunk inside its arena")
    return start, numel, at, patches, frames


def build_image(rec: UnitRecord, arena: torch.Tensor) -> tuple[Image, list[ImageTensor]]:
    """`rec`'s image over `arena` (read from the file), and an ImageTensor per tensor."""
    host, k, chunks = arena.numpy(), rec.itemsize, []
    for start, numel, at, patches, frames in rec.chunks:
        pos, built = at + (k - 1) * numel, []
        for f_start, f_nbytes, data_nbytes in frames:
            built.append(codec.Frame(f_start, f_nbytes, memoryview(host[pos : pos + data_nbytes])))
            pos += data_nbytes
        chunks.append(Chunk(start, numel, at, patches, tuple(built)))
    image = Image(arena, rec.coding, k, rec.coded_nbytes, tuple(chunks), rec.raw_offset, rec.raw_nbytes, host)
    return image, [ImageTensor(image, t.dtype, torch.Size(t.stored_shape), t.offset, t.crc32) for t in rec.tensors]


# -- checked reads of JSON values ------------------------------------------------------------------

def _int(value, what: str) -> int:
    if type(value) is not int or value < 0:
        raise FormatError(f"`{what}` must be a non-negative int; the metadata has {value!r:.40}")
    return value


def _str(value) -> str:
    if not isinstance(value, str):
        raise FormatError(f"a name must be a string; the metadata has {value!r:.40}")
    return value


def _list(value, what: str) -> list:
    if not isinstance(value, list):
        raise FormatError(f"`{what}` must be a list; the metadata has {value!r:.40}")
    return value


def _dtype(name) -> torch.dtype:
    if name not in DTYPES:
        raise FormatError(f"dtype {name!r:.40} is not one a vzstream file holds ({', '.join(DTYPES)})")
    return getattr(torch, name)


def _strides(stored_shape: tuple, perm) -> tuple[int, ...]:
    """The strides of a dense tensor of `stored_shape` permuted back by `perm` (as torch gives
    them: a dim of size 0 or 1 counts as 1), in Python ints: no overflow whatever the file says."""
    stored, step = [0] * len(stored_shape), 1
    for i in range(len(stored_shape) - 1, -1, -1):
        stored[i], step = step, step * max(stored_shape[i], 1)
    if perm is None:
        return tuple(stored)
    out = [0] * len(perm)
    for i, d in enumerate(perm):
        out[d] = stored[i]
    return tuple(out)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
