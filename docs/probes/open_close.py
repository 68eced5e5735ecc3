"""How long opening and leaving a session take, and the host RAM leaving needs: tinyllama-1.1b
(random init, bf16) on the CPU backend, each codec in turn, one forward of 4 tokens between.
Opening packs every block; leaving decodes every streamed parameter back (checking its crc32)
into fresh memory. RSS is sampled every 5 ms while opening and while leaving.

    python docs/probes/open_close.py [--preset NAME] [--repeat N] [--codecs zstd,nibble]
"""

import argparse
import threading
import time

import psutil
import torch

import vzstream
from vzstream.bench.models import build_model

MIB = 2**20


def peak_rss_during(fn) -> tuple[float, int]:
    """(seconds `fn()` took, the largest RSS seen meanwhile)."""
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    return seconds, peak[0]


parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="tinyllama-1.1b")
parser.add_argument("--repeat", type=int, default=1)
parser.add_argument("--codecs", default="zstd,nibble", help="comma-separated, in the order run")
args = parser.parse_args()
model = build_model(args.preset)
ids = torch.tensor([[1, 2, 3, 4]])
for _ in range(args.repeat):
    for codec in args.codecs.split(","):
        loaded = psutil.Process().memory_info().rss
        s = vzstream.session(model, device="cpu", codec=codec)
        open_s, open_peak = peak_rss_during(s.open)
        s(ids)
        held = psutil.Process().memory_info().rss
        leave_s, leave_peak = peak_rss_during(s.close)
        print(f"{args.preset} {codec}: open {open_s:.2f} s, leave {leave_s:.2f} s; RSS MiB: model {loaded / MIB:.0f}, "
              f"peak while opening {open_peak / MIB:.0f}, session open {held / MIB:.0f}, "
              f"peak while leaving {leave_peak / MIB:.0f}")
