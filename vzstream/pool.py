"""DevicePool: device memory shared by several sessions, one of them streaming at a time.

The pool owns the backend, one ring of slots (sized for the largest unit of any member, with
the largest `prefetch + 2` of any member) and a lock. A session takes the lock for each call
(`s(...)`, `generate`, ...) and, when the pool is shared, hands all its slots back before
releasing it: an inactive session holds no slots, only its resident units. The budget bounds
the sum of every member's resident units plus the one ring.
"""

from __future__ import annotations

import threading

from .backends import make_backend
from .config import check_device, parse_nbytes
from .errors import ConfigError
from .pipeline import SlotPool


def resolve_budget(value, backend, name: str = "vram_budget") -> int | None:
    """None | bytes | "6GiB" | fraction of the device's memory -> bytes (or None)."""
    if value is None:
        return None
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"`{name}` as a float is a fraction of device memory in (0, 1]; got {value}.")
        return int(value * backend.total_memory())
    return parse_nbytes(value, name, fraction_ok=True)


class DevicePool:
    """`vzstream.DevicePool(device, budget=...)`; pass it as `session(model, pool=pool)`."""

    def __init__(self, device: str = "auto", budget=None, *, backend=None) -> None:
        self.backend = make_backend(check_device(device), backend)
        self.budget = resolve_budget(budget, self.backend, "budget")
        self.lock = threading.Lock()          # held by the session that is running a call
        self.owner: int | None = None         # thread id holding `lock` for a call (re-entry check)
        self.active = None                    # the session whose call holds `lock`
        self.ring = SlotPool(self.backend, 0)
        self.ring_slots = 0                   # static ring size once a member set it
        self.members: dict[int, tuple] = {}   # id(session) -> (session, its resident bytes)

    @property
    def shared(self) -> bool:
        return len(self.members) > 1

    def available(self, session) -> int | None:
        """Bytes a joining `session` may plan with: the budget less the others' residents."""
        if self.budget is None:
            return None
        others = sum(n for sid, (_, n) in self.members.items() if sid != id(session))
        return self.budget - others

    def join(self, session, resident_nbytes: int, slot_nbytes: int, num_slots: int) -> None:
        """Register `session` (caller holds `lock`); grow the ring if it needs more."""
        for other, _ in self.members.values():
            other.park()                      # now shared: members hold no slots between calls
        self.members[id(session)] = (session, resident_nbytes)
        if slot_nbytes > self.ring.slot_nbytes:
            self._rebuild_ring(slot_nbytes)
        self.ring_slots = max(self.ring_slots, num_slots)
        self.ring.reserve(self.ring_slots)

    def leave(self, session) -> None:
        self.members.pop(id(session), None)
        self.backend.clear_caches()
        if not self.members:
            self._rebuild_ring(0)
            self.ring_slots = 0
            self.backend.free_scratch()

    def _rebuild_ring(self, slot_nbytes: int) -> None:
        # Members are parked (no slot in use) whenever the pool lock is free.
        self.ring.close()
        for member, _ in self.members.values():      # cached views would keep old slots alive
            for store in member.stores.values():
                store.forget_slots()
        self.backend.clear_caches()
        self.ring = SlotPool(self.backend, slot_nbytes)

    @property
    def peak_device_nbytes(self) -> int:
        return self.backend.peak_device_nbytes
