"""`import vzstream` stays lean: it never initialises CUDA and never imports transformers,
and neither does running a CPU session. Each check runs in a fresh interpreter."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_isolated(code: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_import_does_not_initialise_cuda_or_import_transformers():
    run_isolated("""
        import sys
        import vzstream
        import torch
        assert not torch.cuda.is_initialized(), "import vzstream initialised CUDA"
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "vzstream.backends.cuda"))
        assert "transformers" not in sys.modules, leaked
        assert "vzstream.backends.cuda" not in sys.modules, "the CUDA backend is imported only on demand"
    """)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_session_does_not_initialise_cuda_or_import_transformers(device):
    run_isolated(f"""
        import sys
        import torch
        import vzstream
        if {device!r} == "auto" and torch.cuda.is_available():
            sys.exit(0)                      # auto picks CUDA on a GPU machine: nothing to check
        model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])
        with vzstream.session(model, device={device!r}, prefetch=1) as s:
            s(torch.randn(2, 8))
            s(torch.randn(2, 8))
        assert not torch.cuda.is_initialized()
        assert "transformers" not in sys.modules
    """)
