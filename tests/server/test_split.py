"""Weighted, sticky traffic splits through the real nginx proxy in front of a real TorchServe (token auth on)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from click.testing import CliRunner
from support import REPO
from support.alerts import alerted_metrics
from support.http import ClientThreads
from support.servers import BROKEN_VERSION, PROXIED_VERSIONS, server_at

from servekit.cli import cli
from servekit.core.errors import ApiError, UsageError
from servekit.deliver import progressive
from servekit.deliver import split as splits
from servekit.deliver.progressive import Progress, ProgressivePolicy
from servekit.deliver.rollout import RolloutFailed, RolloutPolicy
from servekit.serve import deployments, probe_metrics, proxy, torchserve
from servekit.serve.client import ServeClient, read_keys
from servekit.serve.deployments import default_version, register_verified, registered_versions
from servekit.serve.handle import Server
from servekit.serve.metrics import scrape
from servekit.serve.probe_metrics import AGREEMENT, METRICS_PATH, TIMESTAMP
from servekit.serve.proxy import STATE_FILE, VERSION_HEADER, Split

pytestmark = pytest.mark.server
# The latency gate and p99 comparison have their own tests; on a shared 2-core machine they only add noise here.
QUICK_CHECKS = RolloutPolicy(shadow_samples=8, watch_s=0.5, max_latency_ratio=3.0)


class Caller:
    """Raw HTTP calls to the proxy (no client retries, so every failure shows), one session per thread."""

    def __init__(self, state: torchserve.ServerState):
        self.url = f"{state.proxy_url}/predictions/digits"
        self.token = read_keys(Path(state.key_file))["inference"]
        self.local = threading.local()

    def post(self, body: bytes, key: str | None = None, timeout_s: float = 60.0) -> tuple[int, str | None]:
        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "image/png"}
        if key is not None:
            headers["X-Request-Key"] = key
        response = session.post(self.url, data=body, headers=headers, timeout=timeout_s)
        return response.status_code, response.headers.get(VERSION_HEADER)


def served_since(client: ServeClient, before) -> dict[str, int]:
    """Requests each version answered since `before` (TorchServe's per-version counters)."""
    after = scrape(client)
    return {v: int((after.version("digits", v) - before.version("digits", v)).requests) for v in PROXIED_VERSIONS}


def test_ninety_ten_split_sends_ten_percent_of_distinct_keys_to_the_new_version(proxied, good_png):
    state, client = server_at(proxied)
    server = Server(state, client)
    splits.set_split(server, Split("digits", {"1.0.0": 90, "1.1.0": 10}, sticky_header="X-Request-Key"))
    caller = Caller(state)
    before = scrape(client)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda i: caller.post(good_png, f"user-{i}"), range(2000)))
    served = served_since(client, before)
    assert all(status == 200 for status, _ in outcomes)
    assert served["1.0.0"] + served["1.1.0"] == 2000 and served["1.2.0"] == 0
    assert 9.0 <= served["1.1.0"] / 20 <= 11.0, served
    assert Counter(version for _, version in outcomes) == {"1.0.0": served["1.0.0"], "1.1.0": served["1.1.0"]}
    _, rows, _ = splits.figures(server, "digits")
    shown = {row.version: row for row in rows}
    assert shown["1.1.0"].served == served["1.1.0"] and shown["1.1.0"].proxied == served["1.1.0"]
    assert shown["1.0.0"].errors == 0 and shown["1.0.0"].p99_ms is not None and shown["1.0.0"].mean_ms > 0


def test_each_key_is_answered_by_one_version_every_time(proxied, good_png):
    state, client = server_at(proxied)
    server = Server(state, client)
    splits.set_split(server, Split("digits", {"1.0.0": 50, "1.1.0": 50}, sticky_header="X-Request-Key"))
    caller = Caller(state)
    keys = [f"sticky-{i}" for i in range(100)] * 4
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda key: (key, caller.post(good_png, key)), keys))
    seen: dict[str, set] = defaultdict(set)
    for key, (status, version) in outcomes:
        assert status == 200
        seen[key].add(version)
    assert all(len(versions) == 1 for versions in seen.values())
    assert {next(iter(v)) for v in seen.values()} == {"1.0.0", "1.1.0"}


def test_requests_without_a_key_are_spread_and_the_mirror_gets_its_share(proxied, good_png):
    state, client = server_at(proxied)
    server = Server(state, client)
    split = Split("digits", {"1.0.0": 70, "1.1.0": 30}, mirror_version="1.2.0", mirror_percent=20)
    splits.set_split(server, split)
    caller = Caller(state)
    before = scrape(client)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: caller.post(good_png), range(400)))
    served = served_since(client, before)
    assert all(status == 200 for status, _ in outcomes)
    answered_by = Counter(version for _, version in outcomes)
    assert set(answered_by) == {"1.0.0", "1.1.0"} and 0.2 <= answered_by["1.1.0"] / 400 <= 0.4
    assert 0.12 <= served["1.2.0"] / 400 <= 0.28, served  # mirrored; its answers never reach the client


def test_other_routes_pass_through_and_authorization_is_enforced(proxied, good_png):
    state, client = server_at(proxied)
    server = Server(state, client)
    splits.set_split(server, Split("digits", {"1.0.0": 90, "1.1.0": 10}))
    assert client.ping()["status"] == "Healthy"  # through the proxy
    token = read_keys(Path(state.key_file))["inference"]
    versioned = requests.post(
        f"{state.proxy_url}/predictions/digits/1.2.0",
        data=good_png,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"},
        timeout=30,
    )
    assert versioned.status_code == 200 and VERSION_HEADER not in versioned.headers
    anonymous = requests.post(f"{state.proxy_url}/predictions/digits", data=good_png, timeout=30)
    assert anonymous.status_code in (400, 401, 403) and anonymous.json()["type"] == "InvalidKeyException"
    assert splits.remove_split(server, "digits")
    after = client.predict_response("digits", good_png, content_type="image/png")
    assert VERSION_HEADER not in after.headers and splits.current_split(server, "digits") is None


@pytest.mark.parametrize(
    ("split", "message"),
    [
        (Split("digits", {"1.0.0": 90, "9.9.9": 10}), "9.9.9 is not registered"),
        (Split("digits", {"1.0.0": 90, "1.1.0": 20}), "sum to 110"),
        (Split("digits", {"1.0.0": 90, "1.1.0": 10}, mirror_version="1.1.0", mirror_percent=5), "live branch"),
        (Split("nosuch", {"1.0.0": 100}), "nosuch is not registered"),
        (Split("digits", {"1.0.0": 100}, sticky_header="X Key"), "not a header name"),
    ],
)
def test_bad_splits_are_refused_and_leave_the_proxy_untouched(proxied, split, message):
    state, client = server_at(proxied)
    server = Server(state, client)
    splits.set_split(server, Split("digits", {"1.0.0": 80, "1.1.0": 20}))
    conf, saved = (state.proxy_dir / "nginx.conf").read_bytes(), (state.proxy_dir / STATE_FILE).read_bytes()
    with pytest.raises(UsageError, match=message):
        splits.set_split(server, split)
    assert (state.proxy_dir / "nginx.conf").read_bytes() == conf
    assert (state.proxy_dir / STATE_FILE).read_bytes() == saved


class Load(ClientThreads):
    """`threads` clients posting PNGs through the proxy without retries until stopped, recording (status, version)."""

    def __init__(self, caller: Caller, pngs: list[bytes], threads: int = 16, limit_s: float = 400.0):
        super().__init__(threads, limit_s)
        self.caller, self.pngs = caller, pngs
        self.outcomes: list[tuple[int | str, str | None]] = []
        self.errors: list[str] = []

    def send(self, i: int) -> None:
        started = time.time()
        try:
            outcome = self.caller.post(self.pngs[i % len(self.pngs)])
        except requests.RequestException as exc:  # recorded with its times, and the test fails on it
            outcome = (f"{type(exc).__name__} sent {time.strftime('%X', time.localtime(started))}", None)
            self.errors.append(f"{exc} after {time.time() - started:.1f} s")
        self.outcomes.append(outcome)

    def failures(self, excluding: str | None = None) -> list:
        return [o for o in self.outcomes if o[0] != 200 and (excluding is None or o[1] != excluding)]


def other_version(client: ServeClient) -> tuple[str, str]:
    current = default_version(client, "digits")
    return current, "1.1.0" if current == "1.0.0" else "1.0.0"


def test_sixteen_clients_lose_nothing_across_splits_a_progressive_rollout_an_abort_and_a_drained_retire(
    proxied, held_out
):
    state, client = server_at(proxied)
    server = Server(state, client)
    previous, candidate = other_version(client)
    pngs = [sample.path.read_bytes() for sample in held_out[:40]]
    policy = ProgressivePolicy(steps=(5, 25, 50, 100), step_s=0.5, max_p99_ratio=10.0)
    with Load(Caller(state), pngs) as load:
        splits.set_split(server, Split("digits", {previous: 90, candidate: 10}))
        for weight in (25, 50, 75, 10):  # four weight changes: each one an nginx reload under load
            splits.set_split(server, Split("digits", {previous: 100 - weight, candidate: weight}))
        splits.remove_split(server, "digits")
        report = progressive.progressive_rollout(server, "digits", candidate, policy, QUICK_CHECKS)
        promoted_at = len(load.outcomes)
        with pytest.raises(RolloutFailed) as aborted:
            progressive.progressive_rollout(
                server,
                "digits",
                BROKEN_VERSION,
                ProgressivePolicy((25, 50, 100), 1.5, max_p99_ratio=10.0),
                QUICK_CHECKS,
            )
        time.sleep(0.5)  # answers already received but not yet recorded by their thread
        after_abort = len(load.outcomes)
        splits.set_split(server, Split("digits", {candidate: 50, "1.2.0": 50}))
        drained = splits.retire_drained(server, "digits", "1.2.0")
        time.sleep(1)
    try:
        assert report.promoted and [s.name for s in report.steps][-5:] == ["5%", "25%", "50%", "100%", "promote"]
        assert default_version(client, "digits") == candidate
        assert all(step.numbers["errors"] == 0 for step in report.steps if step.name.endswith("%"))
        failed = aborted.value.report.steps[-1]
        assert failed.name == "25%" and not failed.ok and "error rate" in failed.detail
        assert failed.numbers["errors"] > 0 and failed.numbers["error_rate"] > 0.01
        assert f"{BROKEN_VERSION} back to 0 %" in str(aborted.value) and default_version(client, "digits") == candidate
        assert drained.moved_to == candidate and "1.2.0" not in registered_versions(client, "digits")
        assert splits.current_split(server, "digits") == Split("digits", {candidate: 100})
        # The only failures: the broken candidate's own answers, during its one step.
        assert load.failures(excluding=BROKEN_VERSION) == [] and len(load.outcomes) > 300, load.errors
        assert all(
            version != BROKEN_VERSION for _, version in load.outcomes[:promoted_at] + load.outcomes[after_abort:]
        )
        assert {version for _, version in load.outcomes} >= {previous, candidate, BROKEN_VERSION, "1.2.0"}
    finally:  # as found: the proxied server is shared with test_probe.py, which counts its versions
        splits.remove_split(server, "digits")
        if BROKEN_VERSION in registered_versions(client, "digits"):  # an aborted candidate stays registered at 0 %
            client.unregister("digits", BROKEN_VERSION)
        if "1.2.0" not in registered_versions(client, "digits"):
            register_verified(client, Path(state.model_store), "digits", "1.2.0", workers=1)


def test_an_interrupted_progressive_rollout_resumes_from_its_step(proxied):
    state, client = server_at(proxied)
    server = Server(state, client)
    previous, candidate = other_version(client)
    policy = ProgressivePolicy(steps=(10, 50, 100), step_s=0.5)
    # What a crash during the 50 % step leaves: the progress file and the split.
    Progress("digits", candidate, previous, policy.__dict__, step_index=1).save(Path(state.workdir))
    splits.set_split(server, Split("digits", {previous: 50, candidate: 50}))
    with pytest.raises(UsageError, match="unfinished"):
        progressive.progressive_rollout(server, "digits", candidate, policy, QUICK_CHECKS)
    started = time.time()
    report = progressive.resume(server)
    assert [s.name for s in report.steps] == ["50%", "100%", "promote"] and report.promoted
    # Each step recorded both versions' golden-probe gauges, which the alerts read (see test_probe.py).
    recorded = probe_metrics.parse(probe_metrics.probes_file(Path(state.workdir)).read_text())
    for version in (previous, candidate):
        assert recorded[("digits", version)][TIMESTAMP] >= started
        assert recorded[("digits", version)][AGREEMENT] >= policy.min_agreement
    assert default_version(client, "digits") == candidate and splits.current_split(server, "digits") is None
    assert not Progress.path(Path(state.workdir)).exists()
    # A crash between set-default and removing the split: resuming only removes the split.
    Progress("digits", candidate, previous, policy.__dict__, step_index=2).save(Path(state.workdir))
    splits.set_split(server, Split("digits", {previous: 0, candidate: 100}))
    finished = progressive.resume(server)
    assert finished.promoted and [s.name for s in finished.steps] == ["promote"]
    assert splits.current_split(server, "digits") is None and not Progress.path(Path(state.workdir)).exists()


def test_split_by_hand_abandons_an_unfinished_rollout_and_bad_input_exits_2(proxied):
    state, client = server_at(proxied)
    previous, candidate = other_version(client)
    workdir = ["--workdir", state.workdir]
    Progress("digits", candidate, previous, ProgressivePolicy().__dict__, step_index=1).save(Path(state.workdir))
    runner = CliRunner()
    result = runner.invoke(cli, ["split", "digits", f"{previous}=100", *workdir])
    assert result.exit_code == 0, result.output
    assert "abandoned" in result.output and not Progress.path(Path(state.workdir)).exists()
    shown = runner.invoke(cli, ["split", "digits", "--json", *workdir])
    assert json.loads(shown.output)["split"]["branches"] == {previous: 100}
    for arguments in (
        [f"{previous}=90", f"{candidate}=20"],
        [f"{previous}=90", "9.9.9=10"],
        [f"{previous}=90", f"{candidate}=10", "--mirror", f"{candidate}=5"],
        [f"{previous}=ninety"],
    ):
        bad = runner.invoke(cli, ["split", "digits", *arguments, *workdir])
        assert bad.exit_code == 2 and bad.output.count("\n") == 1 and bad.output.startswith("error:"), bad.output
    assert runner.invoke(cli, ["split", "nosuch", *workdir]).exit_code == 2
    assert runner.invoke(cli, ["rollout", "--resume", *workdir]).exit_code == 2
    assert runner.invoke(cli, ["split", "digits", "--clear", *workdir]).exit_code == 0


def test_every_metric_the_alerts_use_is_exposed_by_torchserve_or_the_proxy(proxied, good_png):
    state, client = server_at(proxied)
    client.predict("digits", good_png, version="1.0.0", content_type="image/png")
    # TorchServe creates Requests4XX from the first 4xx on: answer one here, whatever ran before this test.
    with pytest.raises(ApiError) as refused:
        client.predict("digits", b"not an image", version="1.0.0", content_type="image/png")
    assert 400 <= refused.value.status < 500
    # servekit's own gauges (golden probes) come from the proxy, once a probe has run.
    probed = CliRunner().invoke(cli, ["probe", "digits", "--workdir", state.workdir])
    assert probed.exit_code == 0, probed.output
    served = requests.get(f"{state.proxy_url}{METRICS_PATH}", timeout=10)
    assert served.status_code == 200, served.text
    exposed = {
        line.split("{")[0].split(" ")[0]
        for text in (client.metrics(), served.text)
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    lazily_created = {"Requests5XX"}  # the same from the first 5xx on; a healthy handler answers none
    assert alerted_metrics() - lazily_created <= exposed, alerted_metrics() - exposed


def test_a_two_version_split_exports_as_a_kserve_canary(proxied, tmp_path):
    state, client = server_at(proxied)
    server = Server(state, client)
    current, other = other_version(client)
    splits.set_split(server, Split("digits", {current: 85, other: 15}, sticky_header="X-Request-Key"))
    export = [
        "export",
        "kserve",
        "digits",
        "--from-split",
        "--storage-uri",
        "gs://bucket/digits",
        "--out",
        str(tmp_path),
    ]
    arguments = [*export, "--store", state.model_store, "--workdir", state.workdir]
    try:
        result = CliRunner().invoke(cli, arguments)
        assert result.exit_code == 0, result.output
        manifest = yaml.safe_load((tmp_path / "inferenceservice.yaml").read_text())
        assert manifest["spec"]["predictor"]["canaryTrafficPercent"] == 15
        assert manifest["metadata"]["labels"]["servekit/version"] == other
        assert "cannot carry stickiness on X-Request-Key" in result.output
        splits.set_split(server, Split("digits", {current: 80, other: 10, "1.2.0": 10}))
        three = CliRunner().invoke(cli, arguments)
        assert three.exit_code == 2 and "two revisions" in three.output
    finally:
        splits.remove_split(server, "digits")


def test_stop_and_resume_bring_the_proxy_back_with_its_split(proxied, good_png):
    state, client = server_at(proxied)
    server = Server(state, client)
    current, other = other_version(client)
    splits.set_split(server, Split("digits", {current: 50, other: 50}))
    assert torchserve.stop(proxied)
    assert proxy.nginx_process(state.proxy_pid, proxy.ProxyConfig.load(state.proxy_dir)) is None
    settings = torchserve.ServerSettings(
        REPO / "config.properties", Path(state.model_store), proxied, resume=True, proxy_port=torchserve.free_port()
    )
    resumed = torchserve.start(settings)
    try:
        assert resumed.proxy_url == state.proxy_url and resumed.proxy_pid != state.proxy_pid
        client = ServeClient(resumed.endpoints())
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            restored = deployments.versions(client, "digits")
            if len(restored) >= len(PROXIED_VERSIONS) and all(version.ready_workers for version in restored):
                break
            time.sleep(0.2)
        answered = {client.predict_response("digits", good_png, content_type="image/png").headers[VERSION_HEADER]}
        for _ in range(30):
            answered.add(client.predict_response("digits", good_png, content_type="image/png").headers[VERSION_HEADER])
        assert answered == {current, other}
    finally:
        splits.remove_split(Server(resumed, client), "digits")
