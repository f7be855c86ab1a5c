"""Triton Inference Server's Python backend on a servekit handler: the one module that knows Triton's `args`, its
request and response objects and `triton_python_backend_utils` (imported only where they are used).

The model speaks the Open Inference Protocol (v2) as servekit's KServe v2 path does: inputs of raw request bodies
(BYTES, one element per instance; an element that is valid UTF-8 is read as the string a v2 JSON request carries,
e.g. a base64 image or a text, any other as the raw bytes gRPC clients send) or numeric tensors (the tensor
handler), and the handler's own outputs (`label`, `index`, `probabilities` for classifiers). A bad instance fails
its own request with 400 (INVALID_ARG); the other requests of the batch are answered.

`servekit export triton` writes each version's `model.py`:

    class TritonPythonModel(TritonHandler, DigitsHandler):
        '''The digits handler on Triton.'''
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from servekit_worker.base import ServekitHandler, Worker
from servekit_worker.errors import RequestError
from servekit_worker.kserve import V2Request, V2Tensor
from servekit_worker.requests import Decoded, Protocol, Request, check_count

logger = logging.getLogger(__name__)

# Triton's datatypes as the Open Inference Protocol names them (TYPE_STRING is BYTES).
V2_DATATYPES = {"TYPE_STRING": "BYTES", "TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_INT8": "INT8",
                "TYPE_INT16": "INT16", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_FP16": "FP16",
                "TYPE_FP32": "FP32", "TYPE_FP64": "FP64"}  # fmt: skip
# The serving settings servekit writes beside model.py (the archive's model-config.yaml, as JSON).
SETTINGS_FILE = "servekit-model.json"


def element(value: Any) -> Any:
    """One BYTES element: the string a v2 JSON client sent (valid UTF-8), else the raw bytes."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


class TritonV2(Protocol):
    """A Triton request's input tensors, decoded by the handler's `decode_v2_input`; answered with its `v2_outputs`
    (the ones the request asked for) and errors as Triton errors."""

    name = "triton"

    def decode(self, handler: ServekitHandler, request: Request) -> Decoded:
        parsed: V2Request = request.payload
        check_count(sum(tensor.shape[0] if tensor.shape else 1 for tensor in parsed.inputs), "the request",
                    handler.max_inputs)  # fmt: skip
        samples = [sample for tensor in parsed.inputs for sample in handler.decode_v2_input(tensor)]
        return Decoded(samples, many=True, protocol=self, v2=parsed)

    def encode(self, handler: ServekitHandler, decoded: Decoded, outputs: Any) -> list[dict]:
        tensors = handler.v2_outputs(outputs)
        if decoded.v2.output_names is not None:
            tensors = [t for t in tensors if t["name"] in decoded.v2.output_names]
        return tensors

    def error_body(self, error: RequestError) -> str:
        return f"{error.error}: {error.detail}"


TRITON = TritonV2()


def v2_inputs(request: Any, names: list[str], datatypes: dict[str, str]) -> V2Request:
    """A Triton request's inputs as the V2Tensors servekit's handlers decode, and the outputs it asked for."""
    import triton_python_backend_utils as pb_utils

    tensors = []
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            continue
        array = tensor.as_numpy()
        datatype = datatypes[name]
        values = [element(v) for v in array.reshape(-1).tolist()] if datatype == "BYTES" else array.reshape(-1).tolist()
        tensors.append(V2Tensor(name, datatype, list(array.shape), values))
    requested = request.requested_output_names()
    return V2Request(tensors, request.request_id() or None, list(requested) if requested else None)


def response(answer_body: Any, status: int, outputs: dict[str, dict]) -> Any:
    """A Triton response: the answer's v2 tensors as numpy arrays of the config's types and dims (a batch dimension
    first), or its error (a client error is INVALID_ARG: HTTP 400)."""
    import numpy as np
    import triton_python_backend_utils as pb_utils

    if status != 200:
        code = pb_utils.TritonError.INVALID_ARG if 400 <= status < 500 else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(answer_body), code))
    tensors = []
    for tensor in answer_body:
        config = outputs[tensor["name"]]
        strings = config["data_type"] == "TYPE_STRING"
        data = [str(v).encode() for v in tensor["data"]] if strings else tensor["data"]
        dims = [int(d) for d in config["dims"]]
        shape = (-1, *dims) if all(d > 0 for d in dims) else tensor["shape"]
        array = np.array(data, dtype=pb_utils.triton_string_to_numpy(config["data_type"])).reshape(shape)
        tensors.append(pb_utils.Tensor(tensor["name"], array))
    return pb_utils.InferenceResponse(output_tensors=tensors)


class TritonLog(logging.Handler):
    """servekit_worker's log records into Triton's log (its Python stub's own stderr is not kept)."""

    def emit(self, record: logging.LogRecord) -> None:
        import triton_python_backend_utils as pb_utils

        if record.levelno >= logging.ERROR:
            write = pb_utils.Logger.log_error
        elif record.levelno >= logging.WARNING:
            write = pb_utils.Logger.log_warn
        else:
            write = pb_utils.Logger.log_info
        write(self.format(record))


class TritonHandler(ServekitHandler):
    """Triton's `initialize(args)` and `execute(requests)` on a servekit handler; model.py puts it first."""

    def initialize(self, args: dict) -> None:
        package = logging.getLogger("servekit_worker")
        if not any(isinstance(handler, TritonLog) for handler in package.handlers):
            package.addHandler(TritonLog())
            package.setLevel(logging.INFO)
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        served = json.loads((version_dir / SETTINGS_FILE).read_text())
        self.input_names = [i["name"] for i in config["input"]]
        self.input_types = {i["name"]: V2_DATATYPES[i["data_type"]] for i in config["input"]}
        self.outputs = {o["name"]: o for o in config["output"]}
        gpu_id = int(args["model_instance_device_id"]) if args.get("model_instance_kind") == "GPU" else None
        worker = Worker(
            model_dir=version_dir,
            weights=version_dir / served["weights"],
            settings=served["handler"],
            model_name=args["model_name"],
            model_version=served["version"],
            gpu_id=gpu_id,
            batch_size=int(served.get("batch_size") or 1),
        )
        self.start(worker)

    def execute(self, requests: list) -> list:
        """One response per request, in order; one forward pass for all good requests."""
        ready = [Request(v2_inputs(r, self.input_names, self.input_types), "", TRITON) for r in requests]
        answers = self.answer_batch(ready)
        return [response(answer.body, answer.status, self.outputs) for answer in answers]

    def finalize(self) -> None:
        logger.info("%s %s unloaded", self.model_name, self.model_version)
