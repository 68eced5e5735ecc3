"""CPU backend: the reference. Staging *is* the slot: workers decode straight into it.

Upload, wait and release are no-ops because CPU compute is synchronous: by the time the
forward thread releases a slot, nothing reads it any more.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .. import decode
from .base import Backend, chunk_jobs


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self) -> None:
        super().__init__()
        self._jobs: dict = {}

    def decode_jobs(self, ticket) -> list:
        # The jobs depend only on (unit, slot): build them once, not on every fetch.
        key = (id(ticket.store), ticket.slot.index)   # the value keeps the store alive
        cached = self._jobs.get(key)
        if cached is None or cached[0] is not ticket.store or cached[1] is not ticket.slot.tensor:
            cached = (ticket.store, ticket.slot.tensor, self._build_jobs(ticket))
            self._jobs[key] = cached
        return cached[2]

    def _build_jobs(self, ticket) -> list:
        if ticket.store.image is not None:
            return _image_jobs(ticket.store.image, ticket.slot.tensor.numpy())
        views = ticket.store.targets(ticket.slot)
        items = []
        for (name, _), packed, out in zip(ticket.store.unit.params, ticket.store.packed, views):
            chunk_nbytes = packed.frame_elems * packed.itemsize
            decode_chunk = decode.chunk_decoder(packed, out)     # views `out` once, not per chunk
            for j in range(packed.num_chunks):
                items.append((chunk_nbytes, name, partial(decode_chunk, j)))
        return chunk_jobs(items)

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


def _image_jobs(image, slot: np.ndarray) -> list:
    """A wire image into `slot` (uint8 numpy) on the host: each chunk expanded, the raw area copied."""
    coded = slot[: image.coded_nbytes].view(np.uint16)
    items = [(2 * c.numel, f"chunk {i}", partial(image.expand_into, c, coded[c.start : c.start + c.numel]))
             for i, c in enumerate(image.chunks)]
    if image.raw_nbytes:
        raw = image.arena.numpy()[image.raw_offset : image.raw_offset + image.raw_nbytes]
        items.append((image.raw_nbytes, "raw area", partial(np.copyto, slot[image.coded_nbytes :][: image.raw_nbytes], raw)))
    return chunk_jobs(items)
