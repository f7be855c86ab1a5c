"""What the code imports is what pyproject.toml installs on a fresh machine."""

from __future__ import annotations

import ast
import sys

from support import REPO

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

# Import names that differ from their distribution's name.
DISTRIBUTIONS = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
    "ts": "torchserve",
    "model_archiver": "torch-model-archiver",
    "kubernetes": "kserve",
    "triton_python_backend_utils": "nvidia-pytriton",  # Triton's Python backend, as the triton extra ships it
}
LOCAL = {
    "servekit",
    "servekit_worker",
    "servekit_handlers",
    "digits",
    "image_classifier",
    "tensor_handler",
    "text_classifier",
}


def normalized(requirement: str) -> str:
    for separator in "<>=!~[ ;":
        requirement = requirement.split(separator)[0]
    return requirement.strip().lower().replace("_", "-")


def imported_top_level_modules() -> set[str]:
    modules = set()
    for path in [
        path
        for folder in ("servekit", "servekit_worker", "handlers", "scripts")
        for path in (REPO / folder).glob("*.py")
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - LOCAL - set(sys.stdlib_module_names) - {"__future__"}


def test_every_third_party_import_is_a_declared_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {normalized(r) for r in project["dependencies"]}
    # the test extra installs what only the tests use: servekit and its scripts may not need it
    extras = {name: extra for name, extra in project["optional-dependencies"].items() if name != "test"}
    declared |= {normalized(r) for extra in extras.values() for r in extra}
    needed = {normalized(DISTRIBUTIONS.get(module, module)) for module in imported_top_level_modules()}
    assert needed - declared == set(), f"imported but not declared in pyproject.toml: {sorted(needed - declared)}"
