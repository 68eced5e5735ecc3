"""Decode scaling probe: threads vs processes, frame sizes, a busy Python thread beside."""
import os, sys, time, threading, statistics, subprocess, multiprocessing as mp
from concurrent.futures import ThreadPoolExecutor
import numpy as np, torch
from vzstream import codec

print(subprocess.run("nproc; lscpu | grep -Ei 'model name|thread|core|socket|mhz|numa'", shell=True,
                     capture_output=True, text=True).stdout, flush=True)
print("affinity", len(os.sched_getaffinity(0)), "switchinterval", sys.getswitchinterval())
torch.manual_seed(0)
t = torch.randn(256 << 20, dtype=torch.bfloat16)       # 512 MiB of bf16
OUT = np.empty(t.numel(), np.uint8)                     # one hi plane
P = {}
for fm in (1, 4, 16):
    t0 = time.perf_counter(); p = codec.pack(t, frame_nbytes=fm << 20)
    P[fm] = [pl for pl in p.planes if pl.index == 1][0].frames
    print(f"pack frame {fm} MiB: {time.perf_counter()-t0:.2f} s, {len(P[fm])} frames", flush=True)
BF16 = 2 * t.numel()

def dec(f): codec.decode_frame_into(f, OUT[f.start:f.start + f.nbytes])

def threads(frames, n, reps=5):
    ts = []
    with ThreadPoolExecutor(n) as pool:
        for _ in range(reps + 1):
            t0 = time.perf_counter(); list(pool.map(dec, frames)); ts.append(time.perf_counter() - t0)
    return BF16 / statistics.median(ts[1:]) / 1e9

stop = [False]
def busy():
    x = 0
    while not stop[0]: x += 1

def child(args):
    frames_idx, fm, n = args
    fr = P[fm]; t0 = time.perf_counter()
    for i in frames_idx: dec(fr[i])
    return time.perf_counter() - t0

def procs(fm, n, reps=3):
    ts = []
    with mp.get_context("fork").Pool(n) as pool:
        for _ in range(reps + 1):
            idx = [list(range(len(P[fm])))[i::n] for i in range(n)]
            t0 = time.perf_counter(); pool.map(child, [(ix, fm, n) for ix in idx]); ts.append(time.perf_counter() - t0)
    return BF16 / statistics.median(ts[1:]) / 1e9

print("GB/s of bf16 whose hi plane is decoded (threads):")
for fm in (1, 4, 16):
    print(f"  frame {fm:2d} MiB: " + "  ".join(f"{n}T {threads(P[fm], n):5.1f}" for n in (1, 2, 4, 8, 12, 15)), flush=True)
for fm in (1, 16):
    for si in (0.005, 0.0005):
        sys.setswitchinterval(si); stop[0] = False; th = threading.Thread(target=busy); th.start()
        r = threads(P[fm], 8, reps=3); stop[0] = True; th.join()
        print(f"  frame {fm:2d} MiB, 8T + busy python thread, switchinterval {si}: {r:5.1f}", flush=True)
sys.setswitchinterval(0.005)
print("processes (fork):")
for fm in (1, 16):
    print(f"  frame {fm:2d} MiB: " + "  ".join(f"{n}P {procs(fm, n):5.1f}" for n in (1, 4, 8, 15)), flush=True)
