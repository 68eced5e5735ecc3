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


class ModelTypeError(VzstreamError, TypeError):
    """`model` is not a `torch.nn.Module` (a function, a pipeline, a state dict, ...)."""


class BackendUnavailableError(VzstreamError, RuntimeError):
    """The requested device backend is not available on this machine (e.g. CUDA without a GPU)."""


class MissingDependencyError(VzstreamError, ImportError):
    """An optional dependency a feature needs is not installed (reading a packed file needs
    `safetensors`: `pip install vzstream[hf]`)."""


class StreamedWeightError(VzstreamError, RuntimeError):
    """A streamed weight was used outside its module's forward (read, edited, converted, copied),
    or a streamed pass ran with autograd on: inside a session the model is for inference only."""


__all__ = ["VzstreamError", "ConfigError", "FormatError", "TraceError", "BackendUnavailableError",
           "StreamedWeightError", "ModelTypeError", "MissingDependencyError"]
