"""A classifier's answer, written and read in one place: the worker writes it from logits; the library (probes,
rollouts, evaluation, `servekit predict`) reads its label, index and top-1 probability back. Nothing here imports
torch: tensors come in from the worker, JSON comes back from a server.

    plain, v1  {"label": "7", "index": 7, "probabilities": {"7": 0.98, "1": 0.01, "9": 0.004}}   (top k)
    v2         outputs label [n] BYTES, index [n] INT64, probabilities [n, classes] FP32           (every class)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from servekit_worker.kserve import v2_tensor

if TYPE_CHECKING:
    import torch

CLASSIFIER_OUTPUTS = ("label", "index", "probabilities")  # the keys of an answer, the names of the v2 outputs


def label_list(document: Any) -> list[str]:
    """A labels.json document as the list of labels by class index: a list, or {"0": "zero", ...} as TorchServe's
    index_to_name.json (KeyError where an index is missing)."""
    if isinstance(document, dict):
        document = [document[str(i)] for i in range(len(document))]
    return [str(label) for label in document]


def top_k(probabilities: torch.Tensor, labels: list[str], k: int) -> dict[str, float]:
    """The k most likely labels, most likely first, as {label: probability}."""
    k = min(k, probabilities.numel())
    values, indices = probabilities.topk(k)
    return {labels[i]: round(float(v), 6) for v, i in zip(values.tolist(), indices.tolist(), strict=True)}


def classification(logits: torch.Tensor, labels: list[str], k: int = 3) -> dict:
    """One row of logits -> `{"label", "index", "probabilities": top k}`."""
    probabilities = logits.float().softmax(dim=-1)
    index = int(probabilities.argmax())
    return {"label": labels[index], "index": index, "probabilities": top_k(probabilities, labels, k)}


def classifier_v2_outputs(logits: torch.Tensor, labels: list[str]) -> list[dict]:
    """Rows of logits -> the v2 output tensors named CLASSIFIER_OUTPUTS."""
    probabilities = logits.float().softmax(dim=-1)
    indices = probabilities.argmax(dim=-1)
    label, index, probabilities_name = CLASSIFIER_OUTPUTS
    return [
        v2_tensor(label, "BYTES", [labels[i] for i in indices.tolist()]),
        v2_tensor(index, "INT64", indices),
        v2_tensor(probabilities_name, "FP32", probabilities),
    ]


def only_answer(answer: Any) -> Any:
    """A list of one answer (servekit's API answers `{"inputs": [x]}` so) as that answer."""
    return answer[0] if isinstance(answer, list) and len(answer) == 1 else answer


def answer_label(answer: Any) -> str | None:
    """The top-1 label of a classifier's answer (plain, v1 or a v2 row), else None."""
    answer = only_answer(answer)
    return str(answer["label"]) if isinstance(answer, dict) and "label" in answer else None


def answer_index(answer: Any) -> int | None:
    """The top-1 class index of a classifier's answer, else None."""
    answer = only_answer(answer)
    index = answer.get("index") if isinstance(answer, dict) else None
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def top1_probability(answer: dict) -> float | None:
    """A classifier answer's probability of its label: from the top k (plain, v1) or the full vector (a v2 row)."""
    probabilities = answer.get("probabilities")
    if isinstance(probabilities, dict):
        return probabilities.get(answer["label"])
    index = answer_index(answer)
    if isinstance(probabilities, list) and index is not None and index < len(probabilities):
        return probabilities[index]
    return None
