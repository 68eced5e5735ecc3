"""The ring: the device slots units are fetched into, as the plan laid them out.

Invariant: a slot is owned by exactly one of the free list, one in-flight ticket, one held unit.
"""

from __future__ import annotations


class Slot:
    __slots__ = ("index", "tensor")

    def __init__(self, index: int, tensor) -> None:
        self.index, self.tensor = index, tensor


class SlotPool:
    """The ring: device slots of `slot_nbytes`, allocated as they are first needed, up to the
    count a caller allows; and a slot of its own for each outsized unit (`dedicated`: a key
    naming the unit, (id(runtime), unit index), -> bytes), so such a unit never widens every
    slot. Dedicated slots have negative indices."""

    def __init__(self, backend, slot_nbytes: int, dedicated: dict | None = None) -> None:
        self.backend, self.slot_nbytes = backend, slot_nbytes
        self.dedicated_nbytes = dict(dedicated or {})
        self.slots: list[Slot] = []
        self.free: list[Slot] = []
        self.own: dict = {}                     # key -> its dedicated slot, once allocated
        self.own_free: set[int] = set()

    def reserve(self, count: int) -> None:
        """Grow the ring to `count` slots (done once per learned schedule, never per pass)."""
        while len(self.slots) < count:
            slot = Slot(len(self.slots), self.backend.device_buffer(self.slot_nbytes))
            self.slots.append(slot)
            self.free.append(slot)

    def acquire(self, key, limit: int | None) -> Slot | None:
        """A free slot for the unit `key` names (its dedicated slot, if it has one), allocating
        one up to `limit` slots (None: no limit); None when every slot it may use is taken."""
        nbytes = self.dedicated_nbytes.get(key) if self.dedicated_nbytes else None
        if nbytes is not None:
            if key not in self.own:
                self.own[key] = Slot(-1 - len(self.own), self.backend.device_buffer(nbytes))
                self.own_free.add(key)
            if key not in self.own_free:
                return None
            self.own_free.discard(key)
            return self.own[key]
        if not self.free and (limit is None or len(self.slots) < limit):
            self.reserve(len(self.slots) + 1)
        return self.free.pop() if self.free else None

    def release(self, slot: Slot) -> None:
        if slot.index < 0:
            self.own_free.add(next(u for u, s in self.own.items() if s is slot))
        else:
            self.free.append(slot)

    @property
    def nbytes(self) -> int:
        return len(self.slots) * self.slot_nbytes + sum(s.tensor.numel() for s in self.own.values())

    def close(self) -> None:
        for slot in [*self.slots, *self.own.values()]:
            self.backend.free_device_buffer(slot.tensor)
        self.slots, self.free, self.own, self.own_free = [], [], {}, set()
