"""An HTTP load generator (aiohttp) that runs in its own process, so it never shares an interpreter with what
it measures.

Two ways to drive a server:
- closed loop (default): `concurrency` clients, each sending its next request when the last one is answered.
  Throughput and latency are those of a system with exactly that many requests in flight.
- open loop (`rate`): requests are scheduled at fixed times, `rate` per second, with at most `concurrency` in
  flight; latency is measured from the *scheduled* time, so a stalled server is charged for the requests it
  delayed (no coordinated omission).

With `keys`, a request whose key the server refuses (it expired) is sent once more with a key renewed through
TorchServe's token API, so a long run outlives `token_expiration_min`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from servekit.client import Keys, bearer, is_invalid_key


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    requests: int
    ok: int
    errors: int
    error_statuses: dict[str, int] = field(default_factory=dict)
    throughput_per_s: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    mode: str = "closed"

    def to_dict(self) -> dict:
        return asdict(self)


async def _drive(url, headers, bodies, concurrency, duration_s, rate, timeout_s, keys):
    import aiohttp

    outcomes: list[tuple[float, str]] = []  # (latency ms, status or error name)
    start = time.perf_counter()
    deadline = start + duration_s
    counter = iter(range(10**12))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    auth = bearer(keys.current("inference")) if keys else {}
    renewal = asyncio.Lock()

    async def renew(refused: dict[str, str]) -> None:
        """One coroutine renews the key; those that were refused meanwhile find it renewed and just retry."""
        async with renewal:
            if auth == refused:
                stale = refused["Authorization"].removeprefix("Bearer ")
                auth.update(bearer(await asyncio.to_thread(keys.renew, "inference", stale)))

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(body: bytes, content_type: str, key: dict[str, str]) -> tuple[int, str]:
            async with session.post(url, data=body, headers={**headers, **key, "Content-Type": content_type}) as reply:
                return reply.status, await reply.text(errors="replace")

        async def post(body: bytes, content_type: str) -> str:
            sent = dict(auth)
            status, text = await send(body, content_type, sent)
            if keys and is_invalid_key(status, text):
                await renew(sent)
                status, _ = await send(body, content_type, auth)
            return str(status)

        async def client() -> None:
            while True:
                index = next(counter)
                scheduled = start + index / rate if rate else time.perf_counter()
                if scheduled >= deadline:
                    return
                if rate and scheduled > time.perf_counter():
                    await asyncio.sleep(scheduled - time.perf_counter())
                body, content_type = bodies[index % len(bodies)]
                try:
                    status = await post(body, content_type)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    status = type(exc).__name__
                outcomes.append(((time.perf_counter() - scheduled) * 1000, status))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - start


def _child(connection, url, headers, bodies, concurrency, duration_s, rate, timeout_s, keys) -> None:
    try:
        connection.send(asyncio.run(_drive(url, headers, bodies, concurrency, duration_s, rate, timeout_s, keys)))
    except BaseException as exc:  # reported to the parent, which raises it
        connection.send(exc)
    finally:
        connection.close()


def run_load(
    url: str,
    headers: dict[str, str],
    bodies: list[tuple[bytes, str]],
    concurrency: int,
    duration_s: float,
    rate: float | None = None,
    timeout_s: float = 30.0,
    keys: Keys | None = None,
) -> LoadResult:
    """POSTs `bodies` (round robin) to `url` for `duration_s` from a separate process; 2xx counts as success.

    `keys` (a ServeClient's `keys`) authorizes each request with the current inference key and renews it when
    the server refuses it; without them, `headers` are sent as they are.
    """
    if concurrency < 1 or duration_s <= 0 or not bodies or (rate is not None and rate <= 0):
        raise ValueError("need concurrency >= 1, duration > 0, a positive rate and at least one body")
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_child,
        args=(sender, url, headers, bodies, concurrency, duration_s, rate, timeout_s, keys),
        daemon=True,
    )
    process.start()
    sender.close()
    try:
        if not receiver.poll(duration_s + timeout_s + 60):
            raise TimeoutError(f"the load generator did not report within {duration_s + timeout_s + 60:.0f} s")
        payload = receiver.recv()
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
    if isinstance(payload, BaseException):
        raise payload
    outcomes, elapsed = payload
    return summarize(outcomes, elapsed, concurrency, "open" if rate else "closed")


def summarize(outcomes: list[tuple[float, str]], elapsed_s: float, concurrency: int, mode: str) -> LoadResult:
    ok_latencies = [latency for latency, status in outcomes if status.startswith("2")]
    errors = Counter(status for _, status in outcomes if not status.startswith("2"))
    result = LoadResult(
        concurrency=concurrency,
        duration_s=elapsed_s,
        requests=len(outcomes),
        ok=len(ok_latencies),
        errors=sum(errors.values()),
        error_statuses=dict(errors),
        throughput_per_s=len(ok_latencies) / elapsed_s if elapsed_s else 0.0,
        mode=mode,
    )
    if ok_latencies:
        values = np.array(ok_latencies)
        result.p50_ms, result.p95_ms, result.p99_ms = (float(np.percentile(values, q)) for q in (50, 95, 99))
        result.mean_ms = float(values.mean())
    return result
