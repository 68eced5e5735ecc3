"""The command line: the demo (the main job) runs and reports identical tokens; inspect prints
the plan; bad commands get the usage line and exit 2."""

import pytest

from vzstream.__main__ import main


@pytest.mark.parametrize("codec", ["zstd", "nibble"])
def test_demo_small_reports_identical_tokens(codec, capsys):
    assert main(["demo", "--device", "cpu", "--tokens", "4", "--codec", codec]) == 0
    out = capsys.readouterr().out
    assert "tokens identical to the resident run: yes" in out and f"codec={codec}" in out
    assert "weights in host RAM" in out and "tokens/s" in out


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
