"""`servekit import` in process: models a user brings become trained folders whose archives answer as the model
does; every way in that cannot work is one line, exit 2, and nothing written."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from support.own_models import export_formats, labelled_subset, user_model, write_user_model

from servekit.build.importer import save_model
from servekit.cli import cli
from servekit.core.errors import UsageError
from servekit.core.requirements import check, check_serving_environment, parse_requirements
from servekit.measure.inprocess import InProcessHandler
from servekit.store.catalog import Catalog, sha256_file
from servekit_worker.digits import image_to_tensor


def servekit(*args) -> str:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def brought(tmp_path_factory, held_out):
    """A user's TinyNet (file + helper module) with its weights as .safetensors and .pt, and torch's own exports."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("brought")
    file = write_user_model(folder)
    model = user_model(file)
    save_file(model.state_dict(), folder / "weights.safetensors")
    torch.save(model.state_dict(), folder / "weights.pt")
    torch.save(model, folder / "pickled.pt")
    example = image_to_tensor(held_out[0].path.read_bytes(), 10**6)
    files = export_formats(model, example, folder / "exported")
    return {"file": file, "model": model, "folder": folder, **files}


def expected_labels(model, samples) -> list[str]:
    with torch.inference_mode():
        batch = torch.cat([image_to_tensor(s.path.read_bytes(), 10**6) for s in samples])
        return [str(int(i)) for i in model(batch).argmax(dim=1)]


def served_labels(archive: Path, samples) -> list[str]:
    with InProcessHandler(archive) as handler:
        answers = handler.handle([(s.path.read_bytes(), "image/png") for s in samples])
    return [answer["label"] for answer in answers]


def test_a_class_whose_file_imports_a_helper_travels_with_its_code(brought, held_out, trained_digits, tmp_path):
    store = tmp_path / "store"
    (tmp_path / "requirements.txt").write_text("torch>=2.0  # the model's own\n")
    eval_dir = labelled_subset(held_out[:80], tmp_path / "eval")
    output = servekit("import", "tiny", "--model", f"{brought['file']}:TinyNet", "--kwargs", '{"width": 8}',
                      "--weights", brought["folder"] / "weights.safetensors", "--handler", "digits",
                      "--example", held_out[0].path, "--example", held_out[1].path, "--eval", eval_dir,
                      "--labels", trained_digits / "labels.json", "--requirements", tmp_path / "requirements.txt",
                      "--store", store)  # fmt: skip
    assert "imported tiny (eager, its code (2 file(s)) copied)" in output and "80 held-out" in output
    folder = store / "work" / "tiny"
    assert sorted(p.name for p in (folder / "model_code").iterdir()) == ["layers.py", "tinynet.py"]
    handler = json.loads((folder / "handler.json").read_text())
    assert handler["model_class"] == "tinynet:TinyNet" and handler["model_code"] == "model_code"
    assert handler["example_input"] == {"shape": [1, 28, 28], "dtype": "float32"} and handler["handler"] == "digits"
    metrics = json.loads((folder / "metrics.json").read_text())
    weights = brought["folder"] / "weights.safetensors"
    assert metrics["inputs_sha256"][str(weights)] == sha256_file(weights)
    assert metrics["inputs_sha256"][str(held_out[0].path)] == sha256_file(held_out[0].path)
    assert set(metrics["inputs_sha256"]) >= {str(eval_dir), str(tmp_path / "requirements.txt")}

    shutil.rmtree(brought["file"].parent.parent / "src", ignore_errors=False)  # served from its copy, not from here
    try:
        servekit("build", "tiny", "--version", "1.0.0", "--batch-size", "4", "--store", store)
        entry = Catalog.load(store).get("tiny", "1.0.0")
        assert entry.requirements == ["torch>=2.0"] and entry.handler == "digits"
        with zipfile.ZipFile(store / entry.archive) as mar:
            assert {"model_code/tinynet.py", "model_code/layers.py", "digits.py"} <= set(mar.namelist())
        samples = held_out[:12]
        assert served_labels(store / entry.archive, samples) == expected_labels(brought["model"], samples)
    finally:
        write_user_model(brought["folder"])


def test_a_class_imported_from_its_own_folder_copies_only_its_code(brought, held_out, tmp_path, monkeypatch):
    # run where the file is, as the README's example does: torch's modules that name relative files (torch.ops:
    # "_ops.py", torch.classes: "_classes.py") must not be taken for the user's code there
    monkeypatch.chdir(brought["file"].parent)
    store = tmp_path / "store"
    servekit("import", "here", "--model", f"{brought['file'].name}:TinyNet", "--kwargs", '{"width": 8}',
             "--handler", "digits", "--example", held_out[0].path, "--store", store)  # fmt: skip
    assert sorted(p.name for p in (store / "work" / "here" / "model_code").iterdir()) == ["layers.py", "tinynet.py"]


@pytest.mark.parametrize("kind", ["model.ts", "model.pt2", "model.onnx"])
def test_each_format_that_carries_its_graph_is_served_as_brought(brought, held_out, tmp_path, kind):
    store = tmp_path / "store"
    output = servekit("import", "graph", "--model", brought[kind], "--handler", "digits", "--example",
                      held_out[0].path, "--store", store)  # fmt: skip
    model_format = {"model.ts": "torchscript", "model.pt2": "export", "model.onnx": "onnx"}[kind]
    assert f"imported graph ({model_format})" in output
    assert "model_class" not in json.loads((store / "work" / "graph" / "handler.json").read_text())
    servekit("build", "graph", "--version", "1.0.0", "--batch-size", "4", "--store", store)
    assert Catalog.load(store).get("graph", "1.0.0").model_format == model_format
    samples = held_out[:10]
    assert served_labels(store / "graph-1.0.0.mar", samples) == expected_labels(brought["model"], samples)


def test_optimize_makes_what_it_can_from_a_brought_program_and_says_why_not_the_rest(brought, held_out, tmp_path):
    store = tmp_path / "store"
    eval_dir = labelled_subset(held_out[:90], tmp_path / "eval")
    servekit("import", "prog", "--model", brought["model.pt2"], "--handler", "digits", "--example", held_out[0].path,
             "--eval", eval_dir, "--store", store)  # fmt: skip
    servekit("optimize", "prog", "--variants", "eager,onnx,bf16,torchscript", "--budget", "0.1", "--pick", "fastest",
             "--store", store)  # fmt: skip
    report = json.loads((store / "work" / "prog-optimized" / "report.json").read_text())
    status = {r["name"]: (r["status"], r["reason"]) for r in report["results"]}
    assert status["eager"][0] == "reference" and status["onnx"][0] == "accepted"
    for variant in ("bf16", "torchscript"):
        assert status[variant][0] == "skipped" and "cannot be made from a export file" in status[variant][1]
    baseline = store / "work" / "prog-optimized" / "variants" / "eager"
    assert (baseline / "model.pt2").read_bytes() == brought["model.pt2"].read_bytes()
    servekit("build", "prog", "--version", "1.0.0", "--variant", "onnx", "--batch-size", "4", "--store", store)
    assert Catalog.load(store).get("prog", "1.0.0").model_format == "onnx"
    samples = held_out[:10]
    assert served_labels(store / "prog-1.0.0.mar", samples) == expected_labels(brought["model"], samples)


def test_a_module_in_memory_is_saved_with_its_class_and_a_mismatch_asks_for_its_arguments(brought, held_out, tmp_path):
    wide = user_model(brought["file"], width=16)
    imported = save_model("wide", wide, [held_out[0].path], tmp_path / "wide", kwargs={"width": 16}, handler="digits")
    handler = json.loads((imported.out / "handler.json").read_text())
    assert handler["model_class"] == "tinynet:TinyNet" and handler["model_kwargs"] == {"width": 16}
    assert imported.code_files == ["layers.py", "tinynet.py"]
    with pytest.raises(UsageError, match=r"weights do not fit .*pass kwargs"):
        save_model("wide2", wide, [held_out[0].path], tmp_path / "wide2", handler="digits")
    assert not (tmp_path / "wide2").exists()


def cases(brought, held_out, tmp_path) -> dict[str, tuple[list, str]]:
    """Each way in that cannot work: the arguments and what the one line must say."""
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise ValueError('the user file itself is broken')\n")
    not_torchscript = tmp_path / "weights_only.pt"
    shutil.copy2(brought["folder"] / "weights.pt", not_torchscript)
    extra_keys = tmp_path / "extra.pt"
    state = dict(brought["model"].state_dict())
    state["extra.weight"] = state.pop("head.1.bias")
    torch.save(state, extra_keys)
    bad_requirements = tmp_path / "requirements.txt"
    bad_requirements.write_text("torch>=2\nnot a requirement!\n")
    not_json = tmp_path / "not_json.json"
    not_json.write_text("{'input': unquoted}")
    model = f"{brought['file']}:TinyNet"
    return {
        "unknown class": (["--model", f"{brought['file']}:Nope"], "tinynet.py has no 'Nope'"),
        "file that fails to import": (["--model", f"{broken}:Net"],
                                      "failed to import: ValueError: the user file itself is broken"),
        "weights of another size": (["--model", model, "--kwargs", '{"width": 4}', "--weights",
                                     brought["folder"] / "weights.pt"],
                                    "features.0.weight is [8, 1, 3, 3] in the weights, [4, 1, 3, 3] in the model"),
        "missing and unexpected keys": (["--model", model, "--weights", extra_keys],
                                        "missing keys head.1.bias; unexpected keys extra.weight"),
        "a whole pickled model": (["--model", model, "--weights", brought["folder"] / "pickled.pt"],
                                  "holds a whole pickled model, not a state_dict"),
        "an example the model rejects": (["--model", model, "--kwargs", '{"width": 8, "classes": 10}', "--handler",
                                          "image", "--resize", "28", "--crop", "28"],
                                         "the model rejects the example input: RuntimeError"),
        "an example the handler rejects": (["--model", model, "--example", not_json],
                                           "the digits handler refuses --example not_json.json: "),
        "a program with its batch fixed at 1": (["--model", brought["fixed.pt2"]], "runs a batch of 1 but not of 2"),
        "an ONNX model with its batch fixed at 1": (["--model", brought["fixed.onnx"]],
                                                    "fixes the batch dimension at 1"),
        "a state_dict given as the model": (["--model", not_torchscript], "is not a TorchScript file (a state_dict?"),
        "a malformed requirements file": (["--model", model, "--requirements", bad_requirements],
                                          "requirements.txt:2: 'not a requirement!' is not a requirement"),
    }  # fmt: skip


def test_every_way_in_that_cannot_work_is_one_line_exit_2_and_nothing_written(brought, held_out, tmp_path):
    for case, (arguments, message) in cases(brought, held_out, tmp_path).items():
        out = tmp_path / "out" / case.replace(" ", "_")
        example = [] if "--example" in arguments else ["--example", held_out[0].path]
        # digits unless the case names its own handler: click takes the last value given
        command = ["import", "bad", "--handler", "digits", *arguments, *example, "--out", out]
        result = CliRunner().invoke(cli, [str(argument) for argument in command])
        assert result.exit_code == 2, (case, result.output)
        assert message in result.output, (case, result.output)
        assert "Traceback" not in result.output and result.output.count("error:") == 1, (case, result.output)
        assert not out.exists(), case


def test_requirements_are_read_checked_against_this_environment_and_refused_by_name(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# the model's code\ntorch>=2.0\n\nnumpy  # any\n")
    assert parse_requirements(path) == ["torch>=2.0", "numpy"]
    assert check(["torch>=2.0", "numpy"]) == []
    missing = check(["torch>=999", "surely-not-installed-pkg==1.0"])
    assert (
        missing[0].startswith("torch>=999 (installed: ")
        and missing[1] == "surely-not-installed-pkg==1.0 (not installed)"
    )
    with pytest.raises(UsageError) as refused:
        check_serving_environment("tiny", "1.0.0", ["torch>=2.0", "surely-not-installed-pkg==1.0"])
    message = str(refused.value)
    assert "tiny 1.0.0 needs surely-not-installed-pkg==1.0 (not installed)" in message and "\n" not in message
