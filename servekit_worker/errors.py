"""The one exception a worker raises for a client's mistake, and the one it answers a failed model call with."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A client mistake in one request: answered with `status` and an error body in the request's protocol, never a
    crashed worker."""

    def __init__(self, error: str, detail: str, status: int = 400):
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.status = status


def model_failure(exc: Exception) -> RequestError:
    """The answer to a request whose input the model raised on (logged with its traceback)."""
    logger.warning("the model failed on one request's input", exc_info=exc)
    message = (str(exc).strip().splitlines() or [""])[-1]  # TorchScript puts its own traceback first
    detail = f"the model raised {type(exc).__name__} on this input: {message[:200]}"
    return RequestError("inference_failed", detail, 500)
