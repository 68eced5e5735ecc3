"""A backend that does the CPU backend's work and logs every op, for exact-order tests.

`FakeBackend().ops` is a list of `(op, fqn, slot_index)` tuples in the order the ops happened
(decode is logged when a ticket's first job starts, so its place is its real start).
`delays={("decode" | "upload", fqn or "*"): seconds}` makes a stage of a unit that slow (it
sleeps, as a decode releases the GIL): tests of the overlap report.
"""

from __future__ import annotations

import threading
import time

from .cpu import CpuBackend


class FakeBackend(CpuBackend):
    name = "fake"
    times_uploads = True     # `delays` can make them slow

    def __init__(self, activation_nbytes: int | None = None, upload_gbps: float | None = None,
                 delays: dict | None = None) -> None:
        super().__init__()
        self.delays = dict(delays or {})
        self.ops: list[tuple[str, str, int]] = []
        self._log_lock = threading.Lock()
        # Pretend a pass allocates this much for activations (tests of budget fitting on CPU).
        self.activation_nbytes = activation_nbytes
        self.measures_activations = activation_nbytes is not None
        self._upload_gbps = upload_gbps    # pretend uploads run this fast (`raw_fraction="auto"`)
        self.held_nbytes = 0               # pretend this much more stays allocated (a growing KV cache)

    def upload_gbps(self) -> float | None:
        return self._upload_gbps

    def end_measure(self) -> int | None:
        return self.activation_nbytes

    def in_use(self) -> int | None:
        return self.device_nbytes + self.held_nbytes if self.measures_activations else None

    def _delay(self, stage: str, fqn: str) -> None:
        seconds = self.delays.get((stage, fqn), self.delays.get((stage, "*"), 0.0))
        if seconds:
            time.sleep(seconds)

    def log(self, op: str, ticket) -> None:
        with self._log_lock:
            self.ops.append((op, ticket.store.unit.fqn, ticket.slot.index))

    def decode_jobs(self, ticket) -> list:
        jobs = super().decode_jobs(ticket)
        started = []

        def first(job):
            def run():
                with self._log_lock:
                    leading = not started
                    if leading:
                        started.append(True)
                        self.ops.append(("decode", ticket.store.unit.fqn, ticket.slot.index))
                if leading:
                    self._delay("decode", ticket.store.unit.fqn)
                for _, work in job:
                    work()
            return run

        # Log once, from whichever job starts first; each job keeps its own work list.
        return [[(job[0][0], first(job))] for job in jobs]

    def upload(self, ticket) -> None:
        self.log("upload", ticket)
        self._delay("upload", ticket.store.unit.fqn)

    def wait(self, ticket) -> None:
        self.log("bind", ticket)

    def release(self, ticket) -> None:
        self.log("release", ticket)
