"""`raw_fraction`: which streamed units stay uncompressed, and for "auto" how large that share
is: measure how fast this host decodes and the device uploads, and keep raw the share of
streamed bytes that balances the two (DESIGN §9).

Streaming runs at the slower of PCIe (W_pcie) and the workers' decode rate (W_dec). A unit kept
uncompressed skips the decode but costs host RAM; keeping a share f raw makes a pass take
max(B / W_pcie, (1 - f) B / W_dec), which is least, with the least host RAM, at f = 1 - W_dec /
W_pcie. Both rates are in the same bytes: a unit's raw bytes per second.
"""

from __future__ import annotations

import itertools
import math
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import codec

_local = threading.local()


def balanced_fraction(decode_gbps: float | None, upload_gbps: float | None) -> float:
    """The share of streamed bytes to keep raw so decoding the rest takes as long as uploading
    all of it: 1 - W_dec / W_pcie, rounded to 0.01; 0 when the CPU keeps up or a rate is unknown."""
    if not decode_gbps or not upload_gbps or decode_gbps >= upload_gbps:
        return 0.0
    return round(1 - decode_gbps / upload_gbps, 2)


def raw_units(units, fraction: float, keep=()) -> set[int]:
    """Indices of the units kept uncompressed: about `fraction` of the bytes, spread evenly along
    `units` (every other one at 0.5), so that decoding and uploading both run all along a pass.
    Units whose index is in `keep` stay compressed; they are counted first, so the others make
    up their share wherever they sit."""
    raw, seen, kept = set(), 0, 0
    for u in sorted(units, key=lambda u: u.index not in keep):     # stable: keeps the order
        seen += u.raw_nbytes
        if u.index not in keep and kept + u.raw_nbytes / 2 <= fraction * seen:
            raw.add(u.index)
            kept += u.raw_nbytes
    return raw


def decode_gbps(stores, workers: int, rounds: int = 3, max_nbytes: int | None = 256 << 20) -> float | None:
    """Raw GB/s at which `workers` threads decode the compressed frames of `stores` (None: no
    frame), each into a frame-sized buffer of its own. A round decodes the frames (the first
    `max_nbytes` of output of them; None: all), repeated until each worker has ~4 (so a one-unit
    sample still loads every thread); the median of `rounds`, after a warm-up round. Raw bytes
    per decoded byte are the stores' own (2 for bf16 with a raw `lo` plane). Timed with the host
    otherwise idle: in a session the forward thread competes for the GIL."""
    frames = [f for s in stores for pk in s.packed for pl in pk.planes for f in pl.frames]
    if not frames:
        return None
    raw_per_byte = sum(s.raw_nbytes for s in stores) / sum(f.nbytes for f in frames)
    ends = itertools.accumulate(f.nbytes for f in frames)
    frames = [f for f, end in zip(frames, ends) if max_nbytes is None or end - f.nbytes < max_nbytes]
    tasks = frames * math.ceil(4 * workers / len(frames))
    raw = raw_per_byte * sum(f.nbytes for f in tasks)     # what a round makes ready to upload
    largest = max(f.nbytes for f in frames)
    times = []
    with ThreadPoolExecutor(workers, thread_name_prefix="vzstream-calibrate") as pool:
        for _ in range(rounds + 1):                       # the first round is warm-up
            t0 = time.perf_counter()
            for _ in pool.map(lambda f: codec.decode_frame_into(f, _scratch(largest)[: f.nbytes]), tasks):
                pass
            times.append(time.perf_counter() - t0)
    return raw / statistics.median(times[1:]) / 1e9


def _scratch(nbytes: int) -> np.ndarray:
    """One frame-sized output buffer per thread: what a decode writes, not where, is measured."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _local.buf = np.empty(nbytes, np.uint8)
    return buf
