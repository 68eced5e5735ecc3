"""vzstream: run PyTorch models whose weights stay losslessly compressed in host RAM and
stream to the device just ahead of use.

    with vzstream.session(model, prefetch=2) as s:
        out = s.generate(input_ids, max_new_tokens=64)

Importing vzstream never initialises CUDA and never imports transformers.
"""

from importlib import metadata

from . import codec  # noqa: F401 (importable, not advertised)
from .backends import Backend, CpuBackend, FakeBackend  # noqa: F401
from .config import SessionConfig  # noqa: F401
from .errors import (BackendUnavailableError, ConfigError, FormatError, MissingDependencyError, ModelTypeError,
                     StreamedWeightError, TraceError, VzstreamError)
from .fromfile import load
from .generate import greedy  # noqa: F401
from .orphans import restore
from .packread import PackedModel, open_packed  # noqa: F401
from .packwrite import save
from .pool import DevicePool
from .session import Session, session  # noqa: F401
from .stats import Stats

try:                                    # one source of truth: pyproject.toml's version
    __version__ = metadata.version("vzstream")
except metadata.PackageNotFoundError:   # a checkout on sys.path, not installed
    __version__ = "0+unknown"

# What users call. `Session`, `SessionConfig`, `Backend`, `CpuBackend`, `codec` and `greedy`
# stay importable (tests, custom backends) but are not advertised.
__all__ = [
    "session", "load", "restore", "save", "open_packed", "DevicePool", "Stats", "FakeBackend",
    "VzstreamError", "ConfigError", "FormatError", "TraceError", "BackendUnavailableError",
    "StreamedWeightError", "ModelTypeError", "MissingDependencyError",
]
