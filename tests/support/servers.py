"""Real TorchServes for the tests: started on free loopback ports, always stopped by PID."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import psutil

from servekit.build.archive import BuildOptions, build_archive
from servekit.core.processes import wait_until_exited
from servekit.serve import torchserve
from servekit.serve.client import SERVER_STATE_FILE, ServeClient
from servekit.serve.deployments import registered_versions
from servekit.serve.handle import Server
from servekit.serve.proxy import stop_masters_in
from support import REPO

# Archives for tests that need no more than one worker: a second costs seconds at each registration on 2 cores. One
# torch thread, as each of the two default workers had there: more would fight the server and the clients for cores.
ONE_WORKER = BuildOptions(workers=1, torch_threads=1)


def start_server(
    store: Path, workdir: Path, proxy: bool = False, base_config: Path = REPO / "config.properties"
) -> torchserve.ServerState:
    """A TorchServe on free loopback ports; with `proxy`, the traffic-split nginx in front on another one."""
    settings = torchserve.ServerSettings(
        base_config=base_config,
        model_store=store,
        workdir=workdir,
        ports={api: torchserve.free_port() for api in torchserve.DEFAULT_PORTS},
        proxy_port=torchserve.free_port() if proxy else None,
    )
    return torchserve.start(settings)


def stop_everything_from(workdir: Path) -> None:
    """Cleanup that works whatever a test left, by PID: the proxy, then every frontend running from `workdir` and
    its workers, killed at once. A graceful stop spends ~3 s in TorchServe's shutdown; the tests that stop a
    server on purpose (and check what that leaves) call `torchserve.stop` or `serve stop` themselves."""
    workdir = workdir.resolve()
    stop_masters_in(workdir / torchserve.PROXY_DIR)
    for frontend in torchserve.frontends_in(workdir):
        try:
            spawned = [frontend, *frontend.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in spawned:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        wait_until_exited(spawned, 10)
    (workdir / SERVER_STATE_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def digits_server(folder: Path, trained_digits: Path, extra_config: str) -> Iterator[torchserve.ServerState]:
    """A TorchServe whose config.properties adds `extra_config` lines, with digits 1.0.0 registered (one worker)."""
    store = folder / "store"
    build_archive("digits", "1.0.0", trained_digits, store, options=ONE_WORKER)
    base = folder / "config.properties"
    base.write_text((REPO / "config.properties").read_text() + extra_config)
    workdir = folder / "ts"
    state = start_server(store, workdir, base_config=base)
    try:
        ServeClient(state.endpoints()).register("digits-1.0.0.mar", initial_workers=1)
        yield state
    finally:
        stop_everything_from(workdir)


def worker_pids(client: ServeClient, *names: str, version: str | None = None) -> dict[str, list[int]]:
    """Each model's worker PIDs, sorted: the same before and after a request means no worker died of it."""
    return {name: sorted(w["pid"] for w in client.describe(name, version)[0]["workers"]) for name in names}


# The versions of digits the session's proxied server has registered (tests/server/conftest.py: proxied).
PROXIED_VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
# A version of digits in the proxied store, not registered, that fails (503) on the inputs it reads as 8 or 9.
BROKEN_VERSION = "6.0.0"


def server_at(workdir: Path) -> tuple[torchserve.ServerState, ServeClient]:
    """The server as `workdir`'s server.json records it now (a test may have restarted it) and a client of it."""
    handle = Server.connect(workdir)
    return handle.state, handle.client


def unregister_all(client: ServeClient, name: str) -> None:
    """Leaves a shared server as a test found it: every version of `name` it registered goes."""
    for version in registered_versions(client, name):
        client.unregister(name, version)
