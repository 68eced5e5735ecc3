"""How long opening and leaving a session take: tinyllama-1.1b (random init, bf16) on the CPU
backend, each codec, one forward of 4 tokens between. Opening packs every block; leaving
decodes every streamed parameter back (checking its crc32) into fresh memory.

    python docs/probes/open_close.py [--preset NAME] [--repeat N]
"""

import argparse
import time

import torch

import vzstream
from vzstream.bench.models import build_model

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="tinyllama-1.1b")
parser.add_argument("--repeat", type=int, default=1)
args = parser.parse_args()
model = build_model(args.preset)
ids = torch.tensor([[1, 2, 3, 4]])
for _ in range(args.repeat):
    for codec in ("zstd", "nibble"):
        t0 = time.perf_counter()
        s = vzstream.session(model, device="cpu", codec=codec)
        s.open()
        t1 = time.perf_counter()
        s(ids)
        t2 = time.perf_counter()
        s.close()
        t3 = time.perf_counter()
        print(f"{args.preset} {codec}: open {t1 - t0:.2f} s, first call {t2 - t1:.2f} s, leave {t3 - t2:.2f} s")
