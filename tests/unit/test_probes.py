"""servekit/deliver/probes.py's exposition file on its own: format, label escaping, merging, atomic replacement."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from servekit.core.errors import UsageError
from servekit.deliver import probes
from servekit.serve import probe_metrics
from servekit.serve.probe_metrics import AGREEMENT, SAMPLES, TIMESTAMP, ProbeResult
from servekit.store.heldout import HeldOutSample
from servekit_worker.answers import answer_label

# The text exposition format's sample line: name, optional labels, a float (no timestamp: node_exporter refuses them).
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\} -?[0-9.e+-]+$')


def offline(folder: Path) -> SimpleNamespace:
    """A server handle whose client is never called (probe_model is replaced): the store and workdir are `folder`."""
    return SimpleNamespace(client=None, store=folder, workdir=folder)


def result(name: str, version: str, samples: int = 32, agreeing: int = 32, at: float = 1700000000.25) -> ProbeResult:
    return ProbeResult(name, version, samples, agreeing, at)


def test_the_file_is_valid_text_exposition_with_help_and_type_once_per_metric():
    text = probe_metrics.render(probe_metrics.as_series([result("digits", "1.0.0"), result("digits", "6.0.0", 32, 8)]))
    lines = text.splitlines()
    for metric in (AGREEMENT, SAMPLES, TIMESTAMP):
        assert lines.count(f"# TYPE {metric} gauge") == 1
        assert sum(line.startswith(f"# HELP {metric} ") for line in lines) == 1
    samples = [line for line in lines if not line.startswith("#")]
    assert len(samples) == 6 and all(SAMPLE.match(line) for line in samples), samples
    assert f'{AGREEMENT}{{model_name="digits",model_version="1.0.0"}} 1' in lines
    assert f'{AGREEMENT}{{model_name="digits",model_version="6.0.0"}} 0.25' in lines
    assert f'{SAMPLES}{{model_name="digits",model_version="6.0.0"}} 32' in lines
    assert f'{TIMESTAMP}{{model_name="digits",model_version="1.0.0"}} 1700000000.25' in lines
    assert text.endswith("\n")


def test_label_values_are_escaped_and_read_back():
    odd = 'a"b\\c\nd'
    text = probe_metrics.render(probe_metrics.as_series([result(odd, "1.0.0", 4, 3)]))
    assert f'{AGREEMENT}{{model_name="a\\"b\\\\c\\nd",model_version="1.0.0"}} 0.75' in text.splitlines()
    assert probe_metrics.parse(text) == {(odd, "1.0.0"): {AGREEMENT: 0.75, SAMPLES: 4.0, TIMESTAMP: 1700000000.25}}


def test_probing_one_model_keeps_the_other_models_lines():
    before = probe_metrics.render(probe_metrics.as_series([result("digits", "1.0.0"), result("text", "1.0.0", 10, 9)]))
    after = probe_metrics.parse(probe_metrics.merge(before, [result("digits", "1.0.0", 32, 16, at=1700000100.0)]))
    assert after[("text", "1.0.0")][AGREEMENT] == 0.9
    assert after[("digits", "1.0.0")] == {AGREEMENT: 0.5, SAMPLES: 32.0, TIMESTAMP: 1700000100.0}


def test_a_full_probe_of_a_model_forgets_its_versions_no_longer_registered():
    before = probe_metrics.render(
        probe_metrics.as_series([result("digits", "1.0.0"), result("digits", "0.9.0"), result("t", "1")])
    )
    one_version = probe_metrics.parse(probe_metrics.merge(before, [result("digits", "1.0.0")]))
    assert set(one_version) == {("digits", "1.0.0"), ("digits", "0.9.0"), ("t", "1")}
    whole_model = probe_metrics.parse(probe_metrics.merge(before, [result("digits", "1.0.0")], replace_model="digits"))
    assert set(whole_model) == {("digits", "1.0.0"), ("t", "1")}


def test_record_replaces_the_file_atomically_and_leaves_no_temporary(tmp_path):
    path = probe_metrics.record(tmp_path, [result("digits", "1.0.0", 32, 31)])
    probe_metrics.record(tmp_path, [result("text", "2.0.0", 10, 10)])
    assert path == tmp_path / probe_metrics.PROBES_FILE and not list(tmp_path.glob("*.tmp"))
    assert set(probe_metrics.parse(path.read_text())) == {("digits", "1.0.0"), ("text", "2.0.0")}


@pytest.mark.parametrize(
    ("answer", "label"),
    [({"label": "7", "index": 7}, "7"), ([{"label": "3"}], "3"), ({"output": [0.1, 0.9]}, None), (None, None)],
)
def test_top_label_reads_a_classifiers_answer(answer, label):
    assert answer_label(answer) == label
    assert probes.agrees(answer, HeldOutSample(Path("x.png"), "7")) == (label == "7")


@pytest.mark.parametrize("every", [0, -5])
def test_a_non_positive_interval_is_refused_before_anything_runs(tmp_path, every):
    with pytest.raises(UsageError, match="--every must be > 0"):
        probes.probe_every(offline(tmp_path), "digits", None, every)
    assert list(tmp_path.iterdir()) == []


def test_every_probes_and_records_each_round_until_ctrl_c(tmp_path, monkeypatch):
    rounds = iter([[result("digits", "1.0.0", 32, 32)], [result("digits", "1.0.0", 32, 16)]])
    monkeypatch.setattr(probes, "probe_model", lambda *args: next(rounds))
    naps = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(probes.time, "sleep", sleep)
    shown = []
    last = probes.probe_every(
        SimpleNamespace(client=None, store=tmp_path, workdir=tmp_path), "digits", None, 60.0, shown.append
    )
    assert [r[0].agreement for r in shown] == [1.0, 0.5] and last == shown[-1]
    assert all(0 < nap <= 60.0 for nap in naps)
    assert probe_metrics.parse(probe_metrics.probes_file(tmp_path).read_text())[("digits", "1.0.0")][AGREEMENT] == 0.5


def test_probing_a_model_with_no_registered_version_removes_its_lines_and_only_those(tmp_path, monkeypatch):
    path = probe_metrics.record(
        tmp_path, [result("digits", "1.0.0"), result("digits", "1.1.0"), result("text", "1.0.0")]
    )
    monkeypatch.setattr(probes, "registered_versions", lambda client, name: [])  # a restart without --resume
    removed = []
    assert (
        probes.probe_every(
            SimpleNamespace(client=None, store=tmp_path, workdir=tmp_path),
            "digits",
            None,
            None,
            on_forget=removed.append,
        )
        == []
    )
    assert removed == [["1.0.0", "1.1.0"]]
    assert set(probe_metrics.parse(path.read_text())) == {("text", "1.0.0")}
    with pytest.raises(UsageError, match=r"digits is not registered .* `servekit register digits --version V` first"):
        probes.probe_every(
            SimpleNamespace(client=None, store=tmp_path, workdir=tmp_path), "digits", None, None
        )  # nothing left: a typo, say
    with pytest.raises(UsageError, match=r"`servekit register digits --version 1\.0\.0` first"):
        probes.probe_every(offline(tmp_path), "digits", "1.0.0", None)
    assert set(probe_metrics.parse(path.read_text())) == {("text", "1.0.0")}
