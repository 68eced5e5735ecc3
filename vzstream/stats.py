"""`Stats`: a snapshot of a session, and the readable table `str(stats)` prints.

The runtime writes its counters (`runtime.Counters`); `collect` reads them, with the units'
sizes, into one `Stats`. Nothing else writes a `Stats`. Keys use the stage verbs (decode,
upload, bind, release) and carry their unit in the name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import psutil


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
    stall_s: float = 0.0             # forward-thread time spent waiting for a unit
    wall_s: float = 0.0              # time inside root forwards

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
        mib = 1 << 20
        rows = [
            ("passes", f"{self.passes}"),
            ("trace misses", f"{self.trace_misses}"),
            ("units streamed / resident", f"{self.units_streamed} / {self.units_resident}"),
            ("decodes (prefetched / sync)", f"{self.decodes} ({self.prefetched} / {self.sync_fetches})"),
            ("packed / raw", f"{self.packed_nbytes / mib:.1f} MiB / {self.raw_nbytes / mib:.1f} MiB ({self.ratio:.3f}x)"),
            ("kept uncompressed", f"{self.uncompressed_nbytes / mib:.1f} MiB ({100 * self.raw_fraction:.0f}% of streamed)"
                                  + self._measured()),
            ("resident on device", f"{self.resident_nbytes / mib:.1f} MiB"),
            ("streamed per pass", f"{self.streamed_nbytes_per_pass / mib:.1f} MiB"),
            ("peak device memory", f"{self.peak_device_nbytes / mib:.1f} MiB"),
            ("activations (traced pass)", f"{self.activation_nbytes / mib:.1f} MiB"),
            ("host RSS", f"{self.host_rss_nbytes / mib:.1f} MiB"),
            ("decode time (workers)", f"{self.decode_s:.3f} s"),
            ("stall", f"{self.stall_s:.3f} s of {self.wall_s:.3f} s ({100 * self.stall_fraction:.1f}%)"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


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
    if runtime is not None:
        stats.trace_misses = runtime.tracer.misses
        stats.activation_nbytes = runtime.activation_nbytes or 0
        if runtime.schedule is not None:
            by_index = {u.index: u for u in units}
            stats.streamed_nbytes_per_pass = sum(by_index[u].raw_nbytes for u in runtime.schedule.fetch_units)
    stats.peak_device_nbytes = backend.peak_device_nbytes if backend is not None else 0
    stats.host_rss_nbytes = psutil.Process().memory_info().rss
    return stats
