"""`python -m vzstream bench gpu` without a GPU: it says so; and its whole harness (every method,
the wire bound, the budget sweep, the 8B rows, the files it writes, the verdicts) runs end to end
on a fake GPU, so that the one run a lent GPU allows is not lost to a Python error. Nothing here is
a number; the verdicts are checked on made-up rows."""

import gzip
import importlib.util
import json
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from vzstream.bench import gpu, models, targets
import fake_cuda

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


@NO_GPU
def test_bench_gpu_says_it_needs_a_gpu(capsys):
    assert gpu.main([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().out
    assert not torch.cuda.is_initialized()


def test_bench_gpu_quick_options():
    args = gpu.parse_args(["--quick", "--out", "results"])
    assert (args.layers, args.tokens, args.prefill, args.out) == (4, 8, (1, 128), "results")
    model = models.build_model(args.preset, layers=1)       # the --quick build, 1 layer: fast
    assert next(model.parameters()).dtype == torch.bfloat16
    assert models.prompt(model, *args.prefill).shape == args.prefill


def test_bench_gpu_run_keeps_every_row_as_it_is_measured(tmp_path, capsys):
    """A GPU run cut short must still leave what it measured: each row is printed and appended to
    gpu.rows.jsonl at once, a failing section becomes a row, and the run goes on."""
    run = gpu.Run(str(tmp_path))
    run.add({"model": "m", "method": "resident", "decode_tok_s": 12.5})
    with run.section("m", "vzstream prefetch=2"):
        raise RuntimeError("CUDA error: an illegal memory access")
    with run.section("m", "after"):
        run.add({"model": "m", "method": "after", "note": "ran"})
    args = gpu.parse_args(["--budget-s", "0"])
    assert not run.time_left(args, 60, "llama-3-8b", "-")
    assert not run.time_left(gpu.parse_args([]), 40, "m", "zstd", reserve_s=300)      # 330 s - 300 s kept < 40 s
    lines = [json.loads(line) for line in (tmp_path / "gpu.rows.jsonl").read_text().splitlines()]
    assert lines == run.rows and [r["method"] for r in lines] == ["resident", "vzstream prefetch=2", "after", "-", "zstd"]
    assert lines[1]["note"] == "failed: RuntimeError: CUDA error: an illegal memory access"
    assert lines[3]["note"].startswith("skipped: under 60 s")
    assert lines[4]["note"] == "skipped: under 40 s of --budget-s left beyond the 300 s kept for llama-3-8b"
    out = capsys.readouterr().out
    assert "decode_tok_s=12.5" in out and "Traceback" in out


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda as the benchmark uses it, on CPU (see fake_cuda.fake_gpu); the 8B rows on a
    small stand-in, and no pinned or device buffers for the bandwidth measurements."""
    fakes = fake_cuda.fake_gpu(monkeypatch)
    monkeypatch.setattr(gpu, "measure_pcie", lambda nbytes: 25.0)      # pin_memory needs a GPU
    monkeypatch.setattr(gpu, "measure_merge", lambda nbytes: 500.0)    # so do device tensors
    real_build = models.build_model

    def small_build(name, device=None, **kwargs):    # on the CPU; the 8B rows on a model that fits CI
        return real_build("small", layers=kwargs.get("layers") or 2) if name == "llama-3-8b" else real_build(name, **kwargs)

    monkeypatch.setattr(gpu, "build_model", small_build)
    return fakes


def test_bench_gpu_harness_runs_end_to_end_on_a_fake_gpu(fake_gpu, tmp_path, capsys):
    args = ["--quick", "--preset", "small", "--prefetch", "1", "2", "--out", str(tmp_path)]
    assert gpu.main(args) == 0
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == [
        "resident", "vzstream prefetch=1 codec=auto", "vzstream prefetch=2 codec=auto", targets.DIFFUSERS_FAIR,
        targets.DIFFUSERS_TODAY, targets.ACCELERATE, "vzstream prefetch=2 codec=zstd", targets.DFLOAT11]
    resident = by["resident"]
    assert resident["tokens_equal"] is True and resident["decode_wire_frac"] == "" and resident["wire_gib_per_pass"] == 0
    streamed = [r for r in rows if r["method"].startswith("vzstream")]
    for r in streamed:
        assert r["tokens_equal"] is True and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert isinstance(r["decode_wire_frac"], float) and isinstance(r["prefill_wire_frac"], float)
        assert r["wire_gib_per_pass"] > 0 and r["host_above_idle_gib"] > 0
    # codec="auto" is nibble on the (fake) CUDA backend: a quarter less crosses PCIe than with
    # zstd, which uploads what host threads decoded (W_dec, in its note) at full size.
    auto, zstd = by["vzstream prefetch=2 codec=auto"], by["vzstream prefetch=2 codec=zstd"]
    assert re.fullmatch(r"codec nibble, 3 units resident, stall \d+%, ratio 1\.\d+", auto["note"]), auto["note"]
    assert re.match(r"codec zstd, 3 units resident, .*, W_dec [\d.]+ GB/s$", zstd["note"]), zstd["note"]
    assert 0.6 < auto["wire_gib_per_pass"] / zstd["wire_gib_per_pass"] < 0.8
    # The baselines ran, or say why not; on the fake GPU an installed one fails for want of CUDA.
    for method, module in ((targets.DIFFUSERS_FAIR, "diffusers"), (targets.DIFFUSERS_TODAY, "diffusers"),
                           (targets.ACCELERATE, "accelerate")):
        if importlib.util.find_spec(module) is None:
            assert by[method]["note"] == f"skipped: No module named '{module}'", by[method]
        else:
            # torch's own "no GPU here" (its wording differs between CPU and CUDA builds), not a
            # TypeError or the like from the baseline's call
            assert "decode_tok_s" in by[method] or re.match(
                r"failed: (RuntimeError|AssertionError|ValueError): .*(CUDA|NVIDIA)", by[method]["note"]), by[method]
    assert by[targets.DFLOAT11]["note"].startswith("skipped: ")       # never a failed row, never a crash
    assert [json.loads(line) for line in (tmp_path / "gpu.rows.jsonl").read_text().splitlines()] == rows
    sweep = json.loads((tmp_path / "gpu_budget.json").read_text())["rows"]
    assert [json.loads(line) for line in (tmp_path / "gpu_budget.rows.jsonl").read_text().splitlines()] == sweep
    assert sweep and all(r["tokens_equal"] is True for r in sweep)
    assert sweep[-1]["streamed_mib_per_pass"] == 0                     # the last point: all resident
    config = json.loads((tmp_path / "gpu.config.json").read_text())
    assert config["pcie_gbps"] == 25.0 and config["small (4 layers), resident"]["decode_s_per_pass"] > 0
    assert config["elapsed_s"] > 0 and (tmp_path / "gpu.md").read_text().startswith("# bench gpu")
    # The run ends with one verdict per target; what did not run (no 8B with --quick, baselines
    # missing or failing here) is NOT MEASURED with its reason.
    verdicts = json.loads((tmp_path / "gpu_targets.json").read_text())["rows"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[-len(verdicts):] == targets.verdict_lines(verdicts) and len(verdicts) == 8
    assert all(line.startswith("VERDICT ") for line in lines[-8:])
    got = {v["target"]: (v["verdict"], v["detail"]) for v in verdicts}
    assert got["llama-3-8b under 4 GiB >= 4.5 tok/s"] == (
        "NOT MEASURED", "no vzstream row for llama-3-8b: not run, or not reached")
    assert got["small (4 layers) streamed decode >= 90% of wire bound"][0] in ("PASS", "FAIL")
    assert got["small (4 layers) 1x128 prefill streamed <= 1.10x resident time"][0] in ("PASS", "FAIL")
    if importlib.util.find_spec("diffusers") is None:
        assert got["small (4 layers) host RAM <= 0.8x fair diffusers"] == (
            "NOT MEASURED", f"{targets.DIFFUSERS_FAIR}: skipped: No module named 'diffusers'")
    failed = [r["method"] for r in rows if r.get("note", "").startswith("failed")]   # a failed row is no proof
    assert got["bit-exact tokens in every row"] == (
        ("NOT MEASURED", "failed before comparing tokens: " + ", ".join(f"small (4 layers) {m}" for m in failed))
        if failed else ("PASS", f"{len(streamed) + 1} of {len(streamed) + 1} rows"))
    # A run killed before its end leaves the rows it measured: the same verdicts, read off them.
    assert targets.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == targets.verdict_lines(verdicts)

    script = Path(__file__).parent.parent / "docs" / "probes" / "read_trace.py"    # what a GPU session reads traces with
    for name, stages in (("trace_prefetch1_auto", {"upload", "bind", "release"}),    # nibble: uploads only
                         ("trace_prefetch2_zstd", {"decode", "upload", "bind", "release"})):
        path = tmp_path / f"{name}.json.gz"
        trace = json.loads(gzip.decompress(path.read_bytes()))                      # the profiler's
        assert any(e.get("name", "").startswith("vzstream.upload:") for e in trace["traceEvents"])
        reader = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=60)
        assert reader.returncode == 0, reader.stderr
        summary = json.loads(reader.stdout.splitlines()[-1])
        assert stages <= set(summary["stages"]) and summary["span_ms"] > 0

    calls = []
    assert gpu.event_time_s(lambda: calls.append(1), repeat=3) == 1e-3 and len(calls) == 4   # warm-up + 3

    run, args = gpu.Run(None), gpu.parse_args(["--quick"])       # the 8B section, on a stand-in model
    args.pcie_gbps = 25.0
    gpu.bench_8b(run, args)
    assert [r["method"] for r in run.rows] == [
        "resident", "vzstream prefetch=2 vram_budget=4GiB activation_reserve=0.00GiB"]
    assert run.rows[1]["tokens_equal"] is True and run.rows[1]["model"] == "llama-3-8b"


def _case(layers=1):
    model = models.build_model("small", layers=layers)
    return gpu.make_case("small", layers, model, gpu.parse_args(["--quick"])), model


def test_an_optional_baseline_fails_as_a_skipped_row(fake_gpu, monkeypatch):
    """DFloat11 is optional: whatever goes wrong (a missing package, cupy without a driver, its
    encoder too slow for the time left) is a skipped row with the reason, never a crash."""
    case, _ = _case()
    run, args = gpu.Run(None), gpu.parse_args(["--quick"])
    monkeypatch.setitem(sys.modules, "fake_df11", types.ModuleType("fake_df11"))

    def broken(model, args, case):
        raise RuntimeError("cupy: no CUDA driver")

    gpu.baseline(run, case, targets.DFLOAT11, "fake_df11", broken, args, optional=True)
    gpu.baseline(run, case, targets.DFLOAT11, "no_such_module_here", broken, args, optional=True)
    gpu.baseline(run, case, targets.ACCELERATE, "fake_df11", broken, args)                  # not optional
    assert [r["note"] for r in run.rows] == ["skipped: RuntimeError: cupy: no CUDA driver",
                                             "skipped: No module named 'no_such_module_here'",
                                             "failed: RuntimeError: cupy: no CUDA driver"]


def test_dfloat11_is_skipped_when_its_encoder_would_outrun_the_budget(fake_gpu, monkeypatch):
    """dfloat11's `compress_model` encodes in a Python loop per weight (~an hour for tinyllama):
    timed on a sample first, and refused with the estimate rather than run past the budget."""
    package, utils = types.ModuleType("dfloat11"), types.ModuleType("dfloat11.dfloat11_utils")
    package.DFloat11Model = None
    package.compress_model = lambda *a, **k: pytest.fail("compressed although the estimate is over the budget")
    utils.get_codec = lambda weights: (None, {})
    utils.get_32bit_codec = lambda counter: (None, counter, None)
    utils.encode_weights = lambda weights, codec, bytes_per_thread, threads: time.sleep(0.05)
    monkeypatch.setitem(sys.modules, "dfloat11", package)
    monkeypatch.setitem(sys.modules, "dfloat11.dfloat11_utils", utils)
    case, model = _case()
    with pytest.raises(RuntimeError, match=r"would need ~\d+ s for 0\.00 G weights; 0 s of --budget-s to spare"):
        gpu.run_dfloat11(model, gpu.parse_args(["--quick"]), case, spare_s=-5.0)


def test_verdicts_read_the_best_row_for_each_target():
    def r(method, tok_s, frac=0.5, prefill=100.0, ram=1.0, model="m", **extra):
        return dict(model=model, method=method, decode_tok_s=tok_s, decode_wire_frac=frac, prefill_tok_s=prefill,
                    host_above_idle_gib=ram, tokens_equal=True, **extra)

    rows = [r("resident", 60.0, "", 200.0),
            r("vzstream prefetch=1 codec=auto", 30.0, 0.95, 190.0, ram=1.4),
            r("vzstream prefetch=4 codec=auto", 35.0, 0.85, 150.0, ram=1.5),        # the fastest
            r(targets.DIFFUSERS_TODAY, 15.0), r(targets.DIFFUSERS_FAIR, 25.0, ram=2.0), r(targets.ACCELERATE, 3.0),
            r("vzstream prefetch=2 vram_budget=4GiB", 5.0, model="llama-3-8b", peak_vram_gib=3.8),
            r("vzstream prefetch=1 codec=auto", 999.0, 1.0, model="other")]          # another model's: ignored
    got = {v["target"]: (v["verdict"], v["detail"]) for v in targets.verdicts(rows, "m", (4, 1024))}
    assert got == {
        "m streamed decode >= 90% of wire bound": ("PASS", "95%, vzstream prefetch=1 codec=auto"),
        "m >= 2x diffusers as configured today": ("PASS", "2.33x: 35 vs 15 tok/s, vzstream prefetch=4 codec=auto"),
        "m >= 1.25x fair diffusers": (
            "PASS", "1.40x: 35 vs 25 tok/s, vzstream prefetch=4 codec=auto"),
        "m >= 10x accelerate": ("PASS", "11.67x: 35 vs 3 tok/s, vzstream prefetch=4 codec=auto"),
        "llama-3-8b under 4 GiB >= 4.5 tok/s": ("PASS", "5.00 tok/s, peak VRAM 3.80 GiB"),
        "m 4x1024 prefill streamed <= 1.10x resident time": ("PASS", "1.05x, vzstream prefetch=1 codec=auto"),
        "m host RAM <= 0.8x fair diffusers": (
            "PASS", "0.75x: 1.50 vs 2.00 GiB above idle, vzstream prefetch=4 codec=auto"),
        "bit-exact tokens in every row": ("PASS", "8 of 8 rows")}
    assert targets.verdict_lines(targets.verdicts(rows, "m"))[0] == (
        "VERDICT m streamed decode >= 90% of wire bound: PASS (95%, vzstream prefetch=1 codec=auto)")

    # What did not run is NOT MEASURED, with the note of the row that stands in for it.
    rows[4] = dict(model="m", method=targets.DIFFUSERS_FAIR, note="skipped: No module named 'diffusers'")
    rows[6] = dict(model="llama-3-8b", method="-", note="skipped: under 120 s of --budget-s left")
    rows[5]["decode_tok_s"] = 4.0                                                   # only 8.75x now
    rows[2]["tokens_equal"] = False
    got = {v["target"]: (v["verdict"], v["detail"]) for v in targets.verdicts(rows, "m")}
    fair = f"{targets.DIFFUSERS_FAIR}: skipped: No module named 'diffusers'"
    assert got["m >= 1.25x fair diffusers"] == ("NOT MEASURED", fair)
    assert got["m host RAM <= 0.8x fair diffusers"] == ("NOT MEASURED", fair)
    assert got["llama-3-8b under 4 GiB >= 4.5 tok/s"] == ("NOT MEASURED", "-: skipped: under 120 s of --budget-s left")
    assert got["m >= 10x accelerate"][0] == "FAIL"
    assert got["bit-exact tokens in every row"] == ("FAIL", "tokens differ: m vzstream prefetch=4 codec=auto")
    rows[2]["tokens_equal"] = True
    rows.append(dict(model="m", method="vzstream prefetch=2 codec=zstd", note="failed: RuntimeError: boom"))
    got = {v["target"]: (v["verdict"], v["detail"]) for v in targets.verdicts(rows, "m")}
    assert got["bit-exact tokens in every row"] == (
        "NOT MEASURED", "failed before comparing tokens: m vzstream prefetch=2 codec=zstd")
    assert {v["verdict"] for v in targets.verdicts([], "m")} == {"NOT MEASURED"}           # nothing ran at all
