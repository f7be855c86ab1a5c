"""The worker package's shape: small one-concern modules that import only what every serving runtime has, the
TorchServe entry points one class each, and the facts the library reads at start-up importable without torch."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from support import REPO

WORKER = REPO / "servekit_worker"
MODULES = sorted(WORKER.glob("*.py"))
MAX_MODULE_LINES = 350
RUNTIME_PACKAGES = {"torch", "torchvision", "PIL", "numpy", "servekit_worker"}  # numpy: torchvision requires it
# Imported inside functions only, and by these modules only: ONNX Runtime when an ONNX model loads, TorchServe's
# `ts` in its adapter.
# What a module may import inside its functions: a format's runtime, or a runtime's own API in its adapter alone.
LAZY_IMPORTS = {"onnxruntime": {"loading"}, "ts": {"torchserve"}, "triton_python_backend_utils": {"triton"}}
# What the library imports from the worker at start-up (`servekit --help` must not load torch).
LIGHT_MODULES = ("errors", "requests", "kserve", "answers", "settings", "loading", "telemetry")


def imports(path) -> tuple[set[str], set[str]]:
    """The top-level packages a module imports at its top, and inside functions (`if TYPE_CHECKING:` imports,
    for annotations only, left out)."""
    tree = ast.parse(path.read_text())

    def inner(kinds) -> set[int]:
        blocks = [node for node in ast.walk(tree) if kinds(node)]
        return {id(child) for block in blocks for child in ast.walk(block) if child is not block}

    nested = inner(lambda node: isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
    typing_only = inner(lambda node: isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    top, inside = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = {node.module.split(".")[0]}
        else:
            continue
        if id(node) not in typing_only:
            (inside if id(node) in nested else top).update(names)
    return top - {"__future__"}, inside


def test_the_worker_package_has_its_modules_and_each_is_small():
    names = {path.stem for path in MODULES}
    assert {"base", "requests", "kserve", "vision", "loading", "acceleration", "telemetry", "torchserve"} <= names
    for path in MODULES:
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines; split it by concern"


@pytest.mark.parametrize("path", MODULES, ids=[path.name for path in MODULES])
def test_worker_modules_import_only_what_every_runtime_has(path):
    allowed = RUNTIME_PACKAGES | set(sys.stdlib_module_names)
    top, inside = imports(path)
    assert top <= allowed, f"{path.name} imports {sorted(top - allowed)} at its top"
    lazily = {package for package, modules in LAZY_IMPORTS.items() if path.stem in modules}
    assert inside <= allowed | lazily, f"{path.name} imports {sorted(inside - allowed - lazily)}"


def test_the_import_check_finds_a_forbidden_import(tmp_path):
    """The check above can fail: servekit itself, requests, and `ts` outside the adapter are caught."""
    module = tmp_path / "acceleration.py"
    module.write_text("import requests\n\ndef f():\n    import ts\n    from servekit.core.errors import UsageError\n")
    top, inside = imports(module)
    assert top == {"requests"} and inside == {"ts", "servekit"}


def test_the_facts_the_library_reads_at_start_up_import_without_torch():
    modules = ", ".join(f"servekit_worker.{name}" for name in LIGHT_MODULES)
    probe = f"import sys, {modules}; print(sorted({{'torch', 'torchvision', 'PIL'}} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_a_worker_that_decodes_no_jpeg_starts_without_torchvision():
    """torchvision costs a worker 1.2 s to import (its package imports every model): only JPEG decoding and the
    image transforms load it. A digits worker registered in 1.5 s instead of 2.6 (2 workers, 2-core VM)."""
    probe = "import sys, servekit_worker.digits, servekit_worker.tensor_handler, servekit_worker.text_classifier, "
    probe += "servekit_worker.torchserve; print('torchvision' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("path", sorted((REPO / "handlers").glob("[!_]*.py")), ids=lambda path: path.name)
def test_each_torchserve_entry_point_is_one_class_on_the_worker_package(path):
    tree = ast.parse(path.read_text())
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    assert len(classes) == 1, "TorchServe's loader takes a handler file with exactly one class"
    assert imports(path)[0] == {"servekit_worker"}
    assert [base.id if isinstance(base, ast.Name) else base.attr for base in classes[0].bases][0] == "TorchServeHandler"
