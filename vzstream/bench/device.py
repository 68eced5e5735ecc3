"""What the card itself does, timed on it for `bench gpu`: pinned host→device bandwidth, the
plane-merge kernel's rate, a Chrome trace of a few streamed tokens, and a host timer that
synchronises the device before it starts and before it stops."""

from __future__ import annotations

import statistics
import time

import torch


def event_time_s(fn, repeat: int = 5) -> float:
    """Median seconds of `fn()` on the current stream, timed with CUDA events, after a warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_pcie(nbytes: int) -> float:
    """Pinned host→device GB/s: one large copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / event_time_s(lambda: dst.copy_(src, non_blocking=True)) / 1e9


def measure_merge(nbytes: int) -> float:
    """GB/s of the backend's plane-merge kernel (bf16: two planes into one tensor). It runs on
    its own stream, so this says how much of the device it takes beside compute."""
    from vzstream.backends.expand import merge_planes

    n = nbytes // 2
    planar = torch.randint(0, 256, (2 * n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty(2 * n, dtype=torch.uint8, device="cuda")
    return 2 * n / event_time_s(lambda: merge_planes((planar[:n], planar[n:]), dst.view(n, 2))) / 1e9


def profile_to(path: str, fn) -> None:
    """A Chrome trace of `fn()` (the decode workers' ranges too, where this torch can record
    other threads): where copies, merges and compute overlap, and where they do not."""
    from torch.profiler import ProfilerActivity, profile, supported_activities

    activities = [a for a in (ProfilerActivity.CPU, ProfilerActivity.CUDA) if a in supported_activities()]
    kwargs = {}
    try:
        kwargs["experimental_config"] = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):
        pass
    try:
        with torch.no_grad(), profile(activities=activities, **kwargs) as prof:
            fn()
            torch.cuda.synchronize()
        prof.export_chrome_trace(path)
        print(f"trace written: {path}", flush=True)
    except Exception as exc:    # a trace is a bonus: never lose the rows for it
        print(f"no trace ({type(exc).__name__}: {exc})", flush=True)


def timed(fn, repeat: int):
    """(median seconds, last result) of `fn()` over `repeat` runs; the GPU is synchronised
    before each timer starts and before it stops."""
    times, out = [], None
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out
