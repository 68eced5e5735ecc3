"""torch.profiler ranges for the pipeline's stages: `vzstream.<stage>:<unit fqn>`, recorded on
the thread that does the work: `decode` and `upload` on a worker (or on the forward thread for a
small unit fetched inline), `wait`, `bind` and `release` on the forward thread.

With no profiler running, a range costs one flag read. `on()` reads the flag torch sets while
any profiler runs, for every thread; the forward thread's hot paths branch on it rather than
enter a null context, which costs ~250 ns a range on the 2-core VM (`bench session` measures
what is left, per unit, against one resident block).
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd import profiler as _profiler

_OFF = contextlib.nullcontext()

if hasattr(_profiler, "_is_profiler_enabled"):
    def on() -> bool:
        """Whether a profiler is recording (any thread's)."""
        return _profiler._is_profiler_enabled
else:                                   # an older torch: the C call, still cheap
    on = torch.autograd._profiler_enabled


def stage_range(stage: str, fqn: str):
    """The range `vzstream.<stage>:<fqn>`, or a null context while no profiler runs."""
    if on():
        return _profiler.record_function(f"vzstream.{stage}:{fqn}")
    return _OFF
