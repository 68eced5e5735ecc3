"""packfile.py, packwrite.py, packread.py: `vzstream.save` writes a model packed once, in the format
docs/format.md specifies, and `vzstream.open_packed` gives every tensor back bit-exactly, buffers
included. A changed byte, metadata value, version or shard is a FormatError, never wrong numbers;
the file is plain safetensors."""

import contextlib
import json
import os
import shutil
import signal
import struct
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import DIM, NUM_BLOCKS, TinyLM, build, build_hf

import vzstream
from vzstream import packfile
from vzstream.backends import CpuBackend
from vzstream.errors import ConfigError, FormatError, MissingDependencyError, ModelTypeError, TraceError, VzstreamError
from vzstream.store import unpermute
from vzstream.units import find_units

FUZZ = os.environ.get("VZSTREAM_FUZZ") == "1"     # longer hypothesis runs
CODECS = ["zstd", "nibble"]


def odd_model(tied: bool = False) -> torch.nn.Module:
    """A TinyLM with what a file must keep besides weights: a non-persistent buffer, an int
    buffer, and a weight stored transposed (packed in memory order, given back with its strides)."""
    model = build(TinyLM, dtype=torch.bfloat16, tied=tied)
    model.register_buffer("inv_freq", torch.linspace(0, 1, 8), persistent=False)
    model.blocks[1].register_buffer("steps", torch.arange(5))
    down = model.blocks[2].down
    down.weight = torch.nn.Parameter(down.weight.detach().t().contiguous().t())
    return model


def assert_tensors_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
        assert got[name].stride() == t.stride(), name


def everything(model) -> dict:
    """What `PackedModel.tensors()` must give back: every parameter and buffer by every name."""
    sd = dict(model.state_dict())
    sd.update(model.named_buffers(remove_duplicate=False))
    return sd


# -- header surgery ----------------------------------------------------------------------------------

def read_header(file) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(file, header: dict, data: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_metadata(file, edit, reseal: bool = False) -> None:
    """Apply `edit` to the vzstream metadata of shard `file`; its checksum is left as it was
    (a corrupted file) unless `reseal` (a writer that got its records wrong)."""
    header, data = read_header(file)
    doc = json.loads(header["__metadata__"][packfile.METADATA_KEY])
    edit(doc)
    if reseal:
        doc.pop("checksum")
    header["__metadata__"][packfile.METADATA_KEY] = packfile.seal(doc) if reseal else json.dumps(doc)
    write_header(file, header, data)


def only_shard(directory):
    (file,) = sorted(directory.glob("*.safetensors"))
    return file


# -- round trips ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_is_bit_exact(tmp_path, codec, tied):
    model = odd_model(tied)
    index = vzstream.save(model, tmp_path, codec=codec)
    assert index == tmp_path / packfile.INDEX_NAME
    packed = vzstream.open_packed(tmp_path)
    assert [(u.fqn, u.coding) for u in packed.units] == [(f"blocks.{i}", codec) for i in range(NUM_BLOCKS)]
    assert packed.codec == codec and packed.units_spec == "blocks" and packed.config is None
    assert_tensors_equal(packed.state_dict(), model.state_dict())
    assert list(packed.state_dict()) == list(model.state_dict())          # in its order too
    assert_tensors_equal(packed.tensors(), everything(model))
    if tied:
        sd = packed.state_dict()
        assert sd["head.weight"] is sd["embed.weight"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hf_models_keep_their_config_and_non_persistent_buffers(tmp_path, name):
    model = build_hf(name)
    vzstream.save(model, tmp_path, codec="nibble")
    packed = vzstream.open_packed(tmp_path)
    assert packed.config == json.loads(json.dumps(model.config.to_dict(), default=str))
    assert_tensors_equal(packed.tensors(), everything(model))
    if name == "llama":
        assert "model.rotary_emb.inv_freq" in packed.tensors()
        assert "model.rotary_emb.inv_freq" not in packed.state_dict()


@pytest.mark.parametrize("options", [dict(codec="nibble", raw_fraction=0.5), dict(codec="zstd", vram_budget="10MiB")],
                         ids=["streaming-some-raw", "all-resident"])
def test_an_open_session_saves_its_stores_and_keeps_running(tmp_path, options):
    model = odd_model(tied=True)
    want, x = everything(model), torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        ref = model(x)
    with vzstream.session(model, device="cpu", **options) as s:
        s(x)
        vzstream.save(s, tmp_path)
        with pytest.raises(ConfigError, match="`codec` is fixed by the session"):
            vzstream.save(s, tmp_path / "other", codec="nibble" if options["codec"] == "zstd" else "zstd")
        with pytest.raises(ConfigError, match="has an open vzstream session"):
            vzstream.save(model, tmp_path / "other")
        assert torch.equal(s(x), ref)
        codings = {u.fqn: u.store.image.coding for u in s.units if u.streamed}
    packed = vzstream.open_packed(tmp_path)
    assert [u.fqn for u in packed.units] == [f"blocks.{i}" for i in range(NUM_BLOCKS)]     # resident ones packed too
    assert all(codings.get(u.fqn, options["codec"]) == u.coding for u in packed.units)     # the stores as they were
    assert_tensors_equal(packed.tensors(), want)


def test_large_models_shard_with_an_index_and_aligned_data(tmp_path):
    model = odd_model()
    vzstream.save(model, tmp_path, max_shard_nbytes="20KiB")
    index = json.loads((tmp_path / packfile.INDEX_NAME).read_text())
    shards = index["metadata"]["shards"]
    assert len(shards) > 2 and sorted(p.name for p in tmp_path.glob("*.safetensors")) == shards
    assert set(index["weight_map"].values()) == set(shards)
    packed = vzstream.open_packed(tmp_path)
    for file in packed.files:
        header, data = read_header(file)
        entries = [v for k, v in header.items() if k != "__metadata__"]
        assert (len(file.read_bytes()) - len(data)) % packfile.DATA_ALIGNMENT == 0      # the data starts aligned
        arenas = [header[k]["data_offsets"] for k in header if k.startswith(packfile.ARENA_PREFIX)]
        assert all(start % packfile.DATA_ALIGNMENT == 0 for start, _ in arenas)
        assert len(entries) == 1 or len(data) <= 20 << 10                                 # one oversized unit alone
    assert {u.file for u in packed.units} != {packed.files[0]}
    assert_tensors_equal(packed.tensors(), everything(model))
    assert_tensors_equal(vzstream.open_packed(tmp_path / packfile.INDEX_NAME).tensors(), everything(model))


def test_the_file_lists_and_loads_with_plain_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = odd_model()
    vzstream.save(model, tmp_path)
    file = only_shard(tmp_path)
    with safe_open(str(file), framework="pt") as f:
        doc = json.loads(f.metadata()[packfile.METADATA_KEY])
        keys = set(f.keys())
    assert (doc["format"], doc["version"]) == ("vzstream", 1) and doc["checksum"].startswith("sha256:")
    assert keys == {f"vzstream:blocks.{i}" for i in range(NUM_BLOCKS)} | {
        "embed.weight", "norm.weight", "norm.bias", "head.weight", "pos_scale", "inv_freq", "blocks.1.steps"}
    loaded = load_file(str(file))
    assert torch.equal(loaded["embed.weight"], model.embed.weight) and torch.equal(loaded["inv_freq"], model.inv_freq)
    assert loaded["vzstream:blocks.0"].dtype == torch.uint8


def test_unit_store_rebuilds_what_a_session_streams_for_a_meta_model(tmp_path):
    model = odd_model()
    vzstream.save(model, tmp_path)
    packed = vzstream.open_packed(tmp_path)
    with torch.device("meta"):
        meta = odd_model()
    unit = find_units(meta, "blocks")[2]
    store = packed.unit_store(unit, CpuBackend())
    assert store.image.coding == "zstd" and store.slot_nbytes >= store.raw_nbytes
    for (name, _), t, perm in zip(unit.params, store.packed, store.perms):
        value = unpermute(t.decode(), perm)
        assert torch.equal(value, model.get_parameter(name)) and value.stride() == model.get_parameter(name).stride()
    with torch.device("meta"):
        other = build(TinyLM, dim=DIM * 2)
    with pytest.raises(FormatError, match="differ from the file's"):
        packed.unit_store(find_units(other, "blocks")[0], CpuBackend())


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_arenas_read_into_a_buffer_or_mapped(tmp_path, mmap):
    model = odd_model()
    vzstream.save(model, tmp_path)
    packed = vzstream.open_packed(tmp_path)
    buffers = []

    def alloc(n):
        buffers.append(torch.empty(n, dtype=torch.uint8))
        return buffers[-1]

    image, tensors = packed.unit_image(packed.units[0], alloc, mmap)
    assert buffers == [] if mmap else image.arena is buffers[0]
    assert torch.equal(tensors[0].decode(), model.blocks[0].up.weight)


# -- what is refused ---------------------------------------------------------------------------------

def test_save_refuses_what_a_file_cannot_fix(tmp_path):
    model = odd_model()
    with pytest.raises(ConfigError, match="fixes its codec"):
        vzstream.save(model, tmp_path, codec="auto")
    with pytest.raises(ConfigError, match="max_shard_nbytes"):
        vzstream.save(model, tmp_path, max_shard_nbytes="lots")
    with pytest.raises(ConfigError, match="units"):
        vzstream.save(model, tmp_path, units=["nope"])
    with pytest.raises(ModelTypeError):
        vzstream.save(model.state_dict(), tmp_path)
    with torch.device("meta"):
        meta = odd_model()
    with pytest.raises(TraceError, match="meta"):
        vzstream.save(meta, tmp_path)
    assert not list(tmp_path.iterdir())


# -- corruption ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_a_flipped_byte_in_a_unit_names_the_unit(tmp_path, codec, mmap):
    vzstream.save(odd_model(), tmp_path, codec=codec)
    packed = vzstream.open_packed(tmp_path)
    unit = packed.units[2]
    file = only_shard(tmp_path)
    raw = bytearray(file.read_bytes())
    raw[_data_start(file) + unit.offset + unit.nbytes // 2] ^= 0x10
    file.write_bytes(raw)
    packed = vzstream.open_packed(tmp_path)          # arenas are read (and checked) when asked for
    with pytest.raises(FormatError, match="unit `blocks.2`.*corrupt"):
        packed.unit_image(packed.units[2], mmap=mmap)
    with pytest.raises(FormatError, match="unit `blocks.2`"):
        packed.tensors()


def test_a_flipped_byte_in_a_raw_tensor_names_it(tmp_path):
    vzstream.save(odd_model(), tmp_path)
    file = only_shard(tmp_path)
    rec = vzstream.open_packed(tmp_path).raw["inv_freq"]
    raw = bytearray(file.read_bytes())
    raw[_data_start(file) + rec.offset + 3] ^= 0x01
    file.write_bytes(raw)
    with pytest.raises(FormatError, match="tensor `inv_freq`.*corrupt"):
        vzstream.open_packed(tmp_path).tensors()


def _data_start(file) -> int:
    return 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]


def _set_eps(doc):
    doc["model"]["config"]["rms_norm_eps"] = 1e-5


def _move_param(doc):                 # the unit grouping: a parameter listed with another unit
    units = doc["model"]["units"]
    units[1]["params"].append(units[0]["params"].pop())


def _reshape(doc):
    doc["shard"]["units"][0]["tensors"][0]["shape"].insert(0, 1)


@pytest.mark.parametrize("edit", [_set_eps, _move_param, _reshape], ids=["rms_norm_eps", "grouping", "shape"])
def test_a_changed_metadata_value_is_caught(tmp_path, edit):
    vzstream.save(build_hf("llama"), tmp_path)
    edit_metadata(only_shard(tmp_path), edit)
    with pytest.raises(FormatError, match="checksum"):
        vzstream.open_packed(tmp_path)


def test_an_unknown_version_says_which_vzstream_reads_it(tmp_path):
    vzstream.save(odd_model(), tmp_path)
    edit_metadata(only_shard(tmp_path), lambda doc: doc.update(version=2, writer="vzstream 9.1.0"))
    with pytest.raises(FormatError, match=r"format version 2, written by vzstream 9\.1\.0.*reads format version 1"):
        vzstream.open_packed(tmp_path)
    index = tmp_path / packfile.INDEX_NAME
    meta = json.loads(index.read_text())
    meta["metadata"]["version"] = 3
    index.write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="format version 3"):
        vzstream.open_packed(tmp_path)


def test_shards_must_make_up_one_whole_save(tmp_path):
    vzstream.save(odd_model(), tmp_path / "a", max_shard_nbytes="20KiB")
    vzstream.save(odd_model(), tmp_path / "b", max_shard_nbytes="20KiB")
    first = sorted((tmp_path / "a").glob("*.safetensors"))[0]
    with pytest.raises(FormatError, match="missing"):
        vzstream.open_packed(first)                    # one shard of several
    shutil.copy(sorted((tmp_path / "b").glob("*.safetensors"))[1], sorted((tmp_path / "a").glob("*.safetensors"))[1])
    with pytest.raises(FormatError, match="another save"):
        vzstream.open_packed(tmp_path / "a")
    first.unlink()
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        vzstream.open_packed(tmp_path / "a")


def test_files_that_are_not_packed_models_are_refused(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FormatError, match="not a file `vzstream.save` wrote"):
        vzstream.open_packed(tmp_path / "plain.safetensors")
    (tmp_path / packfile.INDEX_NAME).write_text("{not json")
    with pytest.raises(FormatError, match="not a valid vzstream index"):
        vzstream.open_packed(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        vzstream.open_packed(tmp_path / "nowhere")
    vzstream.save(odd_model(), tmp_path / "ok")
    monkeypatch.setitem(sys.modules, "safetensors", None)      # not installed
    with pytest.raises(MissingDependencyError, match=r"pip install vzstream\[hf\]"):
        vzstream.open_packed(tmp_path / "ok")


# -- fuzzing -------------------------------------------------------------------------------------------

class Hang(BaseException):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail a trial that runs past `seconds` (a hang), instead of waiting on it forever."""
    def expire(signum, frame):
        raise Hang(f"trial ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", params=CODECS)
def pristine(request, tmp_path_factory):
    """(directory, shard bytes, every tensor) of a small saved model with ties and odd buffers."""
    directory = tmp_path_factory.mktemp(f"pristine-{request.param}")
    model = odd_model(tied=True)
    vzstream.save(model, directory, codec=request.param)
    return directory, only_shard(directory).read_bytes(), everything(model)


def _leaves(doc, path=()):
    """Paths of every value in the metadata JSON (dict keys and list indices)."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    paths = [path]
    for key, value in items:
        paths += _leaves(value, path + (key,))
    return paths


def _set(doc, path, value):
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


json_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(0, 300),
                        st.floats(allow_nan=False), st.text(max_size=4), st.lists(st.integers(0, 64), max_size=3))


def _mutate(data, raw: bytes, file) -> None:
    """Write `raw` to `file` changed one way: a flipped byte (in the header, mostly), a cut, or a
    metadata value rewritten without its checksum."""
    header_end = _data_start_of(raw)
    kind = data.draw(st.sampled_from(["flip-header", "flip-any", "truncate", "field"]))
    out = bytearray(raw)
    if kind == "truncate":
        out = out[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind.startswith("flip"):
        at = data.draw(st.integers(0, (header_end if kind == "flip-header" else len(raw)) - 1))
        out[at] ^= data.draw(st.integers(1, 255))
    file.write_bytes(bytes(out))
    if kind == "field":
        header, _ = read_header(file)
        doc = json.loads(header["__metadata__"][packfile.METADATA_KEY])
        path = data.draw(st.sampled_from([p for p in _leaves(doc) if p]))
        value = data.draw(json_values)
        edit_metadata(file, lambda d: _set(d, path, value))


def _data_start_of(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


@settings(max_examples=400 if FUZZ else 40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files_give_format_error_or_the_exact_tensors(pristine, tmp_path, data):
    directory, raw, want = pristine
    work = tmp_path / "fuzz"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(directory, work)
    _mutate(data, raw, only_shard(work))
    with time_limit(20):
        try:
            got = vzstream.open_packed(work).tensors()
        except FormatError:
            return
    assert_tensors_equal(got, want)                   # a change that hit whitespace or padding


@settings(max_examples=400 if FUZZ else 40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_wrong_records_with_a_right_checksum_give_vzstream_errors_only(pristine, tmp_path, data):
    # A writer that got a record wrong: the checksum holds, so every value is checked on its own
    # (sizes bounded before anything is allocated); values may be wrong, nothing may crash.
    directory, raw, _ = pristine
    work = tmp_path / "fuzz"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(directory, work)
    file = only_shard(work)
    header, _ = read_header(file)
    doc = json.loads(header["__metadata__"][packfile.METADATA_KEY])
    path = data.draw(st.sampled_from([p for p in _leaves(doc) if p and p[0] != "checksum"]))
    value = data.draw(json_values)
    edit_metadata(file, lambda d: _set(d, path, value), reseal=True)
    with time_limit(20):
        try:
            vzstream.open_packed(work).tensors()
        except VzstreamError:
            pass
