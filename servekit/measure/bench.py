"""`servekit bench`: served throughput and latency per concurrency level, next to the same archive's handler in
process and, optionally, the original design's Flask baseline.

Per level: throughput, latency p50/p95/p99, errors, and the server's own view from its Prometheus metrics (queue
wait and service time per request; the batch size and stage times of the last batch whose gauges the handler
emitted, once a second). In the same run: the handler in process on the same bodies at the archive's batch size, giving
    serving efficiency = served throughput / in-process throughput
    added latency      = served p50 - in-process p50 (one request).
Each level is repeated (`repeats`): throughput is the median with the spread of the repeats, and the CPU the client
(load generator), the server (TorchServe and its workers) and every other process used is recorded beside it, so
a reader sees when the machine, not the server, was the limit; a level with a wide spread or a busy machine is
marked unreliable. Each row names the load generator that produced it.

Before the first level the server is warmed up (`warmup_s` at the highest concurrency, not measured): TorchServe's
frontend is Java, and until its JIT has compiled the request path a cold server's throughput climbs run after run
(digits, 16 clients, 2 cores: 324 req/s in the first 5 s, ~590 from 30 s on).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from servekit.core.choices import PEERS
from servekit.core.errors import ServekitError, UsageError
from servekit.core.processes import paused
from servekit.core.timing import CpuUse, Figure, machine_summary, percentile, time_calls
from servekit.measure.loadgen import LoadResult, LoadRun, measure_load, merged_runs, run_load
from servekit.measure.peers import STARTED_PEERS, Peer
from servekit.serve import metrics
from servekit.serve.client import Keys, ServeClient
from servekit.serve.deployments import default_version, registered_versions, version_info
from servekit.serve.handle import Server
from servekit.serve.torchserve import free_port
from servekit.store.catalog import Catalog
from servekit.store.heldout import HeldOutSample, read_held_out
from servekit.store.workspace import DEFAULT_STORE, DEFAULT_TRITON_WORKDIR


@dataclass
class InProcess:
    batch_size: int
    throughput_per_s: float
    p50_ms: float  # one request through the handler
    batch_p50_ms: float
    device: str = "cpu"  # where the handler ran: the served workers' device


@dataclass
class Level:
    served: LoadResult  # the repeat with the median throughput
    throughput: Figure | None = None  # over the repeats, with the background load
    cpu: CpuUse | None = None
    queue_ms: float | None = None
    service_ms: float | None = None
    handler_last_batch: dict = field(default_factory=dict)
    efficiency: float | None = None
    added_latency_ms: float | None = None
    baseline: LoadResult | None = None
    baseline_throughput: Figure | None = None
    baseline_cpu: CpuUse | None = None
    ratio_over_baseline: float | None = None


@dataclass
class BenchReport:
    name: str
    version: str
    archive: str
    bodies: int
    duration_s: float
    in_process: InProcess
    levels: list[Level]
    baseline: str = ""
    machine: str = ""
    repeats: int = 1
    warmup_s: float = 0.0  # unmeasured load before the first level (a started peer: up to its own warm-up)
    runtime: str = "torchserve"  # what served NAME: servekit's TorchServe or the Triton of its repository

    def to_dict(self) -> dict:
        return asdict(self)


def request_bodies(source: Path | None, input_file: Path | None) -> list[tuple[bytes, str]]:
    """The bodies to send: one file, or every sample of a held-out folder."""
    if input_file is not None:
        if not input_file.is_file():
            raise UsageError(f"--input {input_file} is not a file")
        return [(input_file.read_bytes(), HeldOutSample(input_file, "").content_type)]
    if source is None:
        raise UsageError("give --input FILE or --held-out DIR")
    samples = read_held_out(source)
    if not samples:
        raise UsageError(f"{source} has no samples")
    return [(sample.path.read_bytes(), sample.content_type) for sample in samples]


def bench_version(client: ServeClient, name: str, version: str | None) -> str:
    """The version to bench (the default unless given); one the server does not have is refused here, before any
    warm-up or load."""
    registered = registered_versions(client, name)
    if not registered:
        raise ServekitError(f"{name} is not registered on this server: servekit register {name} --version V")
    if version is not None and version not in registered:
        raise ServekitError(
            f"{name} {version} is not registered on this server (registered: {', '.join(registered)}): "
            f"servekit register {name} --version {version}"
        )
    return version or default_version(client, name)


def bench_bodies(store: Path, name: str, version: str, held_out: Path | None, input_file: Path | None):
    """The bodies to send: the --input file, the --held-out folder, or else the archive's golden samples."""
    if held_out is None and input_file is None:
        entry = Catalog.load(store).get(name, version)
        if entry is None or not entry.golden_dir:
            raise UsageError(
                f"{name} {version} has no golden samples in the catalog: pass --held-out DIR or --input FILE"
            )
        held_out = store / entry.golden_dir
    return request_bodies(held_out, input_file)


def measure_in_process(
    archive: Path, bodies: list[tuple[bytes, str]], budget_s: float, gpu_id: int | None = None
) -> InProcess:
    """Single-request latency and batch throughput of the archive's handler in this process, on the GPU `gpu_id`
    when the served workers run on one (like with like: same handler, same device)."""
    from servekit.measure.inprocess import InProcessHandler

    with InProcessHandler(archive, gpu_id=gpu_id) as handler:
        singles = time_calls(handler.handle, [[body] for body in bodies[:200]], 0.0, 50)
        size = handler.batch_size
        batches = [[bodies[(i + j) % len(bodies)] for j in range(size)] for i in range(0, len(bodies), size)]
        batch_times = time_calls(handler.handle, batches, budget_s, 20, warmup=0)
    batch_p50 = percentile(batch_times, 50)
    device = "cpu" if gpu_id is None else f"cuda:{gpu_id}"
    return InProcess(size, size * 1000 / batch_p50, percentile(singles, 50), batch_p50, device)


def triton_peer(triton, name: str, version: str, bodies: list[tuple[bytes, str]]) -> Peer:
    """A running Triton (servekit serve triton) serving NAME VERSION, asked with the v2 documents of `bodies`."""
    from servekit.build.triton import recorded_versions
    from servekit.serve.protocols import v2_body

    numbers = recorded_versions(Path(triton.repository) / name)
    if version not in numbers:
        raise UsageError(f"{name} {version} is not in the Triton repository {triton.repository}: export it first")
    url = f"{triton.url}/v2/models/{name}/versions/{numbers[version]}/infer"
    return Peer("triton", url, triton.pid, [v2_body(body, content_type) for body, content_type in bodies], float("inf"))


@dataclass
class BenchPlan:
    """What `servekit bench` runs: NAME VERSION under each concurrency level, and optionally a peer beside it.

    bodies: the request bodies [the --input file, the --held-out folder, or else the archive's golden samples].
    peer: "flask", "litserve" or "torchserve" (servekit.measure.peers: started here on `peer_model_dir`), or
    "triton" (the Triton `servekit serve triton` recorded in `triton_workdir`, asked in v2 as TorchServe then is).
    runtime: what serves NAME: "torchserve" (servekit's, the `server` of `bench`) or "triton" (the Triton of
    `triton_workdir`, asked in v2, its archives in `store`; no TorchServe needed).
    warmup_s: load at the highest level before measuring, unrecorded (a started peer gets up to 2 s of it).
    """

    name: str
    version: str | None = None  # [the server's default version]
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    duration_s: float = 10.0
    rate: float | None = None  # open loop: requests per second
    repeats: int = 1
    warmup_s: float = 0.0
    generator: str = "python"
    bodies: list[tuple[bytes, str]] | None = None
    held_out: Path | None = None
    input_file: Path | None = None
    peer: str | None = None
    peer_model_dir: Path | None = None
    triton_workdir: Path | None = None
    runtime: str = "torchserve"
    store: Path | None = None  # with runtime "triton" [model_store]


PEER_LABELS = {
    "flask": "Flask baseline",
    "litserve": "LitServe",
    "torchserve": "TorchServe's example",
    "triton": "Triton",
}
RUNTIME_LABELS = {"torchserve": "TorchServe", "triton": "Triton"}


@dataclass
class Side:
    """One side of a comparison: where its load goes, with which bodies, and the process tree whose CPU is its own."""

    url: str
    bodies: list[tuple[bytes, str]]
    pid: int | None
    keys: Keys | None = None  # servekit's TorchServe: renewed when it expires mid-run
    pausable: bool = False  # a peer bench started: paused while the other side is measured


class ServedRuntime(Protocol):
    """What serves the benched model: which version, where its load goes, its own figures, its device."""

    label: str
    store: Path

    def version(self, name: str, version: str | None) -> str: ...
    def side(self, name: str, version: str, bodies: list[tuple[bytes, str]]) -> Side: ...
    def figures(self, name: str, version: str) -> tuple[metrics.VersionFigures, dict]: ...
    def gpu_id(self, name: str, version: str) -> int | None: ...


class TorchServeRuntime:
    """servekit's TorchServe as the served side: a registered version, its own figures from its metrics."""

    label = "torchserve"

    def __init__(self, server: Server):
        self.server = server

    @property
    def store(self) -> Path:
        return self.server.store

    def version(self, name: str, version: str | None) -> str:
        return bench_version(self.server.client, name, version)

    def side(self, name: str, version: str, bodies: list[tuple[bytes, str]]) -> Side:
        client = self.server.client
        url = f"{client.endpoints.inference_url}/predictions/{name}/{version}"
        return Side(url, bodies, self.server.state.pid, client.keys)

    def figures(self, name: str, version: str) -> tuple[metrics.VersionFigures, dict]:
        """The version's cumulative counts and times, and the handler's last-batch gauges."""
        scrape = metrics.scrape(self.server.client)
        return scrape.version(name, version), scrape.handler.get(name, {})

    def gpu_id(self, name: str, version: str) -> int | None:
        return workers_gpu(self.server.client, name, version)


class TritonRuntime:
    """The Triton of `servekit serve triton` as the served side: an exported version, asked in v2 documents."""

    label = "triton"

    def __init__(self, triton, store: Path):
        self.triton, self.store = triton, store

    def numbers(self, name: str) -> dict[str, int]:
        from servekit.build.triton import recorded_versions

        return recorded_versions(Path(self.triton.repository) / name)

    def version(self, name: str, version: str | None) -> str:
        """The version given, else the newest exported (Triton's `/v2/models/NAME/infer` serves the highest)."""
        numbers = self.numbers(name)
        if not numbers or (version is not None and version not in numbers):
            what = f"{name} {version}" if version else name
            raise UsageError(f"{what} is not in the Triton repository {self.triton.repository}: export it first")
        return version or max(numbers, key=numbers.get)

    def side(self, name: str, version: str, bodies: list[tuple[bytes, str]]) -> Side:
        peer = triton_peer(self.triton, name, version, bodies)
        return Side(peer.url, peer.bodies, peer.pid)

    def figures(self, name: str, version: str) -> tuple[metrics.VersionFigures, dict]:
        from servekit.serve.triton import version_figures

        return version_figures(self.triton, name, self.numbers(name)[version]), {}

    def gpu_id(self, name: str, version: str) -> int | None:
        config = Path(self.triton.repository) / name / "config.pbtxt"
        if "KIND_GPU" not in config.read_text():
            return None
        import torch

        return 0 if torch.cuda.is_available() else None


def served_runtime(server: Server, plan: BenchPlan) -> ServedRuntime:
    if plan.runtime == "torchserve":
        return TorchServeRuntime(server)
    if plan.runtime != "triton":
        raise UsageError(f"unknown runtime {plan.runtime!r}: torchserve or triton")
    if plan.peer == "triton":
        raise UsageError("--runtime triton is benched beside flask, litserve or torchserve, not beside itself")
    from servekit.serve.triton import TritonState

    return TritonRuntime(TritonState.load(plan.triton_workdir or DEFAULT_TRITON_WORKDIR), plan.store or DEFAULT_STORE)


def bench(server: Server, plan: BenchPlan, on_level=None) -> BenchReport:
    """Runs every concurrency level against the served model and the peer, round by round, then the handler in
    process.

    The served runtime's process tree's CPU is reported as the server's (TorchServe's frontend and its workers, or
    tritonserver and its backend stubs). With a Triton peer, TorchServe is asked on its KServe v2 route with the same
    v2 documents (like for like).
    """
    from servekit.store.catalog import verify_archive

    name = plan.name
    if not plan.concurrency or min(plan.concurrency) < 1 or plan.duration_s <= 0 or plan.repeats < 1:
        raise UsageError("concurrency levels and repeats must be >= 1 and the duration > 0")
    if plan.warmup_s < 0:
        raise UsageError("the warm-up must be >= 0")
    if plan.peer not in (None, *PEERS):
        raise UsageError(f"unknown peer {plan.peer!r}: one of {', '.join(PEERS)}")
    if plan.peer in STARTED_PEERS and plan.peer_model_dir is None:
        raise UsageError(f"the {plan.peer} peer serves a trained folder: give its path (--baseline-model)")
    runtime = served_runtime(server, plan)
    version = runtime.version(name, plan.version)
    bodies = plan.bodies or bench_bodies(runtime.store, name, version, plan.held_out, plan.input_file)
    entry = verify_archive(runtime.store, name, version)
    with contextlib.ExitStack() as running:
        sides, peer = bench_sides(runtime, plan, version, bodies, running)
        warmups = (plan.warmup_s, min(plan.warmup_s, peer.warmup_s) if peer else 0)  # a started peer: its own share
        for side, seconds in zip(sides, warmups, strict=False):
            if seconds:
                with paused(others_pausable(sides, side)):
                    run_load(side.url, {}, side.bodies, max(plan.concurrency), seconds, plan.rate,
                             generator=plan.generator, keys=side.keys)  # fmt: skip
        levels = [measure_level(runtime, version, sides, level, plan, on_level) for level in plan.concurrency]
    in_process = measure_in_process(
        runtime.store / entry.archive, bodies, min(plan.duration_s, 5.0), runtime.gpu_id(name, version)
    )
    for level in levels:
        level.efficiency = ratio(level.served.throughput_per_s, in_process.throughput_per_s)
        level.added_latency_ms = level.served.p50_ms - in_process.p50_ms if level.served.ok else None
    return BenchReport(
        name,
        version,
        entry.archive,
        len(bodies),
        plan.duration_s,
        in_process,
        levels,
        peer.label if peer is not None else "",
        machine_summary(),
        plan.repeats,
        plan.warmup_s,
        runtime.label,
    )


def bench_sides(runtime: ServedRuntime, plan: BenchPlan, version: str, bodies, running: contextlib.ExitStack):
    """The served side, and the peer's when the plan names one (started here and stopped with `running`). A Triton
    peer is asked in KServe v2, and then servekit too, on TorchServe's v2 route (which serves the default only)."""
    served = runtime.side(plan.name, version, bodies)
    if plan.peer == "triton":
        from servekit.serve.triton import TritonState

        client = runtime.server.client  # a Triton peer only beside TorchServe (served_runtime)
        triton = TritonState.load(plan.triton_workdir or DEFAULT_TRITON_WORKDIR)
        peer = triton_peer(triton, plan.name, version, bodies)
        if default_version(client, plan.name) != version:
            raise UsageError(f"{plan.name} {version} is not the default version: TorchServe's v2 route serves it only")
        served.url, served.bodies = f"{client.endpoints.inference_url}/v2/models/{plan.name}/infer", peer.bodies
    elif plan.peer in STARTED_PEERS:
        peer = running.enter_context(STARTED_PEERS[plan.peer](plan.peer_model_dir, free_port())).peer(bodies)
    else:
        return [served], None
    return [served, Side(peer.url, peer.bodies, peer.pid, pausable=plan.peer in STARTED_PEERS)], peer


def measure_level(
    runtime: ServedRuntime, version: str, sides: list[Side], concurrency: int, plan: BenchPlan, on_level
) -> Level:
    """One concurrency level: the served side's figures with the runtime's own view of them (queue and service time
    from its metrics), and the peer's beside them."""
    before, _ = runtime.figures(plan.name, version)
    served, *peer = alternated(sides, concurrency, plan)
    after, handler = runtime.figures(plan.name, version)
    figures = after - before
    level = Level(served.result, served.throughput, served.cpu, figures.queue_ms, figures.service_ms, handler)
    if on_level:
        on_level("served", level)
    if peer:
        level.baseline, level.baseline_throughput, level.baseline_cpu = peer[0].result, peer[0].throughput, peer[0].cpu
        level.ratio_over_baseline = ratio(level.served.throughput_per_s, level.baseline.throughput_per_s)
        if on_level:
            on_level("baseline", level)
    return level


def alternated(sides: list[Side], concurrency: int, plan: BenchPlan) -> list[LoadRun]:
    """`plan.repeats` rounds at one concurrency, each side once a round and the order reversed every round, so that
    a change in the machine's load falls on every side alike; one LoadRun per side over its rounds."""
    runs: list[list[LoadRun]] = [[] for _ in sides]
    order = list(enumerate(sides))
    for round_number in range(plan.repeats):
        for i, side in order if round_number % 2 == 0 else reversed(order):
            load = (side.url, {}, side.bodies, concurrency, plan.duration_s, side.pid, plan.rate, plan.generator)
            with paused(others_pausable(sides, side)):
                runs[i].append(measure_load(*load, keys=side.keys))
    return [merged_runs(side_runs) for side_runs in runs]


def others_pausable(sides: list[Side], measured: Side) -> list[int]:
    """The started peers to pause while `measured` runs: an idle LitServe polls its queues every millisecond and
    took ~0.25 of a core from servekit on 2 cores, where an idle TorchServe takes ~0.01 from the peer."""
    return [side.pid for side in sides if side is not measured and side.pausable and side.pid]


def workers_gpu(client: ServeClient, name: str, version: str) -> int | None:
    """GPU 0 when TorchServe put this version's workers on GPUs and torch sees one here; else None (the CPU)."""
    if not version_info(client, name, version).on_gpu:
        return None
    import torch

    return 0 if torch.cuda.is_available() else None


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


# Reports ----------------------------------------------------------------------------------------------------------
def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rows(report: BenchReport) -> list[list[str]]:
    table = []
    for level in report.levels:
        s = level.served
        table.append(
            [
                str(s.concurrency),
                s.generator,
                level.throughput.describe(1) if level.throughput else fmt(s.throughput_per_s, 1),
                fmt(s.p50_ms),
                fmt(s.p95_ms),
                fmt(s.p99_ms),
                f"{s.errors}/{s.requests}",
                fmt(level.queue_ms),
                fmt(level.service_ms),
                str(level.handler_last_batch.get("ServekitBatchSize", "-")),
                fmt(level.efficiency),
                fmt(level.added_latency_ms),
                fmt(level.baseline.throughput_per_s, 1) if level.baseline else "-",
                fmt(level.ratio_over_baseline),
                cpu_cell(level.cpu),
                cpu_cell(level.baseline_cpu),
            ]
        )
    return table


def cpu_cell(use: CpuUse | None) -> str:
    """client / server / other processes, in cores."""
    if use is None:
        return "-"
    return " / ".join(fmt(use.measured_cores.get(label, 0.0)) for label in ("client", "server")) + (
        f" / {use.background_cores:.2f}"
    )


HEADERS = [
    "concurrency",
    "generator",
    "req/s (median ±half spread)",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "errors",
    "queue ms",
    "service ms",
    "last batch",
    "efficiency",
    "added p50 ms",
    "flask req/s",
    "x flask",
    "cores client/server/other",
    "flask: cores client/flask/other",
]


def headers(report: BenchReport) -> list[str]:
    """HEADERS with the peer's name (flask or triton) in its columns."""
    return [header.replace("flask", report.baseline) for header in HEADERS] if report.baseline else HEADERS


def write_reports(report: BenchReport, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report.to_dict(), indent=2))
    ip = report.in_process
    lines = [
        f"# servekit bench: {report.name} {report.version} on {RUNTIME_LABELS[report.runtime]}",
        "",
        f"{report.bodies} request bodies, {report.duration_s:g} s per level after {report.warmup_s:g} s of "
        f"unmeasured warm-up, {report.machine}. In process "
        f"(same handler, batch {ip.batch_size}): {ip.throughput_per_s:.1f} samples/s, one request p50 "
        f"{ip.p50_ms:.2f} ms. Each level: median of {report.repeats} run(s)"
        f"{f', one round each beside {report.baseline}, the order reversed every round' if report.baseline else ''}"
        "; CPU in cores used by the load "
        f"generator (client), the server's process tree and every other process; the machine has "
        f"{report.levels[0].cpu.cores if report.levels and report.levels[0].cpu else '?'} cores.",
        *unreliable_lines(report),
        "",
        "| " + " | ".join(headers(report)) + " |",
        "|" + "---|" * len(HEADERS),
        *("| " + " | ".join(row) + " |" for row in rows(report)),
    ]
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n")
    plot(report, out_dir / "bench.png")


def unreliable_lines(report: BenchReport) -> list[str]:
    """A warning per level whose figure is not clean, so nobody quotes it as one."""
    lines = []
    for level in report.levels:
        for label, figure in (("served", level.throughput), (report.baseline, level.baseline_throughput)):
            if figure is not None and not figure.trusted:
                lines.append(
                    f"- **unreliable**: {label} at concurrency {level.served.concurrency}: {', '.join(figure.doubts)}"
                )
    return ["", *lines] if lines else []


def plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [level.served.concurrency for level in report.levels]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    served = RUNTIME_LABELS[report.runtime]
    left.plot(levels, [lv.served.throughput_per_s for lv in report.levels], "o-", label=f"{served} (servekit)")
    left.axhline(report.in_process.throughput_per_s, color="gray", linestyle="--", label="handler in process")
    right.plot(levels, [lv.served.p95_ms for lv in report.levels], "o-", label=f"{served} p95")
    if report.baseline:
        peer = PEER_LABELS.get(report.baseline, report.baseline)
        left.plot(levels, [lv.baseline.throughput_per_s for lv in report.levels], "s-", label=peer)
        right.plot(levels, [lv.baseline.p95_ms for lv in report.levels], "s-", label=f"{peer} p95")
    left.set(xlabel="concurrent clients", ylabel="requests/s", title="throughput", xscale="log")
    right.set(xlabel="concurrent clients", ylabel="ms", title="latency p95", xscale="log")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(f"{report.name} {report.version} on {served}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
