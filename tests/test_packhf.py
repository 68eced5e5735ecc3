"""packhf.py and the `pack` / `inspect FILE` commands (issue 16 steps 2 and 5): packing a Hugging
Face checkpoint tensor by tensor gives the same tensors and metadata as saving the loaded model,
sharded or not, cast or not; it holds one unit's tensors at a time; the commands' errors are one
line; `inspect FILE` prints the per-unit table and `--verify` catches a changed byte."""

import io
import json
import struct
import weakref

import pytest
import safetensors
import torch
import transformers
from models import build_hf, hf_config, save_tiny_llama

import vzstream
import vzstream.cli
from vzstream import packfile
from vzstream.__main__ import main
from vzstream.errors import FormatError
from vzstream.packhf import pack_checkpoint
from vzstream.units import find_units


def sharded_checkpoint(directory, name: str = "llama"):
    """A tiny fp32 model as `save_pretrained` writes it, split into several safetensors files."""
    build_hf(name, dtype=torch.float32).save_pretrained(directory, max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").is_file() and len(list(directory.glob("*.safetensors"))) > 1
    return directory


def assert_same_file(got, want) -> None:
    """Two packed models hold the same tensors (values, dtypes, strides), grouping and config."""
    a, b = vzstream.open_packed(got), vzstream.open_packed(want)
    assert [(u.fqn, [t.name for t in u.tensors], u.coding) for u in a.units] == \
           [(u.fqn, [t.name for t in u.tensors], u.coding) for u in b.units]
    assert (a.names, a.resident, a.buffers, a.config) == (b.names, b.resident, b.buffers, b.config)
    assert (a.codec, a.units_spec, a.level) == (b.codec, b.units_spec, b.level)
    ta, tb = a.tensors(), b.tensors()
    assert list(ta) == list(tb)
    for name, t in tb.items():
        assert ta[name].dtype == t.dtype and ta[name].stride() == t.stride() and torch.equal(ta[name], t), name


# -- same file as saving the loaded model ------------------------------------------------------------

@pytest.mark.parametrize("name,codec,units", [("llama", "zstd", "blocks"), ("llama", "nibble", "leaves"),
                                              ("gpt2", "zstd", "blocks"), ("qwen2", "nibble", "blocks")])
def test_a_sharded_checkpoint_packs_as_the_loaded_model_saves(tmp_path, name, codec, units):
    src = sharded_checkpoint(tmp_path / "src", name)
    pack_checkpoint(src, tmp_path / "packed", codec=codec, units=units)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src)
    vzstream.save(loaded, tmp_path / "saved", codec=codec, units=units)
    assert_same_file(tmp_path / "packed", tmp_path / "saved")
    tensors = vzstream.open_packed(tmp_path / "packed").tensors()
    if name == "gpt2":                                       # tied as the loaded model ties them
        assert tensors["lm_head.weight"] is tensors["transformer.wte.weight"]
    else:                                                    # the non-persistent rotary buffer, computed
        assert torch.equal(tensors["model.rotary_emb.inv_freq"], loaded.model.rotary_emb.inv_freq)


def test_dtype_casts_an_fp32_checkpoint_as_from_pretrained_does(tmp_path):
    src = sharded_checkpoint(tmp_path / "src")
    pack_checkpoint(src, tmp_path / "packed", dtype=torch.bfloat16, max_shard_nbytes="64KB")
    vzstream.save(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16), tmp_path / "saved")
    assert_same_file(tmp_path / "packed", tmp_path / "saved")
    packed = vzstream.open_packed(tmp_path / "packed")
    assert len(packed.files) > 1
    assert {t.dtype for u in packed.units for t in u.tensors} == {torch.bfloat16}
    assert packed.raw["model.rotary_emb.inv_freq"].dtype == torch.float32     # computed in fp32, as transformers keeps it


def test_a_single_file_checkpoint_keeps_its_dtype(tmp_path):
    src = save_tiny_llama(tmp_path / "src", tokenizer=False)
    pack_checkpoint(src, tmp_path / "packed")
    assert_same_file(tmp_path / "packed", vzstream.save(transformers.AutoModelForCausalLM.from_pretrained(src),
                                                        tmp_path / "saved"))
    assert {t.dtype for u in vzstream.open_packed(tmp_path / "packed").units for t in u.tensors} == {torch.float32}


# -- memory: one unit at a time --------------------------------------------------------------------

def test_packing_holds_one_units_tensors_at_a_time(tmp_path, monkeypatch):
    """Every tensor safetensors hands out is counted until it is freed: the most alive at once
    is the largest unit (or resident tensor), never two units or the model."""
    src = sharded_checkpoint(tmp_path / "src")
    live, peaks, real_open = [0], [], safetensors.safe_open

    class CountingOpen:
        def __init__(self, file, framework):
            self.inner = real_open(file, framework=framework)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_tensor(self, name):
            t = self.inner.get_tensor(name)
            nbytes = t.numel() * t.element_size()
            live[0] += nbytes
            peaks.append(live[0])
            weakref.finalize(t, lambda: live.__setitem__(0, live[0] - nbytes))
            return t

    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    pack_checkpoint(src, tmp_path / "packed")
    found = find_units(build_hf("llama", dtype=torch.float32), "blocks")
    largest = max([u.raw_nbytes for u in found if u.streamed] + [n for u in found if not u.streamed
                                                                 for n in u.param_nbytes])
    assert len(peaks) == sum(len(u.params) for u in found)    # each tensor read once
    assert max(peaks) == largest and live[0] == 0


# -- errors -----------------------------------------------------------------------------------------------

def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vzstream: error: "), captured.err
    return lines[0]


def _no_safetensors(path):
    path.mkdir()
    hf_config("llama").save_pretrained(path)
    return path


def _wrong_config(path):
    sharded_checkpoint(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    return path


@pytest.mark.parametrize("make,args,says", [
    (lambda p: p / "missing", [], "no such directory"),
    (lambda p: p.mkdir() or p, [], "has no config.json"),
    (_no_safetensors, [], "has no *.safetensors"),
    (_wrong_config, [], "has no tensor ['model.layers.2"),
    (sharded_checkpoint, ["--codec", "lz4"], "`codec` must be one of"),
    (sharded_checkpoint, ["--units", "rows"], "`units`"),
    (sharded_checkpoint, ["--shard-size", "big"], "`max_shard_nbytes` must be a size"),
    (sharded_checkpoint, ["--dtype", "int4"], "invalid choice"),
], ids=["missing", "no-config", "no-safetensors", "weights-of-another-config", "codec", "units", "shard-size", "dtype"])
def test_pack_errors_are_one_line(tmp_path, capsys, make, args, says):
    src = make(tmp_path / "src")
    capsys.readouterr()
    assert main(["pack", str(src), str(tmp_path / "out"), *args]) == 2
    assert says in error_line(capsys)


def test_pack_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "out").write_text("")
    src = sharded_checkpoint(tmp_path / "src")
    capsys.readouterr()
    assert main(["pack", str(src), str(tmp_path / "out")]) == 2
    assert "`OUT`" in error_line(capsys)


def test_pack_prints_one_summary_and_no_progress_when_piped(tmp_path, capsys):
    src = save_tiny_llama(tmp_path / "src", tokenizer=False)
    capsys.readouterr()
    assert main(["pack", str(src), str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and len(out.splitlines()) == 1 and "2 units" in out
    assert {t.dtype for u in vzstream.open_packed(tmp_path / "out").units for t in u.tensors} == {torch.bfloat16}


def test_progress_on_a_tty_is_one_line_rewritten():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = vzstream.cli._ProgressLine(stream)
    bar(10 << 20, 40 << 20, 1, 4)
    bar(20 << 20, 40 << 20, 2, 4)                # at most 5 a second: not shown
    bar(40 << 20, 40 << 20, 4, 4)                # the last one always is
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "4/4 units, 40/40 MiB" in text and "MiB/s" in text and "ETA 0 s" in text


# -- inspect FILE ---------------------------------------------------------------------------------------

@pytest.fixture
def packed_dir(tmp_path):
    vzstream.save(build_hf("llama"), tmp_path / "packed", max_shard_nbytes="100KB")
    return tmp_path / "packed"


@pytest.mark.parametrize("which", ["dir", "index", "shard"])
def test_inspect_file_prints_a_table_per_unit(packed_dir, capsys, which):
    packed = vzstream.open_packed(packed_dir)
    target = {"dir": packed_dir, "index": packed_dir / packfile.INDEX_NAME, "shard": packed.files[0]}[which]
    if which == "shard":          # one shard of several is not the whole save
        assert main(["inspect", str(target)]) == 2
        assert "missing" in error_line(capsys)
        return
    assert main(["inspect", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"vzstream format version {packfile.VERSION}" in out and "llama, codec zstd, units blocks" in out
    lines = out.splitlines()
    assert lines[1].split() == ["unit", "params", "raw", "MiB", "packed", "MiB", "ratio", "codec"]
    for unit in packed.units:
        row = next(line.split() for line in lines if line.startswith(unit.fqn + " "))
        raw = sum(t.nbytes for t in unit.tensors)
        assert row[2:] == [f"{raw / 2**20:.2f}", f"{unit.nbytes / 2**20:.2f}", f"{raw / unit.nbytes:.3f}", "zstd"]
    assert lines[-1].startswith("total") and "(resident parameters)" in out and "(buffers)" in out


def test_inspect_verify_says_ok_then_catches_a_changed_byte(packed_dir, capsys):
    assert main(["inspect", str(packed_dir), "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    unit = vzstream.open_packed(packed_dir).units[1]
    raw = bytearray(unit.file.read_bytes())
    (header_nbytes,) = struct.unpack("<Q", raw[:8])
    raw[8 + header_nbytes + unit.offset + unit.nbytes // 2] ^= 0x08
    unit.file.write_bytes(raw)
    assert main(["inspect", str(packed_dir)]) == 0              # the table reads only metadata
    capsys.readouterr()
    assert main(["inspect", str(packed_dir), "--verify"]) == 2
    assert f"unit `{unit.fqn}`" in error_line(capsys)


def test_inspect_of_a_file_that_is_not_packed_is_one_line(tmp_path, capsys):
    save_tiny_llama(tmp_path, tokenizer=False)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "model.safetensors")]) == 2
    assert "not a file `vzstream.save` wrote" in error_line(capsys)


def test_pack_then_inspect_round_trip_through_the_cli(tmp_path, capsys):
    src = sharded_checkpoint(tmp_path / "src")
    assert main(["pack", str(src), str(tmp_path / "out"), "--codec", "nibble", "--shard-size", "150KB"]) == 0
    assert main(["inspect", str(tmp_path / "out"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "codec nibble" in out and "verify: OK" in out
    assert len(vzstream.open_packed(tmp_path / "out").files) > 1
    with pytest.raises(FormatError):            # the library raises; the CLI turns it into one line
        pack_checkpoint(_wrong_config(tmp_path / "wrong"), tmp_path / "out2")


def test_a_packed_checkpoint_generates_what_the_directory_does(tmp_path):
    src = sharded_checkpoint(tmp_path / "src")
    pack_checkpoint(src, tmp_path / "packed", codec="nibble")
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
    with vzstream.load(tmp_path / "packed", device="cpu") as s:
        assert torch.equal(s.generate(ids, **kwargs), want)
