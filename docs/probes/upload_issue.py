"""Who should issue an upload's torch calls: a worker, or the forward thread itself? (CPU; no GPU.)

An upload is a few dozen torch calls (copies, event records and waits, a gather, a merge), each
of which hands the GIL over. The forward thread runs model Python between its own torch calls.
A worker issuing the upload must win the GIL back after each call, and the forward thread gives
it up only when CPython's switch interval (vzstream sets 0.1 ms during streamed calls) forces it.
This times both, on small CPU tensor copies standing in for the upload's calls:

- "worker": a second thread issues CALLS copies per unit while the main thread runs a stand-in
  forward (Python work with a small torch op every ~20 us): ms per unit issued on the worker.
- "caller": the main thread issues the same copies itself between its own work: the ms it adds.

    python docs/probes/upload_issue.py
"""

import statistics
import sys
import threading
import time

import torch

CALLS = 36          # ~9 calls per merge batch, 4 batches per tinyllama block (codec="nibble")
UNITS = 22
INTERVAL = 1e-4     # vzstream's gil_switch_interval default


def issue(pairs) -> None:
    for dst, src in pairs:
        dst.copy_(src)


def forward_step(x: torch.Tensor) -> float:
    """~20 us of Python, then a small torch op: a stand-in for model code at batch 1."""
    acc = 0.0
    for i in range(300):
        acc += i * 0.5
    x.add_(1)
    return acc


def run_worker(pairs, x) -> float:
    times, done = [], threading.Event()

    def uploader():
        for _ in range(UNITS):
            t0 = time.perf_counter()
            issue(pairs)
            times.append(time.perf_counter() - t0)
        done.set()

    worker = threading.Thread(target=uploader)
    worker.start()
    while not done.is_set():
        forward_step(x)
    worker.join()
    return statistics.median(times) * 1e3


def run_caller(pairs, x) -> float:
    steps = 50
    t0 = time.perf_counter()
    for _ in range(UNITS):
        for _ in range(steps):
            forward_step(x)
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(UNITS):
        for _ in range(steps):
            forward_step(x)
        issue(pairs)
    with_uploads = time.perf_counter() - t0
    return (with_uploads - plain) / UNITS * 1e3


def main() -> None:
    torch.set_num_threads(1)
    pairs = [(torch.empty(256, dtype=torch.uint8), torch.ones(256, dtype=torch.uint8)) for _ in range(CALLS)]
    x = torch.zeros(16)
    saved = sys.getswitchinterval()
    sys.setswitchinterval(INTERVAL)
    try:
        for _ in range(3):
            print(f"{CALLS} calls per unit, switch interval {INTERVAL * 1e3:.1f} ms: worker issues them in "
                  f"{run_worker(pairs, x):.2f} ms per unit; the caller adds {run_caller(pairs, x):.3f} ms per unit")
    finally:
        sys.setswitchinterval(saved)


if __name__ == "__main__":
    main()
