"""`Stats`: a snapshot of a session, and the table `str(stats)` prints, ending with one line
of advice.

The runtime writes its counters (`runtime.Counters`) and its pass figures (`timing.Timing`);
`collect` reads them, with the units' sizes, into one `Stats`. Nothing else writes a `Stats`.
Keys use the stage verbs (decode, upload, bind, release) and carry their unit in the name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import psutil

from .config import available_cores
from .timing import PassTimes

PER_PASS = 16            # passes whose own figures a snapshot keeps
STEADY = 8               # the advice reads the last passes but the traced first one
QUIET = 0.02             # stalls under this share of forward time: nothing to do


@dataclass
class Stats:
    passes: int = 0                  # root forwards completed
    trace_misses: int = 0            # binds (or pass ends) that left the learned trace
    units_streamed: int = 0
    units_resident: int = 0
    decodes: int = 0                 # unit fetches submitted (prefetched or synchronous)
    prefetched: int = 0              # binds served by a prefetch already in flight
    sync_fetches: int = 0            # binds that had to fetch synchronously (first pass, misses)
    drained: int = 0                 # prefetches dropped unused (a miss, a park between calls, close)
    slot_overflows: int = 0          # slots allocated beyond the schedule's count (off-plan only)
    packed_nbytes: int = 0           # compressed size of the streamed units in host RAM
    raw_nbytes: int = 0              # their size uncompressed
    uncompressed_nbytes: int = 0     # of raw_nbytes, units stored with nothing to decode (kept raw by
                                     # `raw_fraction`, under 4 KiB, or no plane of them compresses)
    decode_gbps_measured: float = 0.0   # raw_fraction="auto": the workers' decode rate at open (0: not measured)
    upload_gbps_measured: float = 0.0   # raw_fraction="auto": the host->device rate at open (0: not measured)
    resident_nbytes: int = 0         # parameters kept on the device
    streamed_nbytes_per_pass: int = 0
    peak_device_nbytes: int = 0      # what the backend held on the device at most (params + slots)
    activation_nbytes: int = 0       # activation peak measured on the traced pass (0: not measured)
    host_rss_nbytes: int = 0         # process RSS when stats() was called
    decode_s: float = 0.0            # worker time spent decoding (summed over threads)
    stall_s: float = 0.0             # compute time spent waiting for a unit (passes timed so far)
    wall_s: float = 0.0              # time inside root forwards
    # The overlap report, over the passes timed so far (on CUDA the device's figures of a pass
    # arrive when the next one ends, or when the session closes).
    upload_s: float = 0.0            # uploads (CUDA: on the device, copies and expansion)
    compute_s: float = 0.0           # forward time not spent stalled
    overlap: float = 1.0             # share of decode plus upload time hidden behind compute
    stalled_most: tuple = ()         # (fqn, seconds, cause "decode" or "upload") of the units waited for longest
    per_pass: tuple = ()             # `PassTimes` of the last passes timed, oldest first
    advice: str = ""                 # one line: what to change, if anything
    prefetch: int = 0                # the depth fetched ahead at (prefetch="auto": what it chose or tries)
    prefetch_why: str = ""           # prefetch="auto", workers="auto": what they chose and why
    workers: int = 0
    backend: str = ""
    codec: str = ""
    _timed: PassTimes = field(default_factory=PassTimes, repr=False)   # the sum behind the cumulative figures

    @property
    def ratio(self) -> float:
        return self.raw_nbytes / self.packed_nbytes if self.packed_nbytes else 1.0

    @property
    def raw_fraction(self) -> float:
        """The share of the streamed units' bytes kept uncompressed (no decode)."""
        return self.uncompressed_nbytes / self.raw_nbytes if self.raw_nbytes else 0.0

    @property
    def stall_fraction(self) -> float:
        return self.stall_s / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        del d["_timed"]
        d["ratio"] = self.ratio
        d["stall_fraction"] = self.stall_fraction
        d["raw_fraction"] = self.raw_fraction
        return d

    def _measured(self) -> str:
        """What raw_fraction="auto" measured at open, for the table."""
        if not self.upload_gbps_measured:
            return ""
        decode = f"decode {self.decode_gbps_measured:.1f} GB/s" if self.decode_gbps_measured else "no decode timed"
        return f"; measured {decode}, upload {self.upload_gbps_measured:.1f} GB/s"

    def __str__(self) -> str:
        rows = [
            ("passes", f"{self.passes} (trace misses {self.trace_misses})"),
            ("units streamed / resident", f"{self.units_streamed} / {self.units_resident}; prefetch {self.prefetch}, "
                                          f"{_workers(self.workers)}, codec {self.codec or '-'} on {self.backend or '-'}"),
            ("decodes", f"{self.decodes} ({self.prefetched} prefetched, {self.sync_fetches} synchronous)"),
            ("packed / raw", f"{_mib(self.packed_nbytes)} / {_mib(self.raw_nbytes)} ({self.ratio:.3f}x), "
                             f"{100 * self.raw_fraction:.0f}% kept uncompressed" + self._measured()),
            ("memory", f"device {_mib(self.resident_nbytes)} resident, {_mib(self.peak_device_nbytes)} peak, "
                       f"activations {_mib(self.activation_nbytes)}; streams {_mib(self.streamed_nbytes_per_pass)} "
                       f"a pass; host RSS {_mib(self.host_rss_nbytes)}"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows] + [""] + _time_table(self)
        worst = ", ".join(f"{fqn} {_t(s)} ({cause})" for fqn, s, cause in self.stalled_most)
        lines += [f"{'stalled most':<13} {worst or 'none'}"]
        if self.prefetch_why:
            lines.append(f"{'auto':<13} {self.prefetch_why}")
        lines.append(f"{'advice':<13} {self.advice}")
        return "\n".join(lines)


def _time_table(st: Stats) -> list[str]:
    """Wall, compute, decode, upload, stall and overlap: the last pass and all passes timed."""
    head = ("time", "wall", "compute", "decode time", "upload", "stall", "overlap")
    rows = [head]
    for label, p in (("last pass", st.per_pass[-1] if st.per_pass else None), (f"all {st._timed.passes}", st._timed)):
        if p is None or not p.passes:
            continue
        rows.append((label, _t(p.wall_s), _t(p.compute_s), _t(p.decode_s), _t(p.upload_s),
                     f"{_t(p.stall_s)} ({100 * p.stall_fraction:.1f}%)", f"{100 * p.overlap:.0f}%"))
    if len(rows) == 1:
        rows.append(("(none yet)", "", "", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _t(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _workers(n: int) -> str:
    return f"{n} worker{'' if n == 1 else 's'}"


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


def advise(st: Stats, steady: PassTimes) -> str:
    """One line from the last passes' figures: raise prefetch, add workers, use the GPU codec,
    or nothing to do."""
    if not st.units_streamed:
        return "nothing to do: every unit is resident"
    if not steady.passes:
        return "nothing to do yet: the figures start once a pass has run"
    per_pass = f"{_t(steady.stall_s / steady.passes)} a pass"
    if steady.stall_fraction < QUIET:
        return (f"nothing to do: stalls are {100 * steady.stall_fraction:.1f}% of forward time; "
                f"{100 * steady.overlap:.0f}% of decode and upload is hidden behind compute")
    if steady.stall_inline_s >= steady.stall_s / 2:
        return (f"nothing to do: most stalls ({per_pass}) are small units decoded inline at their bind, "
                f"which costs less than handing them to a worker")
    if steady.stall_decode_s >= steady.stall_s / 2:
        if st.backend == "cuda" and st.codec == "zstd":
            return f'use the GPU codec: codec="nibble" leaves nothing to decode on the host (decode stalls {per_pass})'
        busy = steady.decode_s / (max(1, st.workers) * max(steady.compute_s, 1e-9))
        if busy >= 0.75 and st.prefetch:
            load = f"decode keeps {_workers(st.workers)} busy {busy:.1f}x as long as compute runs (stalls {per_pass})"
            cores = available_cores()
            if st.workers >= cores:
                return f"nothing to do here: {load}, on every core this process has; a larger vram_budget streams less"
            wanted = min(cores, max(st.workers + 1, math.ceil(steady.decode_s / max(steady.compute_s, 1e-9))))
            return f"add workers: {load}; try workers={wanted}"
        return f"raise prefetch: decode starts too late to hide (stalls {per_pass}); try prefetch={st.prefetch + 1}"
    if steady.upload_s >= 0.9 * steady.compute_s:
        return (f"nothing to do here: uploads take {_t(steady.upload_s / steady.passes)} a pass against "
                f"{_t(steady.compute_s / steady.passes)} of compute, so the bus is the bound; a larger "
                f"vram_budget keeps more units resident")
    return f"raise prefetch: uploads start too late to hide (stalls {per_pass}); try prefetch={st.prefetch + 1}"


def collect(units: list, runtime, calibration, backend) -> Stats:
    """A `Stats` of `units` as they stand, `runtime`'s counters (None: not streaming) and what
    `raw_fraction="auto"` measured."""
    counted = runtime.counters.as_dict() if runtime is not None else {}
    stats = Stats(**{f.name: counted[f.name] for f in fields(Stats) if f.name in counted})
    stores = [u.store for u in units if u.streamed and u.store is not None]
    stats.units_streamed = sum(u.streamed for u in units)
    stats.units_resident = len(units) - stats.units_streamed
    stats.packed_nbytes = sum(s.packed_nbytes for s in stores)
    stats.raw_nbytes = sum(s.raw_nbytes for s in stores)
    stats.uncompressed_nbytes = sum(s.raw_nbytes for s in stores if not s.compressed)
    stats.resident_nbytes = sum(u.raw_nbytes for u in units if not u.streamed)
    stats.decode_gbps_measured = calibration.decode_gbps_measured
    stats.upload_gbps_measured = calibration.upload_gbps_measured
    stats.codec = stores[0].image.coding if stores else ""
    steady = PassTimes()
    if runtime is not None:
        stats.trace_misses = runtime.tracer.misses
        stats.activation_nbytes = runtime.activation_nbytes or 0
        if runtime.schedule is not None:
            by_index = {u.index: u for u in units}
            stats.streamed_nbytes_per_pass = sum(by_index[u].raw_nbytes for u in runtime.schedule.fetch_units)
        steady = _timed(stats, runtime)
    stats.backend = backend.name if backend is not None else ""
    stats.peak_device_nbytes = backend.peak_device_nbytes if backend is not None else 0
    stats.host_rss_nbytes = psutil.Process().memory_info().rss
    stats.advice = advise(stats, steady)
    return stats


def _timed(stats: Stats, runtime) -> PassTimes:
    """Fill the overlap report from the runtime's `Timing`; the figures the advice reads."""
    timing = runtime.timing
    total = stats._timed = timing.total
    stats.stall_s, stats.upload_s, stats.compute_s, stats.overlap = (total.stall_s, total.upload_s,
                                                                     total.compute_s, total.overlap)
    stats.per_pass = tuple(timing.recent(PER_PASS))
    stats.stalled_most = tuple(timing.worst_units())
    stats.prefetch, stats.workers = runtime.depth, runtime.pipeline.workers.num_threads
    stats.prefetch_why = "; ".join(t.why for t in runtime.tuners)
    return sum(timing.recent(STEADY, steady=True), PassTimes())
