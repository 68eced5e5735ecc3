"""CPU backend: the reference. Staging *is* the slot: workers decode straight into it.

Upload, wait and release are no-ops because CPU compute is synchronous: by the time the
forward thread releases a slot, nothing reads it any more.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .base import Backend, chunk_jobs


class CpuBackend(Backend):
    name = "cpu"
    times_uploads = False    # nothing to upload: a span would only cost the forward thread

    def __init__(self) -> None:
        super().__init__()
        self._jobs: dict = {}

    def decode_jobs(self, ticket) -> list:
        # The jobs depend only on (unit, slot): build them once, not on every fetch.
        key = (id(ticket.store), ticket.slot.index)   # the value keeps the store alive
        cached = self._jobs.get(key)
        if cached is None or cached[0] is not ticket.store or cached[1] is not ticket.slot.tensor:
            cached = (ticket.store, ticket.slot.tensor, image_jobs(ticket.store.image, ticket.slot.tensor.numpy(),
                                                                   ticket.store.tensors_in))
            self._jobs[key] = cached
        return cached[2]

    def upload(self, ticket) -> None:
        pass

    def clear_caches(self) -> None:
        self._jobs.clear()

    def close(self) -> None:
        self.clear_caches()

    def wait(self, ticket) -> None:
        pass

    def release(self, ticket) -> None:
        pass


def image_jobs(image, slot: np.ndarray, what=lambda first, last: "the unit") -> list:
    """A wire image into `slot` (uint8 numpy) on the host: each nibble chunk expanded, or each
    zstd frame decoded and merged with its low planes; the raw area copied. `what(first, last)`
    names the tensors a job writes (slot bytes [first, last)), for its errors."""
    k, items = image.itemsize, []
    for c in image.chunks:
        out = slot[c.start * k : (c.start + c.numel) * k]
        for a, b in [(f.start, f.start + f.nbytes) for f in c.frames] or [(0, c.numel)]:
            work = partial(image.expand_into, c, out[a * k : b * k], a, b)
            items.append((k * (b - a), what((c.start + a) * k, (c.start + b) * k), work))
    if image.raw_nbytes:
        raw = image.host[image.raw_offset : image.raw_offset + image.raw_nbytes]
        work = partial(np.copyto, slot[image.coded_nbytes :][: image.raw_nbytes], raw)
        items.append((image.raw_nbytes, what(image.coded_nbytes, image.coded_nbytes + image.raw_nbytes), work))
    return chunk_jobs(items)
