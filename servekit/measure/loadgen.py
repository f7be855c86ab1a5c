"""HTTP load generators that run in their own processes, so they never share an interpreter with what they
measure: servekit's own (aiohttp, split over several processes at high concurrency) or wrk, a C generator that
costs the machine far less CPU per request (closed loop only; used when installed and asked for). Each result
says which generator produced it and how much CPU the generator used.

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
import json
import math
import multiprocessing
import resource
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from servekit.core.choices import GENERATORS
from servekit.core.errors import ServerError, UsageError
from servekit.core.timing import CpuMonitor, CpuUse, Figure
from servekit.core.transport import Session, TransportError
from servekit.serve.client import Keys, bearer, is_invalid_key

CLIENTS_PER_PROCESS = 16  # one aiohttp process keeps about this many clients busy before its own CPU is the limit


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
    generator: str = "python"
    client_cpu_s: float = 0.0  # CPU seconds the generator used

    @property
    def client_cores(self) -> float:
        return self.client_cpu_s / self.duration_s if self.duration_s else 0.0

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
        outcomes, elapsed = asyncio.run(_drive(url, headers, bodies, concurrency, duration_s, rate, timeout_s, keys))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        connection.send((outcomes, elapsed, usage.ru_utime + usage.ru_stime))
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
    generator: str = "python",
    keys: Keys | None = None,
) -> LoadResult:
    """POSTs `bodies` (round robin) to `url` for `duration_s` from separate processes; 2xx counts as success.

    generator: "python" (aiohttp), "wrk" (must be installed), "auto" (wrk when installed and the loop is closed).
    `keys` (a ServeClient's `keys`) authorizes each request with the current inference key and renews it when
    the server refuses it; without them, `headers` are sent as they are. wrk cannot renew a key mid-run: it gets
    a key the server accepts at the start (see `live_key_headers`).
    """
    if concurrency < 1 or duration_s <= 0 or not bodies or (rate is not None and rate <= 0):
        raise ValueError("need concurrency >= 1, duration > 0, a positive rate and at least one body")
    chosen = pick_generator(generator, rate)
    if chosen == "wrk":
        if keys is not None:
            headers = live_key_headers(url, headers, bodies[0], keys, timeout_s)
        return run_wrk(url, headers, bodies, concurrency, duration_s, timeout_s)
    processes = min(max(1, concurrency // CLIENTS_PER_PROCESS), concurrency)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    per_process_rate = rate / processes if rate else None
    context = multiprocessing.get_context("spawn")
    children = []
    for share in shares:
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_child,
            args=(sender, url, headers, bodies, share, duration_s, per_process_rate, timeout_s, keys),
            daemon=True,
        )
        process.start()
        sender.close()
        children.append((process, receiver))
    payloads = []
    try:
        for _, receiver in children:
            if not receiver.poll(duration_s + timeout_s + 60):
                raise TimeoutError(f"the load generator did not report within {duration_s + timeout_s + 60:.0f} s")
            payloads.append(receiver.recv())
    finally:
        for process, _ in children:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    for payload in payloads:
        if isinstance(payload, BaseException):
            raise payload
    outcomes = [outcome for payload in payloads for outcome in payload[0]]
    elapsed = max(payload[1] for payload in payloads)
    result = summarize(outcomes, elapsed, concurrency, "open" if rate else "closed")
    result.generator = f"python x{processes}" if processes > 1 else "python"
    result.client_cpu_s = sum(payload[2] for payload in payloads)
    return result


def live_key_headers(
    url: str, headers: dict[str, str], body: tuple[bytes, str], keys: Keys, timeout_s: float
) -> dict[str, str]:
    """`headers` with an inference key the server accepts now: one request with the current key, renewed if the
    server refuses it (for wrk, which sends one fixed set of headers for the whole run)."""
    key = keys.current("inference")
    data, content_type = body
    try:
        reply = Session().request(
            "POST", url, data=data, headers={**headers, **bearer(key), "Content-Type": content_type}, timeout=timeout_s
        )
    except TransportError as exc:
        raise ServerError(f"cannot reach {url} before the wrk run: {type(exc).__name__}") from None
    if is_invalid_key(reply.status_code, reply.text):
        key = keys.renew("inference", key)
    return {**headers, **bearer(key)}


def pick_generator(generator: str, rate: float | None) -> str:
    if generator not in GENERATORS:
        raise UsageError(f"unknown load generator {generator!r}; choose one of {', '.join(GENERATORS)}")
    if generator == "wrk":
        if shutil.which("wrk") is None:
            raise UsageError("wrk is not installed (apt-get install -y wrk): use --generator python")
        if rate:
            raise UsageError("wrk drives a closed loop only: drop --rate or use --generator python")
    if generator == "auto":
        return "wrk" if shutil.which("wrk") and not rate else "python"
    return generator


WRK_SCRIPT = """
local files = {files}
local types = {types}
local headers = {headers}
local requests, n = {{}}, 0
init = function(args)
  for i, path in ipairs(files) do
    local f = assert(io.open(path, "rb"))
    local h = {{["Content-Type"] = types[i]}}
    for k, v in pairs(headers) do h[k] = v end
    requests[i] = wrk.format("POST", nil, h, f:read("*a"))
    f:close()
  end
end
request = function()
  n = n % #requests + 1
  return requests[n]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'SERVEKIT {{"requests": %d, "duration_us": %d, "status": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"timeout": %d, "p50_us": %f, "p95_us": %f, "p99_us": %f, "mean_us": %f}}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean))
end
"""


def lua_list(values: list[str]) -> str:
    return "{" + ", ".join(json.dumps(value) for value in values) + "}"


def run_wrk(
    url: str, headers: dict[str, str], bodies: list[tuple[bytes, str]], concurrency: int, duration_s: float,
    timeout_s: float,
) -> LoadResult:  # fmt: skip
    """Drives `url` with wrk (one thread, `concurrency` connections, whole seconds) and reads its summary."""
    seconds = max(1, math.ceil(duration_s))
    with tempfile.TemporaryDirectory(prefix="servekit-wrk-") as tmp:
        folder = Path(tmp)
        files = []
        for index, (body, _) in enumerate(bodies[:256]):
            files.append(folder / f"body-{index}")
            files[-1].write_bytes(body)
        header_table = "{" + ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()) + "}"
        script = folder / "post.lua"
        script.write_text(
            WRK_SCRIPT.format(
                files=lua_list([str(f) for f in files]),
                types=lua_list([content_type for _, content_type in bodies[:256]]),
                headers=header_table,
            )
        )
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", f"--timeout={max(1, math.ceil(timeout_s))}s"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [*command, "-s", str(script), url], capture_output=True, text=True, timeout=seconds + timeout_s + 60
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("SERVEKIT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    summary = json.loads(line.removeprefix("SERVEKIT "))
    elapsed = summary["duration_us"] / 1e6
    statuses = {"non-2xx": summary["status"]} | {
        key: summary[key] for key in ("connect", "read", "write", "timeout") if summary[key]
    }
    errors = sum(statuses.values())
    ok = summary["requests"] - summary["status"]
    return LoadResult(
        concurrency=concurrency,
        duration_s=elapsed,
        requests=ok + errors,
        ok=ok,
        errors=errors,
        error_statuses={key: value for key, value in statuses.items() if value},
        throughput_per_s=ok / elapsed if elapsed else 0.0,
        p50_ms=summary["p50_us"] / 1000,
        p95_ms=summary["p95_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        mean_ms=summary["mean_us"] / 1000,
        generator="wrk",
        client_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    )


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


@dataclass
class LoadRun:
    """A load level repeated: the median run, its throughput and p99 as repeated figures, and who used the CPU."""

    result: LoadResult  # the run with the median throughput
    throughput: Figure
    p99: Figure
    cpu: CpuUse

    def to_dict(self) -> dict:
        return asdict(self)


def measure_load(
    url: str,
    headers: dict[str, str],
    bodies: list[tuple[bytes, str]],
    concurrency: int,
    duration_s: float,
    server_pid: int | None = None,
    rate: float | None = None,
    generator: str = "python",
    keys: Keys | None = None,
) -> LoadRun:
    """One run of `run_load` under a CpuMonitor: the generator's CPU counts as the client's, the process tree of
    `server_pid` as the server's, the rest of the machine as background."""
    with CpuMonitor({"server": server_pid} if server_pid else {}, own_label="client") as monitor:
        run = run_load(url, headers, bodies, concurrency, duration_s, rate, generator=generator, keys=keys)
    background = monitor.use.background_cores
    throughput, p99 = Figure.of([run.throughput_per_s], "req/s", background), Figure.of([run.p99_ms], "ms", background)
    return LoadRun(run, throughput, p99, monitor.use)


def merged_runs(runs: list[LoadRun]) -> LoadRun:
    """Repeats of one load level as one: the run with the median throughput, throughput and p99 over the repeats,
    and the CPU each user took over all of them."""
    cpu = CpuUse.combined([run.cpu for run in runs])
    results = [run.result for run in runs]
    median_run = sorted(results, key=lambda result: result.throughput_per_s)[len(results) // 2]
    return LoadRun(
        median_run,
        Figure.of([result.throughput_per_s for result in results], "req/s", cpu.background_cores),
        Figure.of([result.p99_ms for result in results], "ms", cpu.background_cores),
        cpu,
    )
