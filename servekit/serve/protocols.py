"""KServe v1 and v2 (Open Inference) requests built from files, and their answers read back.

What `servekit predict --protocol v1|v2` sends to TorchServe's `/v1/models/NAME:predict` and
`/v2/models/NAME/infer` routes (the ones KServe's runtime exposes): images go as base64 (v1 `{"b64": ...}`, v2
BYTES), `.txt` files as UTF-8 text (v1 strings, v2 BYTES), `.json` files holding nested lists as tensors (v1 lists,
v2 FP32 or INT64 with their shape). Answers come back one per file, as the server sent them (a v2 file's answer
is its row of every output tensor).
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from servekit.core.errors import ServerError, UsageError
from servekit_worker.errors import RequestError
from servekit_worker.kserve import flat_values, nested

PROTOCOLS = ("v1", "v2")
TEXT_SUFFIXES = {".txt"}


def protocol_path(name: str, protocol: str) -> str:
    """The inference route of NAME in `protocol` (TorchServe serves the default version there)."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"protocol {protocol!r} must be one of {', '.join(PROTOCOLS)}")
    return f"/v1/models/{quote(name)}:predict" if protocol == "v1" else f"/v2/models/{quote(name)}/infer"


def file_instance(path: Path) -> tuple[str, Any]:
    """("image", base64 str), ("text", str) or ("tensor", nested lists) for one file."""
    if path.suffix == ".json":
        try:
            value = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path} is not JSON: {exc}") from None
        if not isinstance(value, list):
            raise UsageError(f"{path}: with --protocol, a .json file holds one instance as nested lists of numbers")
        return "tensor", value
    if path.suffix in TEXT_SUFFIXES:
        return "text", path.read_text(encoding="utf-8")
    return "image", base64.b64encode(path.read_bytes()).decode("ascii")


def v2_body(body: bytes, content_type: str, input_name: str = "input") -> tuple[bytes, str]:
    """One request body as a v2 document of one instance, BYTES [1, 1] (a base64 image, a text): what TorchServe's
    v2 route and Triton both read."""
    value = body.decode("utf-8") if content_type.startswith("text/") else base64.b64encode(body).decode("ascii")
    document = {"inputs": [{"name": input_name, "shape": [1, 1], "datatype": "BYTES", "data": [value]}]}
    return json.dumps(document).encode(), "application/json"


def shape_of(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


def v1_request(instances: list[tuple[str, Any]]) -> dict:
    return {"instances": [{"b64": value} if kind == "image" else value for kind, value in instances]}


def v2_request(instances: list[tuple[str, Any]]) -> tuple[dict, list[int]]:
    """One input per kind of file (`images`, `texts`, `tensors`), and the position of each file's answer."""
    kinds = list(dict.fromkeys(kind for kind, _ in instances))
    inputs = []
    for kind in kinds:
        values = [value for k, value in instances if k == kind]
        if kind == "tensor":
            shapes = {tuple(shape_of(v)) for v in values}
            if len(shapes) != 1:
                raise UsageError(f"the .json tensors have different shapes {sorted(shapes)}: send them separately")
            try:
                data = flat_values(values, "the .json tensors")
            except RequestError as exc:
                raise UsageError(exc.detail) from None
            datatype = "INT64" if all(isinstance(x, int) for x in data) else "FP32"
            shape = [len(values), *shapes.pop()]
            inputs.append({"name": "tensors", "shape": shape, "datatype": datatype, "data": data})
        else:
            inputs.append({"name": f"{kind}s", "shape": [len(values)], "datatype": "BYTES", "data": values})
    position = {}
    for kind in kinds:
        for i, (k, _) in enumerate(instances):
            if k == kind:
                position[i] = len(position)
    order = [position[i] for i in range(len(instances))]
    return {"inputs": inputs}, order


def v2_answers(document: dict) -> list[dict]:
    """A v2 answer as one dict per instance, as the server sent it: each output tensor's row for that instance by
    the output's name (a classifier's `{"label", "index", "probabilities": [one per class]}`, a tensor model's
    `{"output": nested lists}`)."""
    outputs = document.get("outputs") or []
    if not outputs:
        raise ServerError("the v2 answer has no outputs")
    rows = {output["shape"][0] for output in outputs}
    if len(rows) != 1:
        raise ServerError(f"the v2 answer's outputs cover different numbers of instances: {sorted(rows)}")
    answers: list[dict] = [{} for _ in range(rows.pop())]
    for output in outputs:
        row_shape = output["shape"][1:]
        size = math.prod(row_shape)
        for i, answer in enumerate(answers):
            row = output["data"][i * size : (i + 1) * size]
            answer[output["name"]] = nested(row, row_shape) if row_shape else row[0]
    return answers


def predict_files(client, name: str, paths: list[Path], protocol: str, version: str | None = None) -> dict[str, Any]:
    """Each file's answer as the server sent it, by path. `plain`: one /predictions request per file; v1/v2: one
    request for all files, split per file (v1: the file's prediction; v2: its row of every output tensor)."""
    if protocol == "plain":
        return {str(p): client.predict_file(name, p, version=version) for p in paths}
    if version:
        raise UsageError("TorchServe's KServe routes serve the default version only: leave --version out")
    path = protocol_path(name, protocol)
    instances = [file_instance(p) for p in paths]
    if protocol == "v1":
        answers = client.post_inference(path, v1_request(instances))["predictions"]
    else:
        request, order = v2_request(instances)
        by_position = v2_answers(client.post_inference(path, request))
        answers = [by_position[i] for i in order]
    return {str(p): answer for p, answer in zip(paths, answers, strict=True)}


def instance_answers(answer: Any, protocol: str) -> list:
    """The answers in one file's answer, one per instance. A v1/v2 file is one instance, whatever its answer's shape
    (a tensor model's v1 answer is its output row, a list); servekit's API answers a document of several inputs
    with a list, one answer per input."""
    return answer if protocol == "plain" and isinstance(answer, list) else [answer]
