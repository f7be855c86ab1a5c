"""The golden probes' Prometheus text file in the server's workdir: its gauges, rendering, merging, atomic writes,
and the copy the proxy serves at /servekit/metrics (servekit/deliver/probes.py asks the versions and records here).

The file is replaced atomically; probing one model keeps every other model's lines, and probing a model with no
registered version removes its lines (the alerts would otherwise fire for versions that no longer exist).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from servekit.core.errors import ServerError
from servekit.core.locks import file_lock
from servekit.serve.worker_dir import publish as publish_for_workers
from servekit.store.catalog import write_atomically

PROBES_FILE = "golden_probes.prom"  # in the server's workdir; node_exporter's textfile collector reads *.prom
# (with a proxy, a copy also goes to the proxy workers' folder, servekit/serve/worker_dir.py, which it serves from)
METRICS_PATH = "/servekit/metrics"  # where the proxy serves the file
AGREEMENT = "servekit_golden_probe_agreement"
SAMPLES = "servekit_golden_probe_samples"
TIMESTAMP = "servekit_golden_probe_timestamp_seconds"
HELP = {
    AGREEMENT: "Share of golden samples whose top-1 answer is the golden label (an error counts as a miss).",
    SAMPLES: "Golden samples asked in the last probe.",
    TIMESTAMP: "When the last probe ended (Unix seconds).",
}
LOCK_TIMEOUT_S = 30
SAMPLE_LINE = re.compile(r'^(\w+)\{model_name="((?:[^"\\]|\\.)*)",model_version="((?:[^"\\]|\\.)*)"\} (\S+)$')


@dataclass(frozen=True)
class ProbeResult:
    """One version's answers to its golden samples."""

    name: str
    version: str
    samples: int
    agreeing: int
    at: float  # Unix seconds

    @property
    def agreement(self) -> float:
        return self.agreeing / self.samples if self.samples else 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "agreement": self.agreement}


def probes_file(workdir: Path) -> Path:
    return Path(workdir) / PROBES_FILE


# The exposition file ---------------------------------------------------------------------------------------------
Series = dict[tuple[str, str], dict[str, float]]  # (model, version) -> metric -> value


def escape(value: str) -> str:
    """A label value as the text exposition format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda match: "\n" if match[1] == "n" else match[1], value)


def format_value(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(series: Series) -> str:
    """The text exposition of these series: HELP and TYPE once per metric, lines sorted by model and version."""
    lines = []
    for metric, help_text in HELP.items():
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
        for (model, version), values in sorted(series.items()):
            if metric in values:
                labels = f'model_name="{escape(model)}",model_version="{escape(version)}"'
                lines.append(f"{metric}{{{labels}}} {format_value(values[metric])}")
    return "\n".join(lines) + "\n"


def parse(text: str) -> Series:
    """The series of a file `render` wrote (other lines are ignored)."""
    series: Series = {}
    for line in text.splitlines():
        match = SAMPLE_LINE.match(line)
        if match and match[1] in HELP:
            series.setdefault((unescape(match[2]), unescape(match[3])), {})[match[1]] = float(match[4])
    return series


def as_series(results: Iterable[ProbeResult]) -> Series:
    return {
        (r.name, r.version): {AGREEMENT: r.agreement, SAMPLES: r.samples, TIMESTAMP: round(r.at, 3)} for r in results
    }


def merge(text: str, results: list[ProbeResult], replace_model: str | None = None) -> str:
    """`text` with these results' series replaced; `replace_model` also drops that model's other versions (a full
    probe of a model forgets versions no longer registered)."""
    series = {key: values for key, values in parse(text).items() if replace_model is None or key[0] != replace_model}
    return render({**series, **as_series(results)})


def locked(path: Path) -> AbstractContextManager[None]:
    """The probe file's lock: `probe --every` and a rollout's steps may record at once, so read-merge-write under it."""
    busy = ServerError(f"another servekit held {path}'s lock for {LOCK_TIMEOUT_S} s: retry")
    return file_lock(path.with_name(f".{PROBES_FILE}.lock"), LOCK_TIMEOUT_S, busy)


def record(workdir: Path, results: list[ProbeResult], replace_model: str | None = None) -> Path:
    """Merges the results into WORKDIR's probe file, atomically (Prometheus or nginx never read half a file)."""
    path = probes_file(workdir)
    with locked(path):
        existing = path.read_text() if path.is_file() else ""
        replace(workdir, merge(existing, results, replace_model))
    return path


def replace(workdir: Path, text: str) -> None:
    """WORKDIR's probe file and the copy the proxy's workers serve (they may not enter the workdir), both atomically.
    Under the lock."""
    write_atomically(probes_file(workdir), text)
    publish_for_workers(workdir, PROBES_FILE, text)


def publish(workdir: Path) -> None:
    """Copies WORKDIR's probe file (if any) to where the proxy's workers serve it: at the proxy's start."""
    path = probes_file(workdir)
    with locked(path):
        if path.is_file():
            publish_for_workers(workdir, PROBES_FILE, path.read_text())


def forget(workdir: Path, name: str) -> list[str]:
    """Removes NAME's lines from WORKDIR's probe file (a model with no registered version, after a restart without
    --resume, say: its gauges would keep the alerts on versions that no longer exist); the versions removed."""
    path = probes_file(workdir)
    with locked(path):
        existing = path.read_text() if path.is_file() else ""
        removed = sorted(version for model, version in parse(existing) if model == name)
        if removed:
            replace(workdir, merge(existing, [], replace_model=name))
    return removed
