"""Drive a server with many streaming requests: closed loop (fixed concurrency) or open loop (Poisson)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Callable

import httpx

from .client import RequestResult, stream_request

BodyFn = Callable[[int], dict]


def _client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0, connect=30.0))


async def run_closed_loop(url: str, body_fn: BodyFn, n_requests: int, concurrency: int,
                          abort_fn: Callable[[int], int | None] | None = None) -> tuple[list[RequestResult], float]:
    """`concurrency` workers each send their next request as soon as the previous ends.

    body_fn(i) makes the body of request i; abort_fn(i) -> k hangs up after k chunks (None: read all).
    Returns the results in request order and the wall time.
    """
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results: list[RequestResult | None] = [None] * n_requests
    async with _client(concurrency) as client:
        async def worker():
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                abort = abort_fn(i) if abort_fn else None
                results[i] = await stream_request(client, url, body_fn(i), index=i, abort_after=abort)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, n_requests))))
        wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall


async def run_poisson(url: str, body_fn: BodyFn, n_requests: int, rate: float, seed: int = 0,
                      max_in_flight: int = 1024) -> tuple[list[RequestResult], float]:
    """Open loop: request arrivals follow a Poisson process of `rate` requests per second."""
    if rate <= 0:
        raise ValueError("--rate must be > 0 requests/s")
    rng = random.Random(seed)
    async with _client(min(n_requests, max_in_flight)) as client:
        t0 = time.perf_counter()
        tasks = []
        next_t = t0
        for i in range(n_requests):
            delay = next_t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream_request(client, url, body_fn(i), index=i)))
            next_t += rng.expovariate(rate)
        results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - t0
    return results, wall
