"""A new user's first hour (issue 18): the README's own-model snippet runs as written, `s.plan`
reads the same before the first call, after it and after closing, `Session` and `DevicePool`
say what they are, `s.device` is where inputs go, and a non-module `model` is a TypeError.
The CLI's items are in test_cli.py."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from models import PROMPT, build_hf, hf_inputs, named_minimum, save_tiny_llama

import vzstream

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_snippet(heading: str) -> str:
    """The first ```python block under `heading` in the README."""
    section = README.split(f"\n{heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


# -- item 8: the README's own-model snippet ----------------------------------------------------------

def test_readme_own_model_snippet_runs_as_written(tmp_path):
    model_dir = save_tiny_llama(tmp_path)
    code = readme_snippet("## Use it on your own model")
    assert code.count('"path/to/your/model"') == 1
    code = code.replace('"path/to/your/model"', repr(str(model_dir)))
    code = code.replace('"The capital of France is"', repr(PROMPT))     # words the tiny vocabulary holds
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue() == resident_text(model_dir, PROMPT, 32) + "\n"


def resident_text(model_dir, prompt: str, new_tokens: int) -> str:
    """What the snippet's model generates without vzstream."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=new_tokens, do_sample=False)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith(prompt + " ") and len(text.split()) > len(prompt.split()) + new_tokens // 2
    return text


def test_readme_links_into_the_docs_resolve():
    """Every `docs/*.md#anchor` the README links to is a heading there (GitHub's slugs)."""
    def slug(heading: str) -> str:
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

    links = re.findall(r"\]\((docs/[\w./-]+\.md)#([\w-]+)\)", README)
    assert links
    for path, anchor in links:
        headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
        assert anchor in {slug(h) for h in headings}, f"README links {path}#{anchor}, which has no such heading"


# -- item 5: one plan before and after the first call, and after closing ------------------------------

@pytest.mark.parametrize("options", [
    {}, {"prefetch": 0}, {"units": "leaves"}, {"cache": "none"}, {"vram_budget": "budget"},
], ids=["default", "prefetch-0", "leaves", "cache-none", "budget"])
def test_the_plan_reads_the_same_before_and_after_calls_and_after_closing(options):
    model = build_hf("llama", num_layers=8)
    ids, kwargs = hf_inputs()
    if options.get("vram_budget"):              # the smallest budget, and room for two blocks more
        block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
        options = {"vram_budget": named_minimum(model) + 2 * block}
    s = vzstream.session(model, device="cpu", **options)
    with s:
        before = str(s.plan)
        s.generate(ids, **kwargs)
        s(ids)
        after = str(s.plan)
    assert after == before
    assert str(s.plan) == before                # kept at close, not a ring of 0 slots
    assert {u.streamed for u in s.plan.units} == ({True} if "units" in options else {True, False})


# -- item 6: reprs -----------------------------------------------------------------------------------

def test_session_and_pool_reprs_say_device_budget_members_and_state():
    model = build_hf("llama", num_layers=2)
    pool = vzstream.DevicePool("cpu", budget="64MiB")
    s = vzstream.session(model, pool=pool, codec="zstd")     # named: the nibble test run changes the default
    assert repr(s) == "<vzstream.Session LlamaForCausalLM device auto, not opened yet, no budget, codec zstd>"
    assert repr(pool) == "<vzstream.DevicePool on cpu, budget 64.0 MiB, 0 open sessions>"
    with s:
        units = len(s.plan.units)               # under a pool budget every module with weights is a unit
        assert repr(s) == (f"<vzstream.Session LlamaForCausalLM on cpu, open, 0 of {units} units streamed, "
                           f"no budget, codec zstd>")
        assert repr(pool) == "<vzstream.DevicePool on cpu, budget 64.0 MiB, 1 open session>"
    assert repr(s) == "<vzstream.Session LlamaForCausalLM on cpu, closed, no budget, codec zstd>"


def test_session_repr_shows_its_own_budget():
    s = vzstream.session(build_hf("llama"), device="cpu", vram_budget=0.5)
    assert "budget 50% of the device" in repr(s)


# -- item 8: s.device ----------------------------------------------------------------------------------

def test_session_device_is_where_inputs_go():
    model = build_hf("llama")
    ids, kwargs = hf_inputs()
    s = vzstream.session(model, device="cpu")
    with pytest.raises(vzstream.TraceError, match="`device` is known once the session is open"):
        s.device
    with s:
        assert s.device == torch.device("cpu")
        assert s.generate(ids.to(s.device), **kwargs).device == s.device
    assert s.device == torch.device("cpu")


# -- item 12: a non-module model ------------------------------------------------------------------------

class Pipeline:
    """Stands for a Hugging Face pipeline: not a module, but it holds one."""

    model = None


@pytest.mark.parametrize("model, got", [
    (lambda x: x, "function"), ({"weight": torch.zeros(2)}, "dict"), (Pipeline(), "Pipeline"),
], ids=["function", "state-dict", "pipeline"])
def test_a_model_that_is_no_module_is_a_type_error(model, got):
    with pytest.raises(vzstream.ModelTypeError, match=f"`model` must be a torch.nn.Module; got {got}") as info:
        vzstream.session(model, device="cpu")
    assert isinstance(info.value, TypeError) and not isinstance(info.value, vzstream.TraceError)
    assert ("`.model`" in str(info.value)) == isinstance(model, Pipeline)
