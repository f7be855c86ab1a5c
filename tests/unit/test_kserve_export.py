"""`servekit export kserve --protocol v1|v2`: the serviceEnvelope label KServe's runtime turns into
TS_SERVICE_ENVELOPE, and the setting that lets TorchServe read it; KServe error objects read by the client."""

from __future__ import annotations

import json
from email.message import Message

import pytest
import yaml
from click.testing import CliRunner

from servekit.cli import cli
from servekit.client import error_message
from servekit.errors import UsageError
from servekit.export import KServeSpec, export_kserve
from servekit.server import read_properties
from servekit.transport import Response


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
