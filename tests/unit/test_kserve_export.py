"""`servekit export kserve --protocol v1|v2`: the serviceEnvelope label KServe's runtime turns into
TS_SERVICE_ENVELOPE, and the setting that lets TorchServe read it; KServe error objects read by the client."""

from __future__ import annotations

import json
from email.message import Message

import pytest
import yaml
from click.testing import CliRunner

from servekit.build.export import KServeSpec, export_kserve
from servekit.cli import cli
from servekit.core.errors import UsageError
from servekit.core.properties import read_properties
from servekit.core.transport import Response
from servekit.serve.client import error_message


@pytest.mark.parametrize(("protocol", "envelope"), [("v1", "kserve"), ("v2", "kservev2")])
def test_export_sets_the_service_envelope_and_enables_envvars_config(tmp_path, model_store, protocol, envelope):
    service_path, properties_path, _ = export_kserve(
        model_store, KServeSpec("digits", "1.0.0", "pvc://models/digits", protocol=protocol), tmp_path
    )
    service = yaml.safe_load(service_path.read_text())
    assert service["metadata"]["labels"]["serviceEnvelope"] == envelope
    assert service["spec"]["predictor"]["model"]["protocolVersion"] == protocol
    assert read_properties(properties_path)["enable_envvars_config"] == "true"


def test_export_command_takes_the_protocol(tmp_path, model_store):
    arguments = ["export", "kserve", "digits", "--version", "1.0.0", "--storage-uri", "pvc://m", "--store"]
    result = CliRunner().invoke(cli, [*arguments, str(model_store), "--out", str(tmp_path), "--protocol", "v2"])
    assert result.exit_code == 0, result.output
    service = yaml.safe_load((tmp_path / "inferenceservice.yaml").read_text())
    assert service["metadata"]["labels"]["serviceEnvelope"] == "kservev2"
    refused = CliRunner().invoke(cli, [*arguments, str(model_store), "--out", str(tmp_path), "--protocol", "v3"])
    assert refused.exit_code == 2
    with pytest.raises(UsageError, match="--protocol"):
        KServeSpec("digits", "1.0.0", "pvc://m", protocol="grpc").validate()


def test_a_kserve_error_object_reads_as_its_message():
    def answer(document: dict) -> Response:
        return Response(400, "Bad Request", Message(), json.dumps(document).encode(), "http://127.0.0.1/v2")

    assert error_message(answer({"error": "invalid_base64: instance 0 is not valid base64"})) == (
        "invalid_base64: instance 0 is not valid base64"
    )
    assert error_message(answer({"code": 400, "error": "invalid_image", "detail": "cannot decode"})) == (
        "invalid_image: cannot decode"
    )


def test_the_triton_runtime_gets_a_model_repository_and_a_v2_inference_service(tmp_path, model_store):
    image = "registry/digits-triton:1.0.0"
    arguments = ["export", "kserve", "digits", "--version", "1.0.0", "--storage-uri", "gs://b/digits", "--runtime",
                 "triton", "--gpus", "1", "--canary-traffic-percent", "10", "--image", image]  # fmt: skip
    result = CliRunner().invoke(cli, [*arguments, "--store", str(model_store), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    service = yaml.safe_load((tmp_path / "inferenceservice.yaml").read_text())
    predictor = service["spec"]["predictor"]
    assert predictor["model"]["modelFormat"] == {"name": "triton"} and predictor["model"]["protocolVersion"] == "v2"
    assert predictor["model"]["image"] == image and predictor["canaryTrafficPercent"] == 10
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "serviceEnvelope" not in service["metadata"]["labels"]
    model = tmp_path / "model-repository" / "digits"
    assert "kind: KIND_GPU" in (model / "config.pbtxt").read_text() and (model / "1" / "model.py").is_file()
    assert "site-packages" not in (model / "1" / "model.py").read_text()  # the image provides the packages
    assert "upload" in result.output and "model-repository" in result.output
    with pytest.raises(UsageError, match="v2 protocol only"):
        KServeSpec("digits", "1.0.0", "gs://b", protocol="v1", runtime="triton").validate()


def test_the_triton_dockerfile_installs_the_torch_the_archive_was_built_with(tmp_path, model_store):
    import torch

    result = CliRunner().invoke(cli, ["export", "docker", "digits", "--version", "1.0.0", "--runtime", "triton",
                                      "--store", str(model_store), "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    dockerfile = (tmp_path / "Dockerfile").read_text()
    assert dockerfile.startswith("# Written by servekit export docker --runtime triton")
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in dockerfile
    assert f"torch=={torch.__version__.split('+')[0]}" in dockerfile and "COPY model-repository /models" in dockerfile
    assert (tmp_path / "model-repository" / "digits" / "config.pbtxt").is_file()
