"""The calls of the CUDA backend that move bytes, each issued on the current stream: staging a
frame and host→device copies. Plain functions over tensors and arrays, so they run (and are
tested) on CPU tensors too; `cuda.py` decides the streams and events around them, and
`expand.py` holds the kernels that write a slot. Every one keeps its GIL hand-overs few: each
torch call hands the GIL over, and on a busy host winning it back is what an upload waits for
(docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np

from .. import decode


def stage_into(buffer: np.ndarray, offset: int, nbytes: int, frame, fqn: str = "") -> None:
    """Decode one zstd frame into `buffer[offset : offset + nbytes]`. `buffer` is a numpy view
    of the staging tensor: torch's view ops (detach, reshape, view) each hand the GIL over, which
    beside a busy forward thread costs a wait per call; numpy slices do not, so a frame costs
    one hand-over, inside zstd (docs/probes/gil_release.py). (The job around it runs in the
    unit's `decode` profiler range: pipeline.py.)"""
    decode.decode_frame_into(frame, buffer[offset : offset + nbytes])


def upload_many(pairs: list) -> None:
    """(dst, src) host→device copies on the current stream, non-blocking from pinned memory."""
    for dst, src in pairs:
        dst.copy_(src, non_blocking=True)
