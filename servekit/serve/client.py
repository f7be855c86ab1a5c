"""A client for TorchServe's inference and management APIs with token authorization on.

`ServeClient` holds the base URLs, reads the keys from the server's `key_file.json` (renewing them through
TorchServe's token API when they expire), puts a timeout on every call and turns every failure into one exception
with the server's own message in it.
"""

from __future__ import annotations

import json
import mimetypes
import re
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from servekit.core.errors import ApiError, ServekitError, ServerError
from servekit.core.locks import file_lock
from servekit.core.names import check_segment
from servekit.core.transport import Response, Retries, Session, TimedOut, TransportError
from servekit.store.workspace import archive_file_name

DEFAULT_TIMEOUT_S = 30.0
REGISTER_TIMEOUT_S = 300.0
TRANSIENT_STATUSES = (503, 507)
WORKER_DIED = "Worker died."  # TorchServe's message to the requests a crashed worker held (see `transient`)
# The file `servekit serve start` writes beside key_file.json (servekit.serve.torchserve reads and writes it).
SERVER_STATE_FILE = "server.json"
KEY_RENEWAL_LOCK = ".key_file.lock"
# A busy TorchServe on 2 cores left /ping unanswered for over 5 s twice in one test run (the session server, with
# models loading and traffic beside it): a health check waits longer than that before it reports no answer.
PING_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for the inference API, which is safe to repeat (a prediction changes nothing on the server).

    TorchServe answers 503 while no worker is free or the queue is full (`job_queue_size`), and 507 "Worker
    died." (or 500, WORKER_DIED) to the requests a crashed worker held: all are retried with exponential backoff
    (once at once, then after 0.5, 1, 2, 4 s: transport.Retries), each wait plus up to `jitter_s` at random so that
    a crowd of clients turned away together does not come back together. A refused connection is retried once,
    then it is the failover's turn. Management calls that change state are only sent again when the connection was
    refused (nothing reached the server).
    """

    unavailable: int = 5
    connect: int = 1
    backoff_s: float = 0.25
    jitter_s: float = 0.5

    def inference(self) -> Retries:
        return Retries(
            connect=self.connect,
            read=1,
            status=self.unavailable,
            backoff_s=self.backoff_s,
            jitter_s=self.jitter_s,
            statuses=TRANSIENT_STATUSES,
            retry_if=dead_worker_500,
            methods=frozenset({"GET", "POST"}),
        )

    def management(self) -> Retries:
        return Retries(connect=2, backoff_s=self.backoff_s)


@dataclass(frozen=True)
class Endpoints:
    """Where one TorchServe answers, and where its keys are."""

    inference_url: str
    management_url: str
    metrics_url: str
    key_file: Path | None = None


# The APIs key_file.json holds a key for (TorchServe 0.12 with token authorization on).
KEY_APIS = ("inference", "management", "API")


def read_keys(key_file: Path) -> dict[str, str]:
    """{"inference": key, "management": key, "API": key} from TorchServe's key_file.json."""
    try:
        document = json.loads(key_file.read_text())
        keys = {api: entry["key"] for api, entry in document.items()}
    except FileNotFoundError:
        raise ServerError(f"{key_file} not found: is TorchServe running from that folder?") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ServerError(f"{key_file} is not a TorchServe key file ({exc})") from None
    missing = [api for api in KEY_APIS if not isinstance(keys.get(api), str)]
    if missing:
        raise ServerError(f"{key_file} is not a TorchServe key file (no {', '.join(missing)} key)")
    return keys


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def is_invalid_key(status: int, body: str) -> bool:
    """TorchServe 0.12 answers a wrong or expired key with 400 {"type": "InvalidKeyException", ...}."""
    return status in (400, 401) and "InvalidKeyException" in body


@dataclass(frozen=True)
class Keys:
    """The keys of one TorchServe, renewed through its token API once they expire (`token_expiration_min`).

    Holds paths, never keys, so it can be printed, logged and sent to the load generator's process as it is.
    """

    key_file: Path
    management_url: str = ""

    def current(self, api: str) -> str:
        """The key for "inference", "management" or "API" as key_file.json holds it now."""
        return read_keys(self.key_file)[api]

    def renew(self, api: str, refused: str) -> str:
        """A fresh key for "inference" or "management" in place of `refused`, which the server turned down.

        Another client (thread or process) may have renewed it already: then the file holds a new key and that is
        used as it is. Renewals are serialized by a lock file beside key_file.json, so two clients never renew
        one after the other and leave the first with a key the second just replaced.
        """
        with _renewal_guard, self._file_lock():
            key = self.current(api)
            if key != refused:
                return key
            url = f"{self.token_api_url()}/token"
            try:
                response = Session().request(
                    "POST", url, params={"type": api}, headers=bearer(self.current("API")), timeout=DEFAULT_TIMEOUT_S
                )
            except TransportError as exc:
                raise ServerError(f"cannot renew the {api} key at {url}: {type(exc).__name__}") from None
            if not response.ok:
                raise ApiError(response.status_code, error_message(response), url)
            key = self.current(api)
            if key == refused:
                raise ServerError(f"TorchServe's token API answered but {self.key_file} still holds the old {api} key")
            return key

    def token_api_url(self) -> str:
        """The management address (where the token API answers): given, or from server.json beside the keys."""
        if self.management_url:
            return self.management_url
        state_file = self.key_file.parent / SERVER_STATE_FILE
        try:
            return json.loads(state_file.read_text())["management_url"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ServerError(
                f"the keys in {self.key_file} expired and no management address is known to renew them "
                f"({state_file} is missing or unreadable): restart the client with the server's management URL"
            ) from None

    def _file_lock(self) -> AbstractContextManager[None]:
        """The lock file beside the keys that one renewing client holds at a time, across processes."""
        path = self.key_file.parent / KEY_RENEWAL_LOCK
        busy = ServerError(f"another client held {path} too long while renewing keys")
        return file_lock(path, DEFAULT_TIMEOUT_S, busy)


_renewal_guard = threading.Lock()  # one renewal at a time in this process (the file lock spans processes)


def model_path(name: str, version: str | None = None) -> str:
    """NAME or NAME/VERSION for a URL, each checked to be one safe path segment before anything is sent."""
    segments = [check_segment(name, "model name")] + ([check_segment(version, "version")] if version else [])
    return "/".join(quote(segment) for segment in segments)


def answer_of(response: Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def transient(status: int, message: str) -> bool:
    """An error answer another try may turn into an answer: TorchServe busy (503), or the worker died under the
    request: 507 "Worker died." when TorchServe has read the worker's exit code (137) by then, 500 with the same
    message when it has not yet (its clean-up races the process's exit; the test that SIGKILLs a worker under
    traffic met both)."""
    return status in TRANSIENT_STATUSES or (status == 500 and message.endswith(WORKER_DIED))


def dead_worker_500(response: Response) -> bool:
    """`transient` for an answer whose status alone says too little: its body is read only for a 500."""
    return response.status_code == 500 and transient(500, error_message(response))


def error_message(response: Response) -> str:
    """TorchServe's {"code", "type", "message"} or servekit's {"error", "detail"} as one line."""
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())
        title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE)
        if title and response.status_code in (502, 504):  # nginx's own page: TorchServe behind it did not answer
            return (
                f"{title.group(1)} from the proxy: TorchServe behind it did not answer (`servekit status`; "
                "`servekit serve stop` then `servekit serve start --resume` if it died)"
            )
        return title.group(1) if title else text or response.reason
    if isinstance(body, dict):
        kind = body.get("type") or body.get("error") or ""
        message = body.get("message") or body.get("detail")
        if message is None and isinstance(kind, str) and kind:  # KServe's {"error": message}
            return kind
        message = message or json.dumps(body)
        return f"{kind}: {message}" if kind else str(message)
    return json.dumps(body)


def prometheus_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of a Prometheus text page; a counter under its family's name, without
    `_total` whether or not the page has it."""
    from prometheus_client.parser import text_string_to_metric_families  # 40 ms: only where metrics are read

    return [
        (family.name if family.type == "counter" else sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


class ServeClient:
    """Methods named after what users do: `register`, `predict`, `set_default`, `unregister`, ..."""

    def __init__(self, endpoints: Endpoints, timeout_s: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None):
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self.keys = Keys(endpoints.key_file, endpoints.management_url) if endpoints.key_file else None
        retry = retry or RetryPolicy()
        self.sessions = {"inference": Session(retry.inference()), "management": Session(retry.management())}

    # Plumbing --------------------------------------------------------------------------------------------------
    def auth_headers(self, api: str) -> dict[str, str]:
        return bearer(self.keys.current(api)) if self.keys else {}

    def _call(self, api: str, method: str, path: str, timeout_s: float | None = None, **kwargs) -> Response:
        """One API call; a key the server refuses (expired) is renewed through the token API and the call sent again."""
        key = self.keys.current(api) if self.keys else None
        response = self._send(api, method, path, key, timeout_s, kwargs)
        if key and is_invalid_key(response.status_code, response.text):
            response = self._send(api, method, path, self.keys.renew(api, key), timeout_s, kwargs)
        if not response.ok:
            raise ApiError(response.status_code, error_message(response), response.url.split("?", 1)[0])
        return response

    def _send(
        self, api: str, method: str, path: str, key: str | None, timeout_s: float | None, kwargs: dict
    ) -> Response:
        base = self.endpoints.inference_url if api == "inference" else self.endpoints.management_url
        url = f"{base}{path}"
        headers = {**(bearer(key) if key else {}), **kwargs.get("headers", {})}
        options = {k: v for k, v in kwargs.items() if k != "headers"}
        timeout_s = timeout_s or self.timeout_s
        try:
            return self.sessions[api].request(method, url, headers=headers, timeout=timeout_s, **options)
        except TimedOut:
            raise ServerError(f"TorchServe did not answer {method} {url} within {timeout_s:g} s") from None
        except TransportError:
            raise ServerError(f"cannot reach TorchServe at {base}: is it running? (servekit serve status)") from None

    # Inference API ---------------------------------------------------------------------------------------------
    def ping(self, timeout_s: float = PING_TIMEOUT_S) -> dict:
        return self._call("inference", "GET", "/ping", timeout_s=timeout_s).json()

    def predict(
        self, name: str, body: bytes | dict | list, version: str | None = None, content_type: str | None = None
    ) -> Any:
        """POSTs raw bytes (content type guessed by the caller or sent as octet-stream) or a JSON document."""
        return answer_of(self.predict_response(name, body, version, content_type))

    def predict_response(
        self, name: str, body: bytes | dict | list, version: str | None = None, content_type: str | None = None
    ) -> Response:
        """The whole HTTP response of a prediction (servekit's handlers add X-Servekit-* timing headers)."""
        path = f"/predictions/{model_path(name, version)}"
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
        """Registers an archive from the server's model store by its file name (never a URL or a path: the server
        refuses those, see docs/security.md); with `synchronous`, returns once workers are up."""
        check_segment(archive, "archive file name")
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
        return self._call("management", "GET", f"/models/{model_path(name, version or 'all')}").json()

    def set_default(self, name: str, version: str) -> dict:
        return self._call("management", "PUT", f"/models/{model_path(name, version)}/set-default").json()

    def unregister(self, name: str, version: str) -> dict:
        """Unregisters a version, and clears what TorchServe 0.12 leaves when it fails half-way.

        An unregister that races requests in flight can answer 500 (a ConcurrentModificationException or a
        NullPointerException while it shuts the workers down) after TorchServe has taken the version out. When that
        was the model's last version, the model stays behind with none, and /ping never answers again (its health
        check reads every model's default version). The same archive registered again without workers and then
        unregistered clears it."""
        path = f"/models/{model_path(name, version)}"
        try:
            return self._call("management", "DELETE", path).json()
        except ApiError as error:
            if error.status != 500 or not self.left_without_versions(name):
                raise
            failed = error
        try:
            self.register(archive_file_name(name, version), initial_workers=0)
            return self._call("management", "DELETE", path).json()
        except ServekitError as exc:
            raise ServerError(
                f"TorchServe failed to unregister {name} {version} ({failed.message}) and left {name} without "
                f"versions; clearing it failed too ({exc}): its /ping will not answer until it is restarted "
                "(servekit serve stop, then servekit serve start)"
            ) from exc

    def left_without_versions(self, name: str) -> bool:
        """Whether TorchServe keeps `name` with no versions at all (`GET /models/NAME/all` answers [])."""
        try:
            return self.describe(name) == []
        except ApiError:
            return False

    def scale(self, name: str, version: str, min_workers: int, max_workers: int, synchronous: bool = True) -> dict:
        params = {"min_worker": min_workers, "max_worker": max_workers, "synchronous": str(synchronous).lower()}
        path = f"/models/{model_path(name, version)}"
        return self._call("management", "PUT", path, timeout_s=REGISTER_TIMEOUT_S, params=params).json()

    def metric_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """(name, labels, value) of every Prometheus sample, parsed with prometheus_client.

        Counters come under their family name without `_total` (`ts_inference_requests`, `Requests2XX`), whether
        TorchServe exposed them with the suffix or not.
        """
        return prometheus_samples(self.metrics())

    def metrics(self) -> str:
        """The Prometheus text from the metrics address (no token needed there)."""
        try:
            response = self.sessions["management"].get(f"{self.endpoints.metrics_url}/metrics", timeout=self.timeout_s)
        except TransportError as exc:
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
                if not transient(exc.status, exc.message):
                    raise
                failures.append(str(exc))
                continue
            self.preferred = index
            return answer
        raise ServerError("no TorchServe answered: " + "; ".join(failures))
