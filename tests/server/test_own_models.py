"""Models no one here wrote, end to end on the session's TorchServe: import -> optimize -> build -> register ->
predict -> evaluate -> rollout to a second version; every served answer equals the user's own model's in process
(same label, probabilities within 1e-4) on the evaluation inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from support.answers import assert_same_answers
from support.own_models import labelled_subset, pixel_bodies, readme_example, user_model, write_user_model
from support.servers import unregister_all

from servekit.build.handler_code import Decoder
from servekit.build.optimize import folder_handler
from servekit.cli import cli
from servekit.measure.inprocess import InProcessHandler
from servekit.serve.client import ServeClient
from servekit.serve.deployments import default_version
from servekit.store.heldout import read_held_out
from servekit_worker.answers import classification

pytestmark = pytest.mark.server
EVAL_SAMPLES = 80  # more than optimize's 74 (64 calibrate, the rest score)


def servekit(*args) -> str:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def expected_answers(model, folder: Path, samples) -> list[dict]:
    """The user's model in this process on the samples as the folder's handler decodes them."""
    settings = json.loads((folder / "handler.json").read_text())
    decoder = Decoder(folder_handler(folder, settings), settings, folder)
    labels = json.loads((folder / "labels.json").read_text())
    batch = decoder.batch([decoder.samples(s.path.read_bytes(), s.content_type, s.path.name)[0] for s in samples])
    with torch.inference_mode():
        return [classification(row, labels, 3) for row in model(batch).float()]


def through_everything(torchserve, name: str, model, import_args: list | None, variants: str) -> None:
    """The whole path for one brought model on the shared server (`import_args` None: imported already, from
    Python); it leaves the server as it found it."""
    store, workdir = Path(torchserve.model_store), torchserve.workdir
    client = ServeClient(torchserve.endpoints())
    if import_args is not None:
        servekit("import", name, *import_args, "--store", store)
    folder = store / "work" / name
    servekit("optimize", name, "--variants", variants, "--budget", "0.1", "--pick", "fastest", "--store", store)
    settings = ["--workers", "1", "--batch-size", "4", "--max-batch-delay", "2", "--store", store]
    servekit("build", name, "--version", "1.0.0", *settings)
    servekit("build", name, "--version", "1.1.0", "--variant", "best", *settings)
    samples = read_held_out(folder / "heldout")
    expected = expected_answers(model, folder, samples)
    try:
        servekit("register", name, "--version", "1.0.0", "--workdir", workdir)
        answers = [client.predict(name, s.path.read_bytes(), content_type=s.content_type) for s in samples]
        assert_same_answers(answers, expected, 1e-4)
        evaluation = json.loads(servekit("evaluate", name, "--json", "--workdir", workdir))
        in_process = sum(answer["label"] == s.label for answer, s in zip(expected, samples, strict=True))
        assert evaluation["correct"] == in_process and evaluation["total"] == len(samples)
        servekit("rollout", name, "--version", "1.1.0", "--watch", "0.5", "--shadow-samples", "8",
                 "--max-latency-ratio", "10", "--workdir", workdir)  # fmt: skip
        assert default_version(client, name) == "1.1.0"
        answers = [client.predict(name, s.path.read_bytes(), content_type=s.content_type) for s in samples[:16]]
        # the variant optimize picked, in process, one request a batch as the requests above were (dynamic int8
        # quantizes each batch with its own range)
        with InProcessHandler(store / f"{name}-1.1.0.mar") as optimized:
            expected = [optimized.handle([(s.path.read_bytes(), s.content_type)])[0] for s in samples[:16]]
        assert_same_answers(answers, expected, 1e-4)
    finally:
        unregister_all(client, name)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, held_out) -> Path:
    return labelled_subset(held_out[:EVAL_SAMPLES], tmp_path_factory.mktemp("eval") / "digits")


def test_a_timm_classifier_from_python(torchserve, held_out, eval_dir, tmp_path):
    """An in-memory timm model (random init), saved with its factory; timm is its requirement."""
    import timm

    from servekit.build.importer import save_model

    kwargs = {"model_name": "resnet10t", "num_classes": 10}
    torch.manual_seed(0)
    model = timm.create_model(**kwargs).eval()
    (tmp_path / "requirements.txt").write_text("timm>=1.0\n")
    save_model("own-timm", model, [held_out[0].path], Path(torchserve.model_store) / "work" / "own-timm",
               factory="timm:create_model", kwargs=kwargs, handler="image", preprocess={"resize": 32, "crop": 32},
               eval_dir=eval_dir, requirements=tmp_path / "requirements.txt")  # fmt: skip
    through_everything(torchserve, "own-timm", model, None, "eager,onnx")


def test_a_users_file_with_a_helper_module_safetensors_weights_and_the_readme_handler(torchserve, held_out, tmp_path):
    """The user's TinyNet (its file imports a helper from its folder), its weights as .safetensors, asked through
    the README's own handler (flat pixel lists): one chain for the three."""
    from safetensors.torch import save_file

    file = write_user_model(tmp_path)
    model = user_model(file, width=8)
    weights, handler = tmp_path / "weights.safetensors", tmp_path / "flat_pixels.py"
    save_file(model.state_dict(), weights)
    handler.write_text(readme_example())
    bodies = pixel_bodies(held_out[:EVAL_SAMPLES], tmp_path / "pixels")
    arguments = ["--model", f"{file}:TinyNet", "--kwargs", '{"width": 8}', "--weights", weights, "--handler", handler,
                 "--example", bodies / "0000.json", "--eval", bodies]  # fmt: skip
    through_everything(torchserve, "own-file", model, arguments, "eager,torchscript")


@pytest.fixture(scope="module")
def torchvision_model(trained_image):
    """torchvision's mobilenet_v3_small with the weights servekit's image fixture trained (32 px RGB digits)."""
    import torchvision

    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    model.load_state_dict(torch.load(trained_image / "model.pt", weights_only=True))
    return model.eval()


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_a_file_exported_from_torchvision_outside_servekit(torchserve, torchvision_model, trained_image, held_out,
                                                           eval_dir, tmp_path, kind):  # fmt: skip
    example = torch.randn(2, 3, 32, 32)
    path = tmp_path / ("model.pt" if kind == "torchscript" else "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "torchscript":
            torch.jit.trace(torchvision_model, example).save(str(path))
        else:
            torch.onnx.export(torchvision_model, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},), verbose=False)  # fmt: skip
    variants = "eager,bf16" if kind == "torchscript" else "eager,onnx_dynamic_int8"
    through_everything(torchserve, f"own-{kind}", torchvision_model, ["--model", path, "--handler", "image",
                       "--resize", "32", "--crop", "32", "--labels", trained_image / "labels.json", "--example",
                       held_out[0].path, "--eval", eval_dir], variants)  # fmt: skip


def test_a_model_whose_requirements_the_server_lacks_is_refused_before_registering(torchserve, held_out, tmp_path):
    file = write_user_model(tmp_path)
    (tmp_path / "requirements.txt").write_text("torch>=2.0\nsurely-not-installed-pkg>=1.0\n")
    store = Path(torchserve.model_store)
    servekit("import", "own-needs", "--model", f"{file}:TinyNet", "--handler", "digits", "--example", held_out[0].path,
             "--requirements", tmp_path / "requirements.txt", "--store", store)  # fmt: skip
    servekit("build", "own-needs", "--version", "1.0.0", "--workers", "1", "--batch-size", "4", "--store", store)
    refused = CliRunner().invoke(cli, ["register", "own-needs", "--version", "1.0.0", "--workdir", torchserve.workdir])
    assert refused.exit_code == 2 and refused.output.count("\n") == 1, refused.output
    assert "own-needs 1.0.0 needs surely-not-installed-pkg>=1.0 (not installed) in the serving environment" in " ".join(
        refused.output.split()
    )
    assert "own-needs" not in [m["modelName"] for m in ServeClient(torchserve.endpoints()).list_models()]
