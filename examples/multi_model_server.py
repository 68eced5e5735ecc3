"""Several models on one device, served from one asyncio loop: `python examples/multi_model_server.py`.

Two (or three) Llama-architecture models share a `vzstream.DevicePool`: one ring of slots and
one budget for all of them; only the model serving a request streams at that moment, and an
idle model holds no slots. Requests for either model arrive concurrently; each prints its
latency; at the end the pool's peak device memory is shown against its budget.
"""

import argparse
import asyncio
import time

import torch

import vzstream
from vzstream.bench.models import build_model, model_nbytes, prompt


async def serve(name: str, s, ids, tokens: int, latencies: dict) -> None:
    t0 = time.perf_counter()
    n = 0
    async for _ in s.stream(ids, max_new_tokens=tokens, do_sample=False,
                            attention_mask=torch.ones_like(ids), pad_token_id=0):
        n += 1
    latencies.setdefault(name, []).append(time.perf_counter() - t0)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=2, choices=(2, 3))
    ap.add_argument("--requests", type=int, default=4, help="requests per model")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    models = {f"model{i}": build_model("small", seed=i, layers=4 + 2 * i) for i in range(args.models)}
    largest = max(model_nbytes(m) for m in models.values())
    pool = vzstream.DevicePool(args.device, budget=int(1.5 * largest))   # less than the models need together
    print(f"models: {', '.join(f'{k} {model_nbytes(m) / 2**20:.0f} MiB' for k, m in models.items())}; "
          f"pool budget {pool.budget / 2**20:.0f} MiB")

    sessions = {}
    for name, model in models.items():
        # Each model may keep up to its share of the pool resident; the rest streams.
        sessions[name] = vzstream.session(model, pool=pool, vram_budget=pool.budget // len(models))
        await sessions[name].__aenter__()
    try:
        latencies: dict = {}
        requests = [serve(name, s, prompt(models[name], seed=r).to(pool.backend.device), args.tokens, latencies)
                    for r in range(args.requests) for name, s in sessions.items()]
        t0 = time.perf_counter()
        await asyncio.gather(*requests)
        wall = time.perf_counter() - t0
    finally:
        for s in sessions.values():
            await s.__aexit__(None, None, None)
    for name, lat in latencies.items():
        lat = sorted(lat)
        print(f"{name}: {len(lat)} requests, median latency {1e3 * lat[len(lat) // 2]:.0f} ms, max {1e3 * lat[-1]:.0f} ms")
    print(f"all requests in {wall:.2f} s; pool peak device memory {pool.peak_device_nbytes / 2**20:.1f} MiB "
          f"of a {pool.budget / 2**20:.0f} MiB budget")


if __name__ == "__main__":
    asyncio.run(main())
