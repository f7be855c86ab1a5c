"""Raw HTTP to a server and concurrent client threads."""

from __future__ import annotations

import threading
import time

import requests


def post_body(client, path: str, body: bytes, content_type: str) -> requests.Response:
    """A raw POST to the inference address (no retries, any status returned), with the client's inference key."""
    return requests.post(
        f"{client.endpoints.inference_url}{path}",
        data=body,
        headers={**client.auth_headers("inference"), "Content-Type": content_type},
        timeout=60,
    )


class ClientThreads:
    """`threads` clients, each calling `send(i)` in a loop (i = its offset, then every `threads`-th request) until
    stopped or `limit_s` has passed; a context manager that starts and joins them."""

    def __init__(self, threads: int, limit_s: float):
        self.limit_s = limit_s
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]

    def send(self, i: int) -> None:
        raise NotImplementedError

    def run(self, offset: int) -> None:
        deadline = time.monotonic() + self.limit_s
        i = offset
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.send(i)
            i += len(self.threads)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
