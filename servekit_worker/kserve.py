"""KServe's v1 and v2 (Open Inference) protocols as servekit's handlers speak them: each a `Protocol` object that
decodes a request, encodes its answer and writes its errors, and names the TorchServe envelope (TS_SERVICE_ENVELOPE,
KServe's `serviceEnvelope` label) that selects it. Standard library only: the library builds and reads v2 tensors
with these functions too.

    v1  {"instances": [instance, ...]}  ->  {"predictions": [answer, ...]}
    v2  {"id"?, "inputs": [{"name", "shape", "datatype", "data"}, ...], "outputs"?: [{"name"}]}
        ->  {"model_name", "model_version", "id", "outputs": [{"name", "datatype", "shape", "data"}, ...]}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from servekit_worker.errors import RequestError
from servekit_worker.requests import MAX_NESTING, Decoded, Protocol, Request, check_count, parse_json

if TYPE_CHECKING:
    from servekit_worker.base import ServekitHandler

# Open Inference Protocol datatypes servekit reads, and the JSON values each allows.
V2_INTEGER_TYPES = ("UINT8", "INT8", "INT16", "INT32", "INT64")
V2_FLOAT_TYPES = ("FP16", "FP32", "FP64")
V2_DATATYPES = (*V2_INTEGER_TYPES, *V2_FLOAT_TYPES, "BYTES")


@dataclass
class V2Tensor:
    """One input of a KServe v2 request, its `data` flattened in row-major order and checked against `shape`."""

    name: str
    datatype: str
    shape: list[int]
    data: list

    def rows(self) -> list:
        """The instances along the first dimension: a string each for BYTES [n] (or [n, 1]), else nested lists."""
        count = self.shape[0] if self.shape else 1
        row_size = len(self.data) // count if count else 0
        rows = [self.data[i * row_size : (i + 1) * row_size] for i in range(count)]
        if self.datatype == "BYTES" and row_size == 1:
            return [row[0] for row in rows]
        return [nested(row, self.shape[1:]) for row in rows]


@dataclass
class V2Request:
    """A parsed KServe v2 request: its inputs, its `id`, and the output names it asked for (None: all)."""

    inputs: list[V2Tensor]
    request_id: str | None = None
    output_names: list[str] | None = None


def flat_values(data: list, what: str, depth: int = 0) -> list:
    """A v2 tensor's data in row-major order, whether it was sent flat or nested (at most MAX_NESTING deep)."""
    if depth > MAX_NESTING:
        raise RequestError("invalid_input", f"{what} nests data deeper than {MAX_NESTING} levels")
    values = []
    for value in data:
        if isinstance(value, list):
            values.extend(flat_values(value, what, depth + 1))
        else:
            values.append(value)
    return values


def nested(values: list, dims: list[int]) -> list:
    """Row-major `values` as nested lists of shape `dims` (the inverse of flat_values)."""
    if len(dims) <= 1:
        return list(values)
    step = len(values) // dims[0] if dims[0] else 0
    return [nested(values[i * step : (i + 1) * step], dims[1:]) for i in range(dims[0])]


def values_match(datatype: str, values: list) -> bool:
    if datatype == "BYTES":
        return all(isinstance(v, str) for v in values)
    if datatype in V2_INTEGER_TYPES:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def v1_instances(document: Any, max_items: int) -> list:
    """The instances of a KServe v1 request `{"instances": [...]}`."""
    instances = document.get("instances") if isinstance(document, dict) else None
    if not isinstance(instances, list) or not instances:
        raise RequestError("invalid_request", 'a v1 request is {"instances": [instance, ...]} with 1 or more instances')
    check_count(len(instances), '"instances"', max_items)
    return instances


def v2_input(item: Any, position: int) -> V2Tensor:
    """One element of a v2 request's "inputs", checked: name, a known datatype, a shape its data fills exactly."""
    what = f"inputs[{position}]"
    if not isinstance(item, dict):
        raise RequestError("invalid_request", f'{what} must be {{"name", "shape", "datatype", "data"}}')
    missing = [key for key in ("name", "shape", "datatype", "data") if key not in item]
    if missing:
        raise RequestError("invalid_request", f"{what} lacks {', '.join(missing)}")
    name, datatype, shape, data = item["name"], item["datatype"], item["shape"], item["data"]
    if not isinstance(name, str) or not name:
        raise RequestError("invalid_request", f"{what}.name must be a non-empty string")
    what = f'input "{name}"'
    if datatype not in V2_DATATYPES:
        known = ", ".join(V2_DATATYPES)
        raise RequestError("invalid_datatype", f"{what} has datatype {datatype!r}; servekit reads {known}")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        raise RequestError("invalid_shape", f"{what} has shape {shape!r}; expected a list of positive integers")
    if not isinstance(data, list):
        raise RequestError("invalid_request", f"{what}.data must be a list")
    values = flat_values(data, what)
    if len(values) != math.prod(shape):
        raise RequestError(
            "invalid_shape", f"{what} has shape {shape} ({math.prod(shape)} values) but {len(values)} values in data"
        )
    if not values_match(datatype, values):
        kind = "strings" if datatype == "BYTES" else "integers" if datatype in V2_INTEGER_TYPES else "numbers"
        raise RequestError("invalid_datatype", f"{what} is {datatype}, so its data must be {kind}")
    return V2Tensor(name, datatype, shape, values)


def v2_request(document: Any, max_items: int, output_names: tuple[str, ...]) -> V2Request:
    """A KServe v2 request `{"id"?, "inputs": [...], "outputs"?: [{"name"}]}`, checked; each input's first
    dimension counts instances, at most `max_items` in all."""
    inputs = document.get("inputs") if isinstance(document, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(
            "invalid_request", 'a v2 request is {"inputs": [{"name", "shape", "datatype", "data"}, ...]}, 1 or more'
        )
    check_count(len(inputs), '"inputs"', max_items)
    tensors = [v2_input(item, i) for i, item in enumerate(inputs)]
    check_count(sum(t.shape[0] for t in tensors), "the request", max_items)
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("invalid_request", '"id" must be a string')
    requested = document.get("outputs")
    names = None
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) and "name" in o for o in requested):
            raise RequestError("invalid_request", '"outputs" must be a list of {"name": ...}')
        names = [o["name"] for o in requested]
        unknown = [n for n in names if n not in output_names]
        if unknown:
            raise RequestError("invalid_request", f"unknown outputs {unknown}; this model has {list(output_names)}")
    return V2Request(tensors, request_id, names)


def v2_tensor(name: str, datatype: str, data: Any) -> dict:
    """One v2 output tensor: a torch tensor's values in row-major order with its shape, or a list as shape [n]."""
    if isinstance(data, list):
        return {"name": name, "datatype": datatype, "shape": [len(data)], "data": list(data)}
    return {"name": name, "datatype": datatype, "shape": list(data.shape), "data": data.flatten().tolist()}


class KServe(Protocol):
    """What KServe's two protocols share: the envelope that selects each, and `{"error": message}` for errors."""

    envelope = ""

    def error_body(self, error: RequestError) -> dict:
        return {"error": f"{error.error}: {error.detail}"}


class KServeV1(KServe):
    """Each instance decoded by the handler's `decode_instance`; answered with its `encode_predictions`."""

    name, envelope = "v1", "kserve"

    def decode(self, handler: ServekitHandler, request: Request) -> Decoded:
        instances = v1_instances(parse_json(request.body()), handler.max_inputs)
        samples = [handler.decode_instance(value, f"instance {i}") for i, value in enumerate(instances)]
        return Decoded(samples, many=True, protocol=self)

    def encode(self, handler: ServekitHandler, decoded: Decoded, outputs: Any) -> dict:
        return {"predictions": handler.encode_predictions(outputs)}


class KServeV2(KServe):
    """Each input decoded by the handler's `decode_v2_input`; answered with the `v2_outputs` the request asked for.
    A request without an `id` is answered with the runtime's id for it."""

    name, envelope = "v2", "kservev2"

    def decode(self, handler: ServekitHandler, request: Request) -> Decoded:
        parsed = v2_request(parse_json(request.body()), handler.max_inputs, handler.v2_output_names)
        parsed.request_id = parsed.request_id or request.request_id or ""
        samples = [sample for tensor in parsed.inputs for sample in handler.decode_v2_input(tensor)]
        return Decoded(samples, many=True, protocol=self, v2=parsed)

    def encode(self, handler: ServekitHandler, decoded: Decoded, outputs: Any) -> dict:
        tensors = handler.v2_outputs(outputs)
        if decoded.v2.output_names is not None:
            tensors = [t for t in tensors if t["name"] in decoded.v2.output_names]
        return {
            "model_name": handler.model_name,
            "model_version": handler.model_version,
            "id": decoded.v2.request_id,
            "outputs": tensors,
        }


V1, V2 = KServeV1(), KServeV2()
KSERVE_PROTOCOLS = (V1, V2)
ENVELOPES = {protocol.envelope: protocol for protocol in KSERVE_PROTOCOLS}  # TorchServe's envelope name -> protocol


def sniffed(payload: Any) -> KServe:
    """The protocol of a request on a KServe route when no envelope names one: a body with "inputs" is v2."""
    return V2 if isinstance(payload, dict) and "inputs" in payload else V1
