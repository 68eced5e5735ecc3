"""Shared plumbing for the benchmarks: timing, machine description, table + JSON output.

Benchmarks are not tests: they assert nothing, exclude warm-up, synchronise before stopping a
timer, run baseline and candidate in the same process, and print a markdown table followed by
one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time

import psutil
import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}"


def versions() -> dict:
    import zstandard

    return {"python": platform.python_version(), "torch": torch.__version__, "zstandard": zstandard.__version__}


def greedy(generate, ids, tokens: int):
    """`generate` (a Hugging Face `generate`) for exactly `tokens` new greedy tokens: an early
    EOS would shorten the work a timer divides by."""
    return generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                    do_sample=False, pad_token_id=0)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeat: int, device="cpu", warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeat` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss() -> int:
    """The process's resident set size, bytes."""
    return psutil.Process().memory_info().rss


class PeakRss:
    """The process's peak RSS over a `with` block, sampled every 5 ms on a thread: one reading
    after the run misses the slots and decode buffers that exist only while it runs."""

    def __enter__(self) -> "PeakRss":
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(name: str, rows: list[dict], columns: list[str], config: dict, out_dir: str | None = None) -> None:
    """Print the table, then one JSON line; also write both under `out_dir` if given."""
    text = table(rows, columns)
    line = json.dumps({"bench": name, "machine": machine(), **versions(), "config": config, "rows": rows})
    print(text)
    print(line)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write(f"# bench {name}\n\nmachine: {machine()}\n\n{text}\n")
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            f.write(line + "\n")
