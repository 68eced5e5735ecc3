"""Python cost of one decode job through the pipeline, from `submit` to the ticket being ready.

No-op jobs, so all that is measured is the machinery every real job also pays, with the GIL held:
4 workers, 4 tickets of 13 jobs in flight (a tinyllama block is ~13 frames), median of 5 runs.

    python docs/probes/job_dispatch.py
"""

import statistics
import time
from types import SimpleNamespace

from vzstream.pipeline import Pipeline, Slot
from vzstream.stats import Stats

JOBS_PER_UNIT, IN_FLIGHT = 13, 4


class NoOpBackend:
    def decode_jobs(self, ticket):
        return [[("noop", lambda: None)] for _ in range(JOBS_PER_UNIT)]

    def upload(self, ticket):
        pass


def us_per_job(pipeline: Pipeline, rounds: int) -> float:
    store = SimpleNamespace(raw_nbytes=1 << 30, unit=SimpleNamespace(fqn="unit"))   # never inline
    slot = Slot(0, None)
    t0 = time.perf_counter()
    for _ in range(rounds):
        tickets = [pipeline.submit(store, slot) for _ in range(IN_FLIGHT)]
        for ticket in tickets:
            pipeline.wait(ticket)
    return (time.perf_counter() - t0) / (rounds * IN_FLIGHT * JOBS_PER_UNIT) * 1e6


def main() -> None:
    pipeline = Pipeline(NoOpBackend(), 4, Stats())
    try:
        us_per_job(pipeline, 200)                                    # warm-up
        print(f"{statistics.median(us_per_job(pipeline, 500) for _ in range(5)):.2f} us per job")
    finally:
        pipeline.close()


if __name__ == "__main__":
    main()
