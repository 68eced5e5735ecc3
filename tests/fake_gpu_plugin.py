"""Run the GPU-only tests on the CPU, against the fake GPU of `fake_cuda.fake_gpu`, to find the
Python errors in them before a lent GPU's minutes are spent on it:

    PYTHONPATH=tests python -m pytest tests/cuda -p fake_gpu_plugin

What only a GPU can answer fails here by design: allocator statistics read 0 and arenas are not
pinned (`test_peak_device_memory_below_resident`, `test_arenas_pinned_while_open_and_unpinned_after`,
`test_budget_accounting_matches_the_allocator`'s last checks). Every other failure is a bug. A
pass proves less than on a GPU: the synchronisation tests see no CUDA call to count here, and
exactness holds on the CPU by construction; what this run proves is that the tests' own code runs.
"""

import pytest

import fake_cuda

_patch = pytest.MonkeyPatch()


def pytest_configure(config):
    fake_cuda.fake_gpu(_patch)          # before collection: the `cuda` marker's skip asks is_available()


def pytest_unconfigure(config):
    _patch.undo()
