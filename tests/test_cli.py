"""The command line (issue 18, items 1-4): the demo runs and reports identical tokens; inspect
prints the plan; a user error is one line on stderr and exit 2, found before any model is built;
a directory keeps its dtype and, with a tokenizer, shows text; `--version` is the package's."""

from importlib import metadata

import pytest
from models import PROMPT, save_tiny_llama

import vzstream
import vzstream.backends
import vzstream.cli
from vzstream.__main__ import main


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a model gets built: the error had to come first."""
    def build(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")
    monkeypatch.setattr(vzstream.cli, "build_model", build)


def error_line(capsys) -> str:
    """The one stderr line a user error prints (and nothing on stdout)."""
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vzstream: error: "), captured.err
    assert "Traceback" not in captured.err and "building" not in captured.out + captured.err
    return lines[0]


@pytest.mark.parametrize("codec", ["zstd", "nibble"])
def test_demo_small_reports_identical_tokens(codec, capsys):
    assert main(["demo", "--device", "cpu", "--tokens", "4", "--codec", codec]) == 0
    out = capsys.readouterr().out
    assert "tokens identical to the resident run: yes" in out and f"codec={codec}" in out
    assert "building small (random init, seed 0, bfloat16)" in out and "tokens/s" in out
    assert "peak" in out and "during the streamed run" in out and "vzstream holds" in out


def test_inspect_prints_the_plan_under_a_budget(capsys):
    assert main(["inspect", "--preset", "small", "--vram-budget", "48MiB"]) == 0
    out = capsys.readouterr().out
    assert "budget 48.0 MiB" in out
    assert "resident: fits in the budget" in out and "streamed:" in out


@pytest.mark.parametrize("argv", [[], ["bogus"], ["bench", "nope"]], ids=["none", "unknown", "unknown-bench"])
def test_bad_command_prints_usage(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "usage: python -m vzstream" in captured.out + captured.err


# -- item 1 and 2: one line, exit 2, before any model is built --------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["demo", "--codec", "lz4"], "`codec` must be one of"),
    (["demo", "--device", "gpu"], "`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'gpu'"),
    (["demo", "--prefetch", "-1"], "`prefetch` must be an int in [0, 64]"),
    (["demo", "--units", "layers"], "`units` must be 'blocks', 'leaves'"),
    (["demo", "--tokens", "many"], "argument --tokens: invalid int value: 'many'"),
    (["demo", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["inspect", "--vram-budget", "lots"], "`vram_budget` must be a size"),
    (["inspect", "--codec", "lz4"], "`codec` must be one of"),
    (["inspect", "not-a-preset"], "`--preset` must be one of small"),
], ids=["codec", "device", "prefetch", "units", "tokens", "dtype", "budget-size", "inspect-codec", "preset"])
def test_a_bad_option_is_one_line_before_any_model_is_built(argv, says, no_build, capsys):
    assert main(argv) == 2
    assert says in error_line(capsys)


def test_demo_on_cuda_without_cuda_says_backend_unavailable(monkeypatch, no_build, capsys):
    monkeypatch.setattr(vzstream.backends, "cuda_available", lambda: False)
    assert main(["demo", "--device", "cuda"]) == 2
    assert "`device`='cuda' needs a CUDA GPU" in error_line(capsys)


def test_an_impossible_budget_found_at_open_is_one_line(capsys):
    assert main(["inspect", "--preset", "small", "--vram-budget", "30MiB"]) == 2
    assert "`vram_budget` of 31457280 bytes (30.0 MiB) cannot hold" in capsys.readouterr().err.splitlines()[-1]


def test_verbose_shows_the_traceback(no_build):
    with pytest.raises(vzstream.ConfigError, match="got 'gpu'"):
        main(["demo", "--device", "gpu", "--verbose"])


# -- item 3: the messages say what happened ----------------------------------------------------------

@pytest.mark.parametrize("path", ["/nonexistent", "./no/such/dir"])
def test_inspect_of_a_missing_directory_says_so(path, no_build, capsys):
    assert main(["inspect", path]) == 2
    line = error_line(capsys)
    assert f"`MODEL` {path!r}: no such directory" in line and "preset" in line


def test_a_directory_without_config_is_not_a_model(tmp_path, no_build, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "has no config.json" in error_line(capsys)


def test_demo_of_a_directory_keeps_its_dtype_and_prints_text(llama_dir, capsys):
    assert main(["demo", llama_dir, "--device", "cpu", "--tokens", "3", "--prompt", PROMPT]) == 0
    out = capsys.readouterr().out
    assert f"loading {llama_dir} (in its checkpoint dtype)" in out
    assert "in float32" in out and "streamed float32" in out       # saved in fp32, not cast to bf16
    text = next(line for line in out.splitlines() if line.startswith("text: "))
    assert text.startswith(f"text: '{PROMPT} ") and len(text.split()) == len(PROMPT.split()) + 1 + 3
    assert "tokens identical to the resident run: yes" in out


def test_demo_dtype_casts_a_directory(tmp_path, capsys):
    model_dir = str(save_tiny_llama(tmp_path, tokenizer=False))
    assert main(["demo", model_dir, "--device", "cpu", "--tokens", "2", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert f"loading {model_dir} (bfloat16)" in out and "in bfloat16" in out
    assert "text: " not in out                                       # no tokenizer: random ids, no text
    assert "tokens identical to the resident run: yes" in out


def test_demo_of_a_packed_file(tmp_path, capsys):
    """Issue 16: the demo (and every bench, through `build_model`) takes a packed file too."""
    from models import build_hf

    vzstream.save(build_hf("llama"), tmp_path / "packed")
    assert main(["demo", str(tmp_path / "packed"), "--device", "cpu", "--tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "in bfloat16" in out and "tokens identical to the resident run: yes" in out


# -- item 4 --------------------------------------------------------------------------------------------

def test_version_is_the_package_metadata(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"vzstream {vzstream.__version__}\n"
    assert vzstream.__version__ == metadata.version("vzstream")
