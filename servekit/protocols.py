"""KServe v1 and v2 (Open Inference) requests built from files, and their answers read back.

What `servekit predict --protocol v1|v2` sends to TorchServe's `/v1/models/NAME:predict` and
`/v2/models/NAME/infer` routes (the ones KServe's runtime exposes): images go as base64 (v1 `{"b64": ...}`, v2
BYTES), `.txt` files as UTF-8 text (v1 strings, v2 BYTES), `.json` files holding nested lists as tensors (v1 lists,
v2 FP32 or INT64 with their shape). Answers come back one per file, in the shape of servekit's own API.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from servekit.errors import UsageError

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


def shape_of(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


def flatten(value: Any) -> list:
    return [v for item in value for v in flatten(item)] if isinstance(value, list) else [value]


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
            data = [x for v in values for x in flatten(v)]
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
    """A v2 answer as one dict per instance: a classifier's `{"label", "index", "probabilities": {label: p}}`
    (the winner's probability; the full vector is the `probabilities` output), else `{"output": nested lists}`."""
    outputs = {output["name"]: output for output in document.get("outputs", [])}
    if "label" in outputs and "index" in outputs:
        labels, indices = outputs["label"]["data"], outputs["index"]["data"]
        answers = [{"label": label, "index": index} for label, index in zip(labels, indices, strict=True)]
        if "probabilities" in outputs:
            classes = outputs["probabilities"]["shape"][-1]
            data = outputs["probabilities"]["data"]
            for row, answer in enumerate(answers):
                answer["probabilities"] = {answer["label"]: data[row * classes + answer["index"]]}
        return answers
    if "output" not in outputs:
        raise UsageError(f"the v2 answer has no label or output tensor: {sorted(outputs)}")
    output = outputs["output"]
    rows, row_shape = output["shape"][0], output["shape"][1:]
    size = math.prod(row_shape)
    return [{"output": nest(output["data"][i * size : (i + 1) * size], row_shape)} for i in range(rows)]


def nest(values: list, shape: list[int]) -> Any:
    if len(shape) <= 1:
        return list(values)
    step = len(values) // shape[0]
    return [nest(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def predict_files(client, name: str, paths: list[Path], protocol: str, version: str | None = None) -> dict[str, Any]:
    """Sends every file in one `protocol` request to NAME; the answer of each file by its path."""
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
