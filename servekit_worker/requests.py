"""Requests as any runtime hands them over, and servekit's own API on them: bodies, media types, JSON, base64 and the
limits on each. Standard library only: the library reads the protocols without torch."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from servekit_worker.errors import RequestError

if TYPE_CHECKING:
    from servekit_worker.base import ServekitHandler
    from servekit_worker.kserve import V2Request

MAX_NESTING = 8  # how deep JSON lists of numbers may nest (v2 data, tensor samples)


class Protocol:
    """A wire protocol: how one request's samples are read, and how its answer and its errors are written."""

    name = ""

    def decode(self, handler: ServekitHandler, request: Request) -> Decoded:
        raise NotImplementedError

    def encode(self, handler: ServekitHandler, decoded: Decoded, outputs: Any) -> Any:
        raise NotImplementedError

    def error_body(self, error: RequestError) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<protocol {self.name}>"


@dataclass
class Request:
    """One request as the runtime hands it over: its body (bytes, a str, or JSON the runtime decoded; None when it
    has none), its media type ('' when the client sent none), the protocol of its route, and the runtime's id."""

    payload: Any
    content_type: str
    protocol: Protocol
    request_id: str | None = None

    def body(self) -> Any:
        if self.payload is None:
            raise RequestError(
                "empty_body",
                "the request has no body (form-encoded fields are not read): send image bytes with "
                "Content-Type image/png or image/jpeg, or a JSON document with Content-Type application/json",
            )
        return self.payload


@dataclass
class Answer:
    """One request's answer for the runtime to send: a JSON-able body, its HTTP status, extra headers."""

    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class Plain(Protocol):
    """servekit's own API (TorchServe's /predictions): a body of a media type the handler accepts, up to
    `max_body_bytes`, decoded by the handler's `decode_request` and answered as its `encode_response` writes."""

    name = "plain"

    def decode(self, handler: ServekitHandler, request: Request) -> Decoded:
        payload = request.body()
        allowed = handler.allowed_content_types
        if not content_type_allowed(request.content_type, allowed):
            raise RequestError(
                "unsupported_media_type",
                f"Content-Type {request.content_type!r} is not accepted; send one of {', '.join(allowed)}",
                415,
            )
        limit = handler.config["max_body_bytes"]
        if isinstance(payload, (bytes, bytearray, str)) and len(payload) > limit:
            raise RequestError("payload_too_large", f"the body has {len(payload)} bytes; the limit is {limit}", 413)
        return handler.decode_request(payload, request.content_type)

    def encode(self, handler: ServekitHandler, decoded: Decoded, outputs: Any) -> Any:
        return handler.encode_response(outputs, decoded.many)

    def error_body(self, error: RequestError) -> dict:
        return {"code": error.status, "error": error.error, "detail": error.detail}


PLAIN = Plain()


@dataclass
class Decoded:
    """One request's samples, each ready for `collate`; `many` says the client sent a list; `v2` is the parsed
    KServe v2 request (its id and the outputs it asked for)."""

    samples: list = field(default_factory=list)
    many: bool = False
    protocol: Protocol = PLAIN
    v2: V2Request | None = None


def content_type_allowed(content_type: str, allowed: list[str]) -> bool:
    """`allowed` holds media types (`application/json`) and families (`image/`)."""
    media_type = content_type or "application/octet-stream"
    return any(media_type == a or (a.endswith("/") and media_type.startswith(a)) for a in allowed)


def as_bytes(payload: Any) -> bytes:
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    raise RequestError("invalid_input", f"expected raw bytes, got {type(payload).__name__}")


def as_text(payload: Any) -> str:
    if isinstance(payload, str):
        return payload
    try:
        return as_bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("invalid_text", f"the body is not valid UTF-8: {exc}") from None


def parse_json(payload: Any) -> Any:
    """JSON the runtime decoded already, or bytes/str that still need decoding."""
    if isinstance(payload, (dict, list)):
        return payload
    try:
        return json.loads(as_text(payload))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise RequestError("invalid_json", f"the body is not valid JSON: {exc}") from None


def json_items(document: Any, one: str, many: str, max_items: int, expected: str) -> tuple[list, bool]:
    """`{one: item}` -> ([item], False); `{many: [items]}` -> (items, True); anything else is a 400."""
    if not isinstance(document, dict) or len(document.keys() & {one, many}) != 1:
        raise RequestError("invalid_json", f"expected {expected}")
    if one in document:
        return [document[one]], False
    items = document[many]
    if not isinstance(items, list) or not items:
        raise RequestError("invalid_json", f'"{many}" must be a non-empty list; expected {expected}')
    check_count(len(items), f'"{many}"', max_items)
    return items, True


def check_count(count: int, what: str, max_items: int) -> None:
    """One request may hold at most `max_items` samples (handler.max_inputs_per_request): 413 beyond."""
    if count > max_items:
        raise RequestError("too_many_inputs", f"{what} has {count} items; the limit is {max_items}", 413)


def base64_bytes(value: Any, what: str) -> bytes:
    """The bytes of a base64 string (a `data:...;base64,` URL prefix is allowed)."""
    if not isinstance(value, str) or not value:
        raise RequestError("invalid_json", f"{what} must be a base64 string")
    try:
        return base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError("invalid_base64", f"{what} is not valid base64: {exc}") from None


def instance_value(value: Any, what: str) -> Any:
    """A KServe v1 instance's content: `{"b64": "<base64>"}` -> the decoded bytes (KServe's binary convention),
    `{"data": x}` -> x (TorchServe's examples), anything else as sent (a string, nested lists)."""
    if not isinstance(value, dict):
        return value
    keys = sorted(value.keys() & {"b64", "data"})
    if len(keys) != 1:
        raise RequestError("invalid_input", f'{what} must be {{"data": ...}}, {{"b64": ...}}, a list or a string')
    return base64_bytes(value["b64"], what) if keys[0] == "b64" else value["data"]


def worker_value(body: bytes, content_type: str) -> Any:
    """A body as TorchServe's Python worker hands it to a handler: JSON decoded, text as str, the rest as bytes."""
    if content_type == "application/json":
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # as TorchServe's worker: an undecodable body is passed on as bytes
            return body
    if content_type.startswith("text"):
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            return body
    return body
