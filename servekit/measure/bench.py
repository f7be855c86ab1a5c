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

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from servekit.core.choices import PEERS
from servekit.core.errors import ServekitError, UsageError
from servekit.core.timing import CpuUse, Figure, machine_summary, percentile, time_calls
from servekit.measure.loadgen import LoadResult, LoadRun, measure_load, run_load
from servekit.measure.peers import STARTED_PEERS, Peer
from servekit.serve import metrics
from servekit.serve.client import ServeClient
from servekit.serve.deployments import default_version, registered_versions, version_info
from servekit.serve.handle import Server
from servekit.serve.torchserve import free_port
from servekit.store.catalog import Catalog
from servekit.store.heldout import HeldOutSample, read_held_out
from servekit.store.workspace import DEFAULT_TRITON_WORKDIR


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
    from servekit.build.triton import VERSIONS_FILE
    from servekit.serve.protocols import v2_body

    recorded = Path(triton.repository) / name / VERSIONS_FILE
    numbers = (
        {semver: n for n, semver in json.loads(recorded.read_text())["versions"].items()} if recorded.is_file() else {}
    )
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


PEER_LABELS = {
    "flask": "Flask baseline",
    "litserve": "LitServe",
    "torchserve": "TorchServe's example",
    "triton": "Triton",
}


def bench(server: Server, plan: BenchPlan, on_level=None) -> BenchReport:
    """Runs every concurrency level against the served model (and the peer), then the handler in process.

    TorchServe's frontend process tree's CPU is reported as the server's. With a Triton peer, TorchServe is asked
    on its KServe v2 route with the same v2 documents (like for like).
    """
    from servekit.store.catalog import verify_archive

    concurrency, duration_s, rate, repeats = plan.concurrency, plan.duration_s, plan.rate, plan.repeats
    generator, warmup_s, client, store, name = plan.generator, plan.warmup_s, server.client, server.store, plan.name
    if not concurrency or min(concurrency) < 1 or duration_s <= 0 or repeats < 1 or warmup_s < 0:
        raise UsageError("concurrency levels and repeats must be >= 1, the duration > 0 and the warm-up >= 0")
    if plan.peer not in (None, *PEERS):
        raise UsageError(f"unknown peer {plan.peer!r}: one of {', '.join(PEERS)}")
    if plan.peer in STARTED_PEERS and plan.peer_model_dir is None:
        raise UsageError(f"the {plan.peer} peer serves a trained folder: give its path (--baseline-model)")
    version = bench_version(client, name, plan.version)
    bodies = plan.bodies or bench_bodies(store, name, version, plan.held_out, plan.input_file)
    entry = verify_archive(store, name, version)
    url, served_bodies = f"{client.endpoints.inference_url}/predictions/{name}/{version}", bodies
    peer = None
    if plan.peer == "triton":
        from servekit.serve.triton import TritonState

        peer = triton_peer(TritonState.load(plan.triton_workdir or DEFAULT_TRITON_WORKDIR), name, version, bodies)
    if peer is not None:  # TorchServe's v2 route serves the default version only
        if default_version(client, name) != version:
            raise UsageError(f"{name} {version} is not the default version: TorchServe's v2 route serves the default")
        url, served_bodies = f"{client.endpoints.inference_url}/v2/models/{name}/infer", peer.bodies
    if warmup_s:
        run_load(url, {}, served_bodies, max(concurrency), warmup_s, rate, generator=generator, keys=client.keys)
    levels = []
    for level in concurrency:
        before = metrics.scrape(client).version(name, version)
        run = measure_load(url, {}, served_bodies, level, duration_s, repeats, server.state.pid, rate, generator,
                           client.keys)  # fmt: skip
        after = metrics.scrape(client)
        figures = after.version(name, version) - before
        levels.append(
            Level(
                run.result, run.throughput, run.cpu, figures.queue_ms, figures.service_ms, after.handler.get(name, {})
            )
        )
        if on_level:
            on_level("served", levels[-1])
    if peer is not None:
        run_peer(peer, levels, duration_s, rate, repeats, generator, warmup_s, on_level)
    elif plan.peer in STARTED_PEERS:
        with STARTED_PEERS[plan.peer](plan.peer_model_dir, free_port()) as started:
            peer = started.peer(bodies)
            run_peer(peer, levels, duration_s, rate, repeats, generator, warmup_s, on_level)
    gpu_id = workers_gpu(client, name, version)
    in_process = measure_in_process(store / entry.archive, bodies, min(duration_s, 5.0), gpu_id)
    for level in levels:
        level.efficiency = ratio(level.served.throughput_per_s, in_process.throughput_per_s)
        level.added_latency_ms = level.served.p50_ms - in_process.p50_ms if level.served.ok else None
    return BenchReport(
        name,
        version,
        entry.archive,
        len(bodies),
        duration_s,
        in_process,
        levels,
        peer.label if peer is not None else "",
        machine_summary(),
        repeats,
        warmup_s,
    )


def run_peer(peer: Peer, levels: list[Level], duration_s, rate, repeats, generator, warmup_s, on_level) -> None:
    """Each level's concurrency against the peer, after its share of the warm-up; its figures beside the level's."""
    if warmup_s:
        run_load(peer.url, {}, peer.bodies, max(lv.served.concurrency for lv in levels), min(warmup_s, peer.warmup_s),
                 rate, generator=generator)  # fmt: skip
    for level in levels:
        run: LoadRun = measure_load(peer.url, {}, peer.bodies, level.served.concurrency, duration_s, repeats, peer.pid,
                                    rate, generator)  # fmt: skip
        level.baseline, level.baseline_throughput, level.baseline_cpu = run.result, run.throughput, run.cpu
        level.ratio_over_baseline = ratio(level.served.throughput_per_s, level.baseline.throughput_per_s)
        if on_level:
            on_level("baseline", level)


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
        f"# servekit bench: {report.name} {report.version}",
        "",
        f"{report.bodies} request bodies, {report.duration_s:g} s per level after {report.warmup_s:g} s of "
        f"unmeasured warm-up, {report.machine}. In process "
        f"(same handler, batch {ip.batch_size}): {ip.throughput_per_s:.1f} samples/s, one request p50 "
        f"{ip.p50_ms:.2f} ms. Each level: median of {report.repeats} run(s); CPU in cores used by the load "
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
    left.plot(levels, [lv.served.throughput_per_s for lv in report.levels], "o-", label="TorchServe (servekit)")
    left.axhline(report.in_process.throughput_per_s, color="gray", linestyle="--", label="handler in process")
    right.plot(levels, [lv.served.p95_ms for lv in report.levels], "o-", label="TorchServe p95")
    if report.baseline:
        peer = PEER_LABELS.get(report.baseline, report.baseline)
        left.plot(levels, [lv.baseline.throughput_per_s for lv in report.levels], "s-", label=peer)
        right.plot(levels, [lv.baseline.p95_ms for lv in report.levels], "s-", label=f"{peer} p95")
    left.set(xlabel="concurrent clients", ylabel="requests/s", title="throughput", xscale="log")
    right.set(xlabel="concurrent clients", ylabel="ms", title="latency p95", xscale="log")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(f"{report.name} {report.version}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
