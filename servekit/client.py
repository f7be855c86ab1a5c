"""A client for TorchServe's inference and management APIs with token authorization on.

`ServeClient` holds the base URLs, reads the keys from the server's `key_file.json`, puts a timeout on every
call and turns every failure into one exception with the server's own message in it.
"""

from __future__ import annotations

import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from prometheus_client.parser import text_string_to_metric_families
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from servekit.errors import ApiError, ServerError

DEFAULT_TIMEOUT_S = 30.0
REGISTER_TIMEOUT_S = 300.0
TRANSIENT_STATUSES = (503, 507)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for the inference API, which is safe to repeat (a prediction changes nothing on the server).

    TorchServe answers 503 while no worker is free or the queue is full, and 507 "Worker died." to the requests a
    crashed worker held: both are retried with exponential backoff (0.25, 0.5, 1, 2 s...) while TorchServe
    restarts the worker. A refused connection is retried once, then it is the failover's turn.
    Management calls that change state are never retried.
    """

    unavailable: int = 5
    connect: int = 1
    backoff_s: float = 0.25

    def inference(self) -> Retry:
        return Retry(
            total=None,
            connect=self.connect,
            read=1,
            status=self.unavailable,
            other=0,
            backoff_factor=self.backoff_s,
            status_forcelist=TRANSIENT_STATUSES,
            allowed_methods=frozenset({"GET", "POST"}),
            raise_on_status=False,
            respect_retry_after_header=True,
        )

    def management(self) -> Retry:
        return Retry(
            total=2, connect=2, read=0, status=0, backoff_factor=self.backoff_s, allowed_methods=frozenset({"GET"})
        )


def session_with(retry: Retry) -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=32)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass(frozen=True)
class Endpoints:
    """Where one TorchServe answers, and where its keys are."""

    inference_url: str
    management_url: str
    metrics_url: str
    key_file: Path | None = None


def read_keys(key_file: Path) -> dict[str, str]:
    """{"inference": key, "management": key, "API": key} from TorchServe's key_file.json."""
    try:
        document = json.loads(key_file.read_text())
        return {api: entry["key"] for api, entry in document.items()}
    except FileNotFoundError:
        raise ServerError(f"{key_file} not found: is TorchServe running from that folder?") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ServerError(f"{key_file} is not a TorchServe key file ({exc})") from None


def answer_of(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def error_message(response: requests.Response) -> str:
    """TorchServe's {"code", "type", "message"} or servekit's {"error", "detail"} as one line."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason
    if isinstance(body, dict):
        kind = body.get("type") or body.get("error") or ""
        message = body.get("message") or body.get("detail")
        if message is None and isinstance(kind, str) and kind:  # KServe's {"error": message}
            return kind
        message = message or json.dumps(body)
        return f"{kind}: {message}" if kind else str(message)
    return json.dumps(body)


class ServeClient:
    """Methods named after what users do: `register`, `predict`, `set_default`, `unregister`, ..."""

    def __init__(self, endpoints: Endpoints, timeout_s: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None):
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        retry = retry or RetryPolicy()
        self.sessions = {"inference": session_with(retry.inference()), "management": session_with(retry.management())}

    # Plumbing --------------------------------------------------------------------------------------------------
    def auth_headers(self, api: str) -> dict[str, str]:
        if self.endpoints.key_file is None:
            return {}
        return {"Authorization": f"Bearer {read_keys(self.endpoints.key_file)[api]}"}

    def _call(self, api: str, method: str, path: str, timeout_s: float | None = None, **kwargs) -> requests.Response:
        base = self.endpoints.inference_url if api == "inference" else self.endpoints.management_url
        url = f"{base}{path}"
        headers = {**self.auth_headers(api), **kwargs.pop("headers", {})}
        try:
            response = self.sessions[api].request(
                method, url, headers=headers, timeout=timeout_s or self.timeout_s, **kwargs
            )
        except requests.Timeout:
            raise ServerError(
                f"TorchServe did not answer {method} {url} within {timeout_s or self.timeout_s:g} s"
            ) from None
        except (requests.ConnectionError, requests.exceptions.RetryError):
            raise ServerError(f"cannot reach TorchServe at {base}: is it running? (servekit serve status)") from None
        if not response.ok:
            raise ApiError(response.status_code, error_message(response), url)
        return response

    # Inference API ---------------------------------------------------------------------------------------------
    def ping(self) -> dict:
        return self._call("inference", "GET", "/ping", timeout_s=5).json()

    def predict(
        self, name: str, body: bytes | dict | list, version: str | None = None, content_type: str | None = None
    ) -> Any:
        """POSTs raw bytes (content type guessed by the caller or sent as octet-stream) or a JSON document."""
        return answer_of(self.predict_response(name, body, version, content_type))

    def predict_response(
        self, name: str, body: bytes | dict | list, version: str | None = None, content_type: str | None = None
    ) -> requests.Response:
        """The whole HTTP response of a prediction (servekit's handlers add X-Servekit-* timing headers)."""
        path = f"/predictions/{quote(name)}" + (f"/{quote(version)}" if version else "")
        if isinstance(body, (dict, list)):
            return self._call("inference", "POST", path, json=body)
        headers = {"Content-Type": content_type or "application/octet-stream"}
        return self._call("inference", "POST", path, data=body, headers=headers)

    def predict_file(self, name: str, path: Path, version: str | None = None) -> Any:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix == ".json":
            content_type = "application/json"
        return self.predict(name, path.read_bytes(), version=version, content_type=content_type)

    def post_inference(self, path: str, document: dict) -> Any:
        """POSTs a JSON document to another inference route, e.g. KServe's `/v2/models/NAME/infer`."""
        return answer_of(self._call("inference", "POST", path, json=document))

    # Management API --------------------------------------------------------------------------------------------
    def register(self, archive: str, initial_workers: int = 1, synchronous: bool = True) -> dict:
        """Registers an archive from the server's model store; with `synchronous`, returns once workers are up."""
        params = {"url": archive, "initial_workers": initial_workers, "synchronous": str(synchronous).lower()}
        return self._call("management", "POST", "/models", timeout_s=REGISTER_TIMEOUT_S, params=params).json()

    def list_models(self) -> list[dict]:
        """Every registered model name with its default archive; follows TorchServe's pagination."""
        models, token = [], None
        while True:
            params = {"limit": 100, **({"next_page_token": token} if token else {})}
            page = self._call("management", "GET", "/models", params=params).json()
            models += page.get("models", [])
            token = page.get("nextPageToken")
            if not token:
                return models

    def describe(self, name: str, version: str | None = None) -> list[dict]:
        """One dict per version (or the given one): workers with PIDs, batch size, default flag, ..."""
        path = f"/models/{quote(name)}" + (f"/{quote(version) if version else 'all'}")
        return self._call("management", "GET", path).json()

    def set_default(self, name: str, version: str) -> dict:
        return self._call("management", "PUT", f"/models/{quote(name)}/{quote(version)}/set-default").json()

    def unregister(self, name: str, version: str) -> dict:
        return self._call("management", "DELETE", f"/models/{quote(name)}/{quote(version)}").json()

    def scale(self, name: str, version: str, min_workers: int, max_workers: int, synchronous: bool = True) -> dict:
        params = {"min_worker": min_workers, "max_worker": max_workers, "synchronous": str(synchronous).lower()}
        path = f"/models/{quote(name)}/{quote(version)}"
        return self._call("management", "PUT", path, timeout_s=REGISTER_TIMEOUT_S, params=params).json()

    def metric_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """(name, labels, value) of every Prometheus sample, parsed with prometheus_client.

        Counters come under their family name without `_total` (`ts_inference_requests`, `Requests2XX`), whether
        TorchServe exposed them with the suffix or not.
        """
        return [
            (family.name if family.type == "counter" else sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(self.metrics())
            for sample in family.samples
        ]

    def metrics(self) -> str:
        """The Prometheus text from the metrics address (no token needed there)."""
        try:
            response = self.sessions["management"].get(f"{self.endpoints.metrics_url}/metrics", timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise ServerError(f"cannot read metrics from {self.endpoints.metrics_url}: {exc}") from None
        if not response.ok:
            raise ApiError(response.status_code, error_message(response), self.endpoints.metrics_url)
        return response.text


class FailoverClient:
    """Predictions across several TorchServe instances: a refused connection or a lasting 503/507 moves on to the next.

    Sticks to the last instance that answered, so a healthy server keeps the traffic.
    """

    def __init__(self, clients: list[ServeClient]):
        if not clients:
            raise ValueError("FailoverClient needs at least one ServeClient")
        self.clients = clients
        self.preferred = 0

    def predict(
        self, name: str, body: bytes | dict | list, version: str | None = None, content_type: str | None = None
    ):
        return self._first_answer(lambda client: client.predict(name, body, version, content_type))

    def predict_file(self, name: str, path: Path, version: str | None = None):
        return self._first_answer(lambda client: client.predict_file(name, path, version))

    def post_inference(self, path: str, document: dict):
        return self._first_answer(lambda client: client.post_inference(path, document))

    def _first_answer(self, call):
        failures = []
        start = self.preferred
        for offset in range(len(self.clients)):
            index = (start + offset) % len(self.clients)
            try:
                answer = call(self.clients[index])
            except ServerError as exc:
                failures.append(str(exc))
                continue
            except ApiError as exc:
                if exc.status not in TRANSIENT_STATUSES:
                    raise
                failures.append(str(exc))
                continue
            self.preferred = index
            return answer
        raise ServerError("no TorchServe answered: " + "; ".join(failures))
