"""Issue 14's forward-thread target on the fake GPU: the cost a streamed unit adds per pass, as a
ratio to one resident block, measured in the same run (resident and streamed passes alternate,
each side's median). `bench session` prints the same ratio for the CPU backend; this runs the
real CudaBackend over `tests/fake_cuda.py`'s FakeCuda, whose streams and events are Python.

    python docs/probes/overhead_fake_gpu.py [blocks]
"""

import statistics
import sys
import time
from pathlib import Path

import torch

import vzstream
from vzstream.backends.cuda import CudaBackend
from vzstream.bench.session import _Tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from fake_cuda import FakeCuda  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(blocks: int = 200, rounds: int = 150) -> None:
    torch.manual_seed(0)
    streamed, resident = _Tiny(blocks).to(torch.bfloat16).eval(), _Tiny(blocks).to(torch.bfloat16).eval()
    x = torch.randn(1, 8, dtype=torch.bfloat16)
    with vzstream.session(streamed, backend=CudaBackend("cpu", cuda=FakeCuda()), prefetch=2) as s, torch.no_grad():
        for _ in range(3):
            s(x), resident(x)
        pairs = [(timed(lambda: resident(x)), timed(lambda: s(x))) for _ in range(rounds)]
    t_res, t_str = (statistics.median(p[i] for p in pairs) for i in (0, 1))
    per_unit = (t_str - t_res) / blocks
    print(f"fake GPU, {blocks} x Linear(8,8): {1e6 * per_unit:.1f} us/unit/pass = "
          f"{per_unit / (t_res / blocks):.2f}x one resident block (resident pass {1e3 * t_res:.2f} ms)")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
