"""Backends: the mechanism that allocates memory and moves bytes. Decisions live in plan/pipeline.

A backend is used like this for every fetch of a unit (docs/design.md, "Backends"):

    jobs = backend.decode_jobs(ticket)   # worker threads run each job (decode into staging/slot)
    backend.upload(ticket)               # worker thread that finished the last job (no jobs: see Pipeline)
    backend.wait(ticket)                 # forward thread, at bind: compute must see the upload
    backend.release(ticket)              # forward thread, after the last use of the slot

`make_backend` picks one from the config. Importing this package never initialises CUDA.
"""

from __future__ import annotations

from ..errors import BackendUnavailableError, ConfigError
from .base import Backend
from .cpu import CpuBackend
from .fake import FakeBackend


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def make_backend(device: str = "auto", backend: Backend | None = None) -> Backend:
    """`backend` if given, else the backend for `device` ("auto" = cuda when available, else cpu)."""
    if backend is not None:
        if not isinstance(backend, Backend):
            raise ConfigError(
                f"`backend` must be a vzstream Backend instance (e.g. vzstream.FakeBackend()); "
                f"got {type(backend).__name__}. Leave it unset to pick one from `device`."
            )
        return backend
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cpu":
        return CpuBackend()
    if not cuda_available():
        raise BackendUnavailableError(
            f"`device`={device!r} needs a CUDA GPU, but torch.cuda.is_available() is False "
            "(no GPU, or a CPU-only torch build). Use device='cpu', or install a CUDA build of torch."
        )
    from .cuda import CudaBackend

    return CudaBackend(device)


__all__ = ["Backend", "CpuBackend", "FakeBackend", "make_backend"]
