"""The commands an operator runs all day, against a real TorchServe, without importing torch — and the most frequent
ones without any library that is slow to import (requests, rich, yaml, ...)."""

from __future__ import annotations

import pytest
from support.processes import heavy_modules_after, slow_modules_after

pytestmark = pytest.mark.server


def test_models_status_and_predict_on_a_real_server_import_no_heavy_module(served_digits, torchserve, held_out):
    workdir = torchserve.workdir
    models = ("models", "--workdir", workdir, "--json")
    predict = ("predict", "digits", str(held_out[0].path), "--workdir", workdir, "--json")
    assert heavy_modules_after(*models) == [] and slow_modules_after(*models) == []
    assert heavy_modules_after("status", "--workdir", workdir, "--json") == []
    assert heavy_modules_after(*predict) == [] and slow_modules_after(*predict) == []
