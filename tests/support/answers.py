"""Comparing answers: the same prediction within a tolerance."""

from __future__ import annotations

import pytest


def same_prediction(answer: dict, expected: dict, tolerance: float = 1e-5) -> bool:
    """Same label, index and top-k labels; probabilities within `tolerance` (a sample answered alone or in a batch
    differs in the sixth decimal on a GPU)."""
    return (answer["label"], answer["index"], list(answer["probabilities"])) == (
        expected["label"],
        expected["index"],
        list(expected["probabilities"]),
    ) and answer["probabilities"] == pytest.approx(expected["probabilities"], abs=tolerance)


def assert_same_prediction(answer: dict, expected: dict, tolerance: float = 1e-5) -> None:
    assert same_prediction(answer, expected, tolerance), (answer, expected)


def assert_same_answers(answers: list, expected: list, tolerance: float) -> None:
    """Classifier answers (single or lists) with top-k probabilities within `tolerance` of the expected ones and
    the same label wherever the expected top label leads the next by more than 2 x `tolerance`."""
    for got, want in zip(answers, expected, strict=True):
        got, want = (got, want) if isinstance(got, list) else ([got], [want])
        for one, other in zip(got, want, strict=True):
            assert one["probabilities"] == pytest.approx(other["probabilities"], abs=tolerance), (one, other)
            top = sorted(other["probabilities"].values(), reverse=True) + [0.0]
            if top[0] - top[1] > 2 * tolerance:
                assert one["index"] == other["index"], (one, other)
