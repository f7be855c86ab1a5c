"""Accuracy of a served classifier on a labelled held-out folder, measured through the inference API."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from servekit.core.errors import ServerError
from servekit.serve.handle import Server
from servekit.store.heldout import HeldOutSample, read_held_out
from servekit.store.workspace import Workspace
from servekit_worker.answers import answer_label


@dataclass
class Evaluation:
    total: int
    correct: int
    predictions: dict[str, str] = field(default_factory=dict)  # file name -> served label
    mistakes: list[tuple[str, str, str]] = field(default_factory=list)  # (file, expected, served)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def evaluate_served(
    server: Server,
    name: str,
    folder: Path | None = None,
    version: str | None = None,
    concurrency: int = 4,
    on_answer: Callable[[], None] | None = None,
) -> Evaluation:
    """Sends every sample of `folder` (a labelled folder; by default the held-out set `servekit train` wrote in the
    server's store) and compares the answers with the labels.

    Requests go out from `concurrency` threads so that TorchServe can batch them.
    """
    client = server.client
    samples = read_held_out(folder or Workspace(server.store).held_out(name))

    def ask(sample: HeldOutSample) -> tuple[Path, str, str]:
        answer = client.predict(name, sample.path.read_bytes(), version=version, content_type=sample.content_type)
        if on_answer:
            on_answer()
        label = answer_label(answer)
        if label is None:
            raise ServerError(
                f"{name} answered {sample.path.name} without a label ({str(answer)[:80]}): is it a classifier?"
            )
        return sample.path, sample.label, label

    evaluation = Evaluation(total=len(samples), correct=0)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for path, expected, served in pool.map(ask, samples):
            evaluation.predictions[path.name] = served
            if served == expected:
                evaluation.correct += 1
            else:
                evaluation.mistakes.append((path.name, expected, served))
    return evaluation
