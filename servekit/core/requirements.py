"""A model's pip requirements: read from a requirements file at import, recorded in the catalog with its archive,
and checked against the serving environment before it is registered. servekit keeps TorchServe's per-model pip
install off (`install_py_dep_per_model=false`): a worker must never install packages; a missing one is one line.
Light on purpose (no torch): `register` runs it.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

from servekit.core.errors import UsageError


def parse_requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped), each checked to parse."""
    from packaging.requirements import InvalidRequirement, Requirement

    if not path.is_file():
        raise UsageError(f"--requirements {path} not found")
    lines = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            raise UsageError(f"{path}:{number}: {line!r}: only requirement lines (name[extras] specifier), no options")
        try:
            Requirement(line)
        except InvalidRequirement as exc:
            raise UsageError(f"{path}:{number}: {line!r} is not a requirement: {exc}") from None
        lines.append(line)
    return lines


def unmet(requirements: list[str], python: str | None = None) -> list[str]:
    """The requirements the Python environment of `python` (default: this one, whose TorchServe servekit starts)
    does not satisfy, each with what it has: "timm>=9 (installed: 1.0.31)", "foo (not installed)"."""
    if not requirements:
        return []
    if python and Path(python).resolve() != Path(sys.executable).resolve():
        result = subprocess.run([python, "-c", CHECK, json.dumps(requirements)], capture_output=True, text=True,
                                check=False)  # fmt: skip
        if result.returncode != 0:
            raise UsageError(f"cannot check requirements with {python}: {result.stderr.strip()[-300:]}")
        return json.loads(result.stdout)
    return check(requirements)


def check(requirements: list[str]) -> list[str]:
    from packaging.requirements import Requirement

    missing = []
    for line in requirements:
        requirement = Requirement(line)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{line} (not installed)")
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            missing.append(f"{line} (installed: {version})")
    return missing


CHECK = """
import json, sys
from servekit.core.requirements import check
print(json.dumps(check(json.loads(sys.argv[1]))))
"""


def check_serving_environment(name: str, version: str, requirements: list[str], python: str | None = None) -> None:
    """Refuses to register a model whose requirements the serving environment lacks, naming them and the fix."""
    missing = unmet(requirements, python)
    if missing:
        where = python or sys.executable
        raise UsageError(
            f"{name} {version} needs {', '.join(missing)} in the serving environment ({where}): install it there "
            f"(pip install {' '.join(repr(m.split(' (')[0]) for m in missing)}); TorchServe's own per-model install "
            "stays off"
        )
