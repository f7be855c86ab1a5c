"""`servekit export triton` without a server: the repository's layout, its config, and semver <-> Triton's
integer versions kept stable as versions are added."""

from __future__ import annotations

import json
import zipfile

import pytest
from click.testing import CliRunner

from servekit.build.archive import BuildOptions, build_archive
from servekit.build.triton import TritonSpec, export_triton
from servekit.cli import cli
from servekit.core.errors import ArchiveError, UsageError
from servekit.store.catalog import Catalog


@pytest.fixture(scope="module")
def store(tmp_path_factory, trained_digits):
    store = tmp_path_factory.mktemp("store")
    for version in ("1.0.0", "1.1.0"):
        build_archive(
            "digits", version, trained_digits, store, options=BuildOptions(batch_size=4, max_batch_delay_ms=5)
        )
    return store


def test_the_repository_holds_each_archive_its_model_py_and_a_config_from_its_settings(store, tmp_path):
    result = CliRunner().invoke(cli, ["export", "triton", "digits", "--version", "1.0.0", "--instances", "3",
                                      "--max-queue-delay-us", "5000", "--out", str(tmp_path),
                                      "--store", str(store)])  # fmt: skip
    assert result.exit_code == 0, result.output
    model = tmp_path / "digits"
    with zipfile.ZipFile(store / "digits-1.0.0.mar") as mar:
        assert {name for name in mar.namelist() if not name.endswith("/")} <= {
            str(p.relative_to(model / "1")) for p in (model / "1").rglob("*") if p.is_file()
        }
    source = (model / "1" / "model.py").read_text()
    assert "from servekit_worker.digits import DigitsHandler as Handler" in source
    assert "class TritonPythonModel(TritonHandler, Handler):" in source
    settings = json.loads((model / "1" / "servekit-model.json").read_text())
    assert (settings["version"], settings["weights"]) == ("1.0.0", "model.pt")
    assert settings["handler"]["format"] == "state_dict"
    config = (model / "config.pbtxt").read_text()
    for line in ('backend: "python"', "max_batch_size: 64", "max_queue_delay_microseconds: 5000",
                 "kind: KIND_CPU", "count: 3", 'name: "probabilities"', "dims: [ 10 ]",
                 "all {"):  # fmt: skip
        assert line in config, line


def test_by_default_triton_holds_no_request_and_runs_as_many_instances_as_the_archive_has_workers(store, tmp_path):
    export_triton(store, TritonSpec("digits", ["1.0.0"], tmp_path))
    config = (tmp_path / "digits" / "config.pbtxt").read_text()
    workers = Catalog.load(store).get("digits", "1.0.0").config["minWorkers"]
    # the archive's 5 ms window is TorchServe's: Triton's batcher batches what waits without one
    assert "max_queue_delay_microseconds: 0\n" in config and f"count: {workers}\n" in config
    # on GPUs, the workers TorchServe would give the GPUs in turn: instances per GPU
    assert [
        TritonSpec("m", ["1.0.0"], tmp_path, gpus=gpus).instances_of({"minWorkers": 3}) for gpus in (0, 1, 2, 4)
    ] == [3, 3, 2, 1]
    assert TritonSpec("m", ["1.0.0"], tmp_path, instances=1, gpus=2).instances_of({"minWorkers": 3}) == 1
    with pytest.raises(UsageError, match="max-queue-delay-us -1"):
        TritonSpec("m", ["1.0.0"], tmp_path, queue_delay_us=-1).validate()
    with pytest.raises(UsageError, match="--version-policy 'newest': one of all, latest, specific"):
        TritonSpec("m", ["1.0.0"], tmp_path, version_policy="newest").validate()


def test_a_version_added_later_keeps_the_numbers_given_before(store, tmp_path):
    export_triton(store, TritonSpec("digits", ["1.1.0"], tmp_path))
    export_triton(store, TritonSpec("digits", ["1.0.0", "1.1.0"], tmp_path, version_policy="specific"))
    assert json.loads((tmp_path / "digits" / "servekit.json").read_text())["versions"] == {"1": "1.1.0", "2": "1.0.0"}
    assert "specific {\n    versions: [ 1, 2 ]" in (tmp_path / "digits" / "config.pbtxt").read_text()
    export_triton(store, TritonSpec("digits", ["1.1.0"], tmp_path, gpus=2, version_policy="latest", latest_count=1))
    config = (tmp_path / "digits" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in config and "gpus: [ 0, 1 ]" in config and "num_versions: 1" in config


def test_a_tampered_archive_is_refused_and_nothing_is_written(store, tmp_path):
    tampered = tmp_path / "store"
    tampered.mkdir()
    for path in store.iterdir():
        if path.is_file():
            (tampered / path.name).write_bytes(path.read_bytes())
    (tampered / "digits-1.1.0.mar").write_bytes((tampered / "digits-1.1.0.mar").read_bytes() + b"x")
    with pytest.raises(ArchiveError, match="sha256"):
        export_triton(tampered, TritonSpec("digits", ["1.0.0", "1.1.0"], tmp_path / "repository"))
    assert not (tmp_path / "repository").exists()


def test_bench_asks_triton_the_exported_version_in_v2_documents(store, tmp_path, held_out):
    import base64

    from servekit.measure.bench import triton_peer
    from servekit.serve.triton import TritonState

    export_triton(store, TritonSpec("digits", ["1.1.0"], tmp_path))
    export_triton(store, TritonSpec("digits", ["1.0.0"], tmp_path))
    triton = TritonState(4242, 18000, 18001, 18002, str(tmp_path), str(tmp_path))
    png = held_out[0].path.read_bytes()
    peer = triton_peer(triton, "digits", "1.0.0", [(png, "image/png")])
    assert (peer.label, peer.pid, peer.url) == (
        "triton",
        4242,
        "http://127.0.0.1:18000/v2/models/digits/versions/2/infer",
    )
    [(body, content_type)] = peer.bodies
    [tensor] = json.loads(body)["inputs"]
    assert content_type == "application/json" and (tensor["shape"], tensor["datatype"]) == ([1, 1], "BYTES")
    assert base64.b64decode(tensor["data"][0]) == png
    with pytest.raises(UsageError, match="not in the Triton repository"):
        triton_peer(triton, "digits", "9.9.9", [(png, "image/png")])
    # benching the Triton itself: the newest exported by default; one not exported is refused before any load
    from servekit.measure.bench import TritonRuntime

    runtime = TritonRuntime(triton, store)
    assert runtime.version("digits", None) == "1.0.0" and runtime.version("digits", "1.1.0") == "1.1.0"
    for name, version in (("digits", "9.9.9"), ("other", None)):
        with pytest.raises(UsageError, match=f"{name}.* is not in the Triton repository"):
            runtime.version(name, version)


def test_an_archive_built_before_the_triton_adapter_is_refused_with_the_fix(store, tmp_path, monkeypatch):
    from servekit.build import triton

    monkeypatch.setattr(triton, "ADAPTER", "servekit_worker/not_there.py")
    with pytest.raises(UsageError, match="build it again with this servekit"):
        export_triton(store, TritonSpec("digits", ["1.0.0"], tmp_path / "repository"))
    assert not (tmp_path / "repository").exists()
