"""HTTP/1.1 on the standard library for servekit's clients: kept-alive connections per thread, a timeout on every
call, and the retries TorchServe needs.

Why not `requests`: importing it (with urllib3, charset detection, idna, cookies) costs ~0.2 s, which every command
that talks to a server would pay before doing anything (issue 17: everyday commands answer in ≤ 0.5 s). servekit
only calls TorchServe and its own proxy, so it needs none of what that buys (proxies from the environment, cookies,
redirects, content decoding). The load generator's own processes use aiohttp.
"""

from __future__ import annotations

import http.client
import json
import random
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import urlencode, urlsplit

MAX_BACKOFF_S = 30.0
# A kept-alive connection the server closed while it sat idle fails on reuse in one of these ways before any byte
# of the answer arrives: such a request never reached the server and is sent again on a new connection.
STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class TransportError(Exception):
    """No HTTP answer: the connection was refused or broken, or the server took longer than the timeout."""


class ConnectFailed(TransportError):
    pass


class TimedOut(TransportError):
    pass


@dataclass(frozen=True)
class Retries:
    """When to send a call again (urllib3's Retry, in the parts servekit uses).

    `connect`: refused or unreachable (the request was not sent: safe for every method). `read`: the connection broke
    while waiting for the answer, `status`: the answer's status is in `statuses`; both only for `methods`. Waits
    grow 0, 2, 4, 8 × `backoff_s` ... (the first retry goes at once), each plus up to `jitter_s` at random so that
    clients turned away together do not come back together; a `Retry-After` header in seconds is honoured.
    """

    connect: int = 0
    read: int = 0
    status: int = 0
    backoff_s: float = 0.0
    jitter_s: float = 0.0
    statuses: tuple[int, ...] = ()
    # Answers retried as `statuses` are, though their status alone says too little (the caller reads the body)
    retry_if: Callable[[Response], bool] | None = None
    methods: frozenset[str] = frozenset({"GET"})

    def transient(self, response: Response) -> bool:
        """Whether the call may go again for this answer (retries left permitting)."""
        return response.status_code in self.statuses or (self.retry_if is not None and self.retry_if(response))

    def wait_s(self, retries_so_far: int, retry_after: str | None = None) -> float:
        if retry_after and retry_after.strip().isdigit():
            return min(float(retry_after), MAX_BACKOFF_S)
        backoff = 0.0 if retries_so_far == 0 else self.backoff_s * 2**retries_so_far
        return min(backoff, MAX_BACKOFF_S) + random.uniform(0, self.jitter_s)


@dataclass
class Response:
    """One HTTP answer, read whole (TorchServe's answers are small)."""

    status_code: int
    reason: str
    headers: Message  # case-insensitive `get`; `[name]` gives None when absent
    content: bytes
    url: str

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode(self.headers.get_content_charset() or "utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.content)


def encode_body(json_body: Any, data: bytes | None, headers: dict[str, str]) -> tuple[bytes | None, dict[str, str]]:
    if json_body is not None:
        return json.dumps(json_body).encode(), {"Content-Type": "application/json", **headers}
    return data, headers


class Session:
    """Kept-alive connections to each host, one set per thread (a ServeClient is shared by client threads)."""

    def __init__(self, retries: Retries | None = None):
        self.retries = retries or Retries()
        self.local = threading.local()

    def get(self, url: str, timeout: float, **options) -> Response:
        return self.request("GET", url, timeout=timeout, **options)

    def request(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        params: dict[str, Any] | None = None,
        json: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Sends the call (again as `retries` allow) and returns the last answer, whatever its status."""
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if params:
            target += ("&" if parts.query else "?") + urlencode(params)
        body, headers = encode_body(json, data, dict(headers or {}))
        retries, counts = self.retries, {"connect": 0, "read": 0, "status": 0}
        retryable = method in retries.methods
        resend_stale = retryable or method != "POST"  # a POST outside `methods` may not be sent twice
        while True:
            try:
                response = self._send(parts, method, target, body, headers, timeout, resend_stale)
            except ConnectFailed:
                if counts["connect"] >= retries.connect:
                    raise
                counts["connect"] += 1
            except TimedOut:
                raise
            except TransportError:
                if not retryable or counts["read"] >= retries.read:
                    raise
                counts["read"] += 1
            else:
                retry_status = retryable and retries.transient(response)
                if not retry_status or counts["status"] >= retries.status:
                    response.url = f"{parts.scheme}://{parts.netloc}{target}"
                    return response
                counts["status"] += 1
                time.sleep(retries.wait_s(sum(counts.values()) - 1, response.headers.get("Retry-After")))
                continue
            time.sleep(retries.wait_s(sum(counts.values()) - 1))

    def _send(
        self, parts, method: str, target: str, body: bytes | None, headers: dict, timeout: float, resend_stale: bool
    ) -> Response:
        connection, reused = self._connection(parts, timeout)
        if not reused:
            try:
                connection.connect()
            except OSError as exc:  # refused, unreachable, or no connection within the timeout: nothing was sent
                self._drop(parts)
                raise ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        try:
            connection.request(method, target, body=body, headers=headers)
            answer = connection.getresponse()
            content = answer.read()
        except STALE_CONNECTION as exc:
            self._drop(parts)
            if reused and resend_stale:  # most likely closed by the server while idle, before the request came
                return self._send(parts, method, target, body, headers, timeout, resend_stale=False)
            raise TransportError(f"{type(exc).__name__}: {exc}") from None
        except TimeoutError:
            self._drop(parts)
            raise TimedOut(f"no answer within {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop(parts)
            raise TransportError(f"{type(exc).__name__}: {exc}") from None
        except BaseException:  # Ctrl-C mid-call: the connection still awaits its answer and cannot carry another
            self._drop(parts)
            raise
        if answer.will_close:
            self._drop(parts)
        return Response(answer.status, answer.reason, answer.headers, content, "")

    def _connection(self, parts, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection to the host (a new one if the server closed the kept one), and whether it was
        used before."""
        connections = self.local.__dict__.setdefault("connections", {})
        connection = connections.get(parts.netloc)
        if connection is not None and connection.sock is not None and not closed_by_peer(connection.sock):
            connection.timeout = timeout
            connection.sock.settimeout(timeout)
            return connection, True
        if connection is not None:
            connection.close()
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connections[parts.netloc] = kind(parts.hostname, parts.port, timeout=timeout)
        return connections[parts.netloc], False

    def _drop(self, parts) -> None:
        connection = self.local.__dict__.get("connections", {}).pop(parts.netloc, None)
        if connection is not None:
            connection.close()


def closed_by_peer(sock) -> bool:
    """An idle kept-alive socket that is readable has been closed (or written to out of turn) by the server."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
