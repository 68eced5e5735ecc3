"""The backend interface and the parts every backend shares (slot views, accounting)."""

from __future__ import annotations

import threading

import torch

from ..codec import Codec


class Backend:
    """Mechanism only: allocate host/device memory, decode, upload, order with events.

    Subclasses override the five ops; this base keeps the device-memory accounting that the
    planner and `Stats.peak_device_nbytes` read, so every backend reports the same way.
    """

    name = "base"
    alignment = 512          # tensor offsets in a slot: what the CUDA caching allocator guarantees
    device = torch.device("cpu")
    times_uploads = True     # its uploads take time worth a span (the CPU backend's do nothing)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.device_nbytes = 0        # bytes this backend holds on the device right now
        self.peak_device_nbytes = 0

    # -- accounting -------------------------------------------------------------------------
    def account(self, nbytes: int) -> None:
        """Record `nbytes` more (or fewer, if negative) bytes living on the device."""
        with self._lock:
            self.device_nbytes += nbytes
            self.peak_device_nbytes = max(self.peak_device_nbytes, self.device_nbytes)

    measures_activations = False    # can report the activation peak of a pass (CUDA can)

    def begin_measure(self) -> None:
        """Start measuring the device memory a pass allocates beyond what is held now."""

    def end_measure(self) -> int | None:
        """Bytes of activations the pass since `begin_measure` peaked at; None: not measurable."""
        return None

    def in_use(self) -> int | None:
        """Bytes allocated on the device now, by anything in this process; None: unknown."""
        return None

    def prepare(self, prefetch: int, stores=()) -> None:
        """Size per-fetch resources (CUDA: staging slots, merge scratch) for `prefetch` fetches
        in flight of the units in `stores`."""

    @property
    def scratch_held(self) -> int:
        """Bytes of streaming scratch allocated now (shared by a pool's members)."""
        return 0

    def scratch_nbytes(self, units, codec: str = Codec.ZSTD) -> int:
        """Device memory the backend needs besides slots to stream `units` (CPU: none)."""
        return 0

    def device_timer(self, num_fetches: int, prefetch: int):
        """A `DeviceTimer` (backends/timer.py) for a schedule of `num_fetches` fetches a pass, when
        the device, not the host, knows when uploads and stalls happen (CUDA); None: the host's
        clock times them as they run."""
        return None

    def upload_gbps(self) -> float | None:
        """Host→device GB/s of an upload (`raw_fraction="auto"` balances decoding against it);
        None: nothing crosses a bus (CPU), so decoding alone sets the pace."""
        return None

    def total_memory(self) -> int:
        """The device's memory in bytes (a fractional `vram_budget` is a share of this)."""
        import psutil

        return psutil.virtual_memory().total

    # -- memory -----------------------------------------------------------------------------
    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer for the compressed store (pinned where uploads need it)."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer on the device: one slot of the static pool."""
        self.account(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def free_device_buffer(self, buf: torch.Tensor) -> None:
        self.account(-buf.numel())

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move a resident tensor (parameter or buffer) to the device, counting it once it is there."""
        moved = tensor.to(self.device)
        self.account(tensor.numel() * tensor.element_size())
        return moved

    def from_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        self.account(-(tensor.numel() * tensor.element_size()))
        return tensor.to(device)

    # -- the five ops -------------------------------------------------------------------------
    def decode_jobs(self, ticket) -> list:
        raise NotImplementedError

    def upload(self, ticket) -> None:
        raise NotImplementedError

    def wait(self, ticket) -> None:
        raise NotImplementedError

    def release(self, ticket) -> None:
        raise NotImplementedError

    def clear_caches(self) -> None:
        """Forget anything cached per (unit, slot): the ring was rebuilt or a session left."""

    def free_scratch(self) -> None:
        """Free device memory kept for streaming besides the ring (nothing streams any more)."""

    def close(self) -> None:
        """Free what the backend allocated for itself (not slots: the pool frees those)."""


def chunk_jobs(items, target_nbytes: int = 1 << 21) -> list[list]:
    """Group (nbytes, name, work) items into jobs (lists of (name, work)) of ~`target_nbytes`.

    One job per thread-pool submission: tiny tensors (norms, biases) ride along with others,
    so a small unit costs one submission, while a large one spreads over every worker.
    """
    jobs, current, size = [], [], 0
    for nbytes, name, work in items:
        current.append((name, work))
        size += nbytes
        if size >= target_nbytes:
            jobs.append(current)
            current, size = [], 0
    if current:
        jobs.append(current)
    return jobs
