"""The decode probe behind `h100-2026-11-26-decode-probe.txt`: how the `hi`-plane decode scales
with threads and frame size, beside a busy Python thread (the forward thread's stand-in) at two
GIL switch intervals, and in forked processes. Run from the project root: `python3 docs/gpu-runs/decode_probe.py`.
Rates are GB/s of bf16 whose `hi` plane is decoded (the `lo` plane needs no decode)."""

import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from vzstream import codec, image
from vzstream.decode import decode_frame_into

print(subprocess.run("nproc; lscpu | grep -Ei 'model name|thread|core|socket|mhz|numa'", shell=True,
                     capture_output=True, text=True).stdout, flush=True)
print("affinity", len(os.sched_getaffinity(0)), "switchinterval", sys.getswitchinterval())
torch.manual_seed(0)
WEIGHTS = torch.randn(256 << 20, dtype=torch.bfloat16)      # 512 MiB of bf16
OUT = np.empty(WEIGHTS.numel(), np.uint8)                   # one hi plane
BF16 = 2 * WEIGHTS.numel()
FRAMES = {}
for mib in (1, 4, 16):
    t0 = time.perf_counter()
    codec.FRAME_NBYTES = mib << 20                          # the top plane's frames (image.py)
    FRAMES[mib] = image.pack_image([WEIGHTS], 512, lambda n: torch.empty(n, dtype=torch.uint8), "zstd")[0].frames
    print(f"pack frame {mib} MiB: {time.perf_counter() - t0:.2f} s, {len(FRAMES[mib])} frames", flush=True)


def decode(frame) -> None:
    decode_frame_into(frame, OUT[frame.start : frame.start + frame.nbytes])


def threads(frames, n: int, reps: int = 5) -> float:
    times = []
    with ThreadPoolExecutor(n) as pool:
        for _ in range(reps + 1):                           # the first is warm-up
            t0 = time.perf_counter()
            list(pool.map(decode, frames))
            times.append(time.perf_counter() - t0)
    return BF16 / statistics.median(times[1:]) / 1e9


def busy(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def child(args) -> float:
    indices, mib = args
    t0 = time.perf_counter()
    for i in indices:
        decode(FRAMES[mib][i])
    return time.perf_counter() - t0


def processes(mib: int, n: int, reps: int = 3) -> float:
    times = []
    with mp.get_context("fork").Pool(n) as pool:
        for _ in range(reps + 1):
            shares = [list(range(len(FRAMES[mib])))[i::n] for i in range(n)]
            t0 = time.perf_counter()
            pool.map(child, [(share, mib) for share in shares])
            times.append(time.perf_counter() - t0)
    return BF16 / statistics.median(times[1:]) / 1e9


print("GB/s of bf16 whose hi plane is decoded (threads):")
for mib in (1, 4, 16):
    print(f"  frame {mib:2d} MiB: " + "  ".join(f"{n}T {threads(FRAMES[mib], n):5.1f}" for n in (1, 2, 4, 8, 12, 15)),
          flush=True)
for mib in (1, 16):
    for interval in (0.005, 0.0005):
        sys.setswitchinterval(interval)
        stop = threading.Event()
        spinner = threading.Thread(target=busy, args=(stop,))
        spinner.start()
        rate = threads(FRAMES[mib], 8, reps=3)
        stop.set()
        spinner.join()
        print(f"  frame {mib:2d} MiB, 8T + busy python thread, switchinterval {interval}: {rate:5.1f}", flush=True)
sys.setswitchinterval(0.005)
print("processes (fork):")
for mib in (1, 16):
    print(f"  frame {mib:2d} MiB: " + "  ".join(f"{n}P {processes(mib, n):5.1f}" for n in (1, 4, 8, 15)), flush=True)
