"""vzstream: run PyTorch models whose weights stay losslessly compressed in host RAM and
stream to the device just ahead of use.

    with vzstream.session(model, prefetch=2) as s:
        out = s.generate(input_ids, max_new_tokens=64)

Importing vzstream never initialises CUDA and never imports transformers.
"""

from . import codec
from .backends import Backend, CpuBackend, FakeBackend
from .config import SessionConfig
from .errors import BackendUnavailableError, ConfigError, FormatError, TraceError, VzstreamError
from .generate import greedy
from .pool import DevicePool
from .session import Session, session
from .stats import Stats

__version__ = "0.1.0"

__all__ = [
    "session", "Session", "SessionConfig", "Stats", "DevicePool", "codec", "greedy",
    "Backend", "CpuBackend", "FakeBackend",
    "VzstreamError", "ConfigError", "FormatError", "TraceError", "BackendUnavailableError",
]
