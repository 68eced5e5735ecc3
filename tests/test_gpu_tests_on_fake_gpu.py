"""The GPU-only tests (`tests/cuda/`) run here against the fake GPU (`fake_gpu_plugin.py`), so a
Python error in them shows in CI, not in the few minutes of a lent GPU. The three tests that read
what only a GPU has (allocator statistics, pinned pages) are left out; everything else must pass."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
NEEDS_A_REAL_GPU = ["test_peak_device_memory_below_resident", "test_arenas_pinned_while_open_and_unpinned_after",
                    "test_budget_accounting_matches_the_allocator"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, tests/cuda runs for real")
def test_gpu_tests_pass_on_the_fake_gpu():
    deselect = [f"--deselect=tests/cuda/test_cuda_backend.py::{name}" for name in NEEDS_A_REAL_GPU]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(TESTS), os.environ.get("PYTHONPATH")] if p))
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/cuda", "-p", "fake_gpu_plugin", "-q",
                           "-p", "no:cacheprovider", *deselect], cwd=TESTS.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
