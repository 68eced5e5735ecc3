"""`raw_fraction`: which streamed units stay uncompressed, and for "auto" how large that share
is: measure how fast this host decodes and the device uploads, and keep raw the share of
streamed bytes that balances the two (docs/design.md, "Performance model").

Streaming runs at the slower of PCIe (W_pcie) and the workers' decode rate (W_dec). A unit kept
uncompressed skips the decode but costs host RAM; keeping a share f raw makes a pass take
max(B / W_pcie, (1 - f) B / W_dec), which is least, with the least host RAM, at f = 1 - W_dec /
W_pcie. Both rates are in the same bytes: a unit's raw bytes per second.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from . import codec, decode

log = logging.getLogger("vzstream")


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
    frames = [f for s in stores for f in s.image.frames]
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
            # Each thread into a frame-sized buffer of its own (codec's per-thread scratch):
            # what a decode writes is measured, not where.
            for _ in pool.map(lambda f: decode.decode_frame_into(f, decode.thread_scratch(largest)[: f.nbytes]), tasks):
                pass
            times.append(time.perf_counter() - t0)
    return raw / statistics.median(times[1:]) / 1e9


def auto_raw_fraction(planned: list, submit, backend, config, stats) -> tuple[float, dict]:
    """`raw_fraction="auto"`: the balanced share of the device's upload rate, timed first, on an
    idle host, and the workers' decode rate on the largest of the `planned` units (most bytes
    are in large frames; a norm's tiny ones would understate the rate), packed compressed with
    `submit(unit)` (a future of its store). Both rates go into `stats`. Returns the share and
    {unit index: its store's future}, so the sample unit is not packed twice."""
    if config.codec == codec.Codec.NIBBLE:
        log.info("vzstream: raw_fraction=auto with codec=nibble: nothing is decoded on the host, "
                 "every unit stays coded")
        return 0.0, {}
    stats.upload_gbps_measured = backend.upload_gbps() or 0.0
    if not stats.upload_gbps_measured:
        return 0.0, {}                          # no bus to keep busy: decode everything
    if not planned:
        log.info("vzstream: raw_fraction=auto: no unit is planned to stream, nothing measured "
                 "(units evicted to streaming after the first pass stay compressed)")
        return 0.0, {}
    probe = max(planned, key=lambda u: u.raw_nbytes)
    sample = {probe.index: submit(probe)}
    stats.decode_gbps_measured = decode_gbps([sample[probe.index].result()], config.workers) or 0.0
    fraction = balanced_fraction(stats.decode_gbps_measured, stats.upload_gbps_measured)
    log.info("vzstream: raw_fraction=auto: %d workers decode %.1f GB/s, uploads run %.1f GB/s: "
             "aiming to keep %.2f of the streamed bytes raw%s", config.workers,
             stats.decode_gbps_measured, stats.upload_gbps_measured, fraction,
             " (codec='nibble' would decode none of them on the host, at 0.75 of bf16's host RAM)"
             if fraction else "")
    return fraction, sample
