"""Exceptions raised by vzstream.

Every error is a `VzstreamError`; each subclass also inherits the builtin a caller would
naturally catch (`ConfigError` is a `ValueError`, ...). Messages name the argument in
backticks, the constraint, the value given, and the fix.
"""


class VzstreamError(Exception):
    """Base class of every error vzstream raises on purpose."""


class ConfigError(VzstreamError, ValueError):
    """An option given to `vzstream.session` (or another entry point) is invalid."""


class FormatError(VzstreamError, ValueError):
    """Compressed data is corrupt or does not match what it claims to hold."""


class TraceError(VzstreamError, RuntimeError):
    """The model cannot be traced or streamed as asked (e.g. a second session on one model)."""


class BackendUnavailableError(VzstreamError, RuntimeError):
    """The requested device backend is not available on this machine (e.g. CUDA without a GPU)."""


__all__ = ["VzstreamError", "ConfigError", "FormatError", "TraceError", "BackendUnavailableError"]
