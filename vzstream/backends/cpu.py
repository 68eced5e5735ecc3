"""CPU backend: the reference. Staging *is* the slot: workers decode straight into it.

Upload, wait and release are no-ops because CPU compute is synchronous: by the time the
forward thread releases a slot, nothing reads it any more.
"""

from __future__ import annotations

from functools import partial

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
