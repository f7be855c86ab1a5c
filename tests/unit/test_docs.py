"""The documentation a user reads: a README short enough for ten minutes, a CLI reference that is the CLI's own
`--help`, and no relative link in the README or docs/ that points at nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 250

FENCED_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK_TARGET = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(page: Path) -> list[str]:
    """The targets of the page's Markdown links and images that are paths (no URL, no anchor of the page itself);
    code, fenced or inline, is not prose and holds no links."""
    prose = INLINE_CODE.sub("", FENCED_BLOCK.sub("", page.read_text()))
    targets = (match.group(1) for match in LINK_TARGET.finditer(prose))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.IGNORECASE) and not t.startswith("#")]


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def test_the_cli_reference_is_the_clis_own_help():
    # A fresh process: the script fixes the machine's core count before servekit.cli is imported (a default names it).
    generated = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "cli_reference.py"), "--stdout"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=REPO,
    ).stdout
    assert (DOCS / "cli.md").read_text() == generated, "docs/cli.md is stale: run `python scripts/cli_reference.py`"


def test_the_cli_reference_has_every_command():
    reference = (DOCS / "cli.md").read_text()
    for path in (
        "servekit",
        "servekit train digits",
        "servekit serve start",
        "servekit export kserve",
        "servekit import",
    ):
        assert f"\n## {path}\n" in reference
        assert f"Usage: {path} " in reference


def test_the_readme_reads_in_ten_minutes():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move a topic to docs/ (at most {MAX_README_LINES})"


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_points_at_a_file_that_exists(page):
    missing = [target for target in relative_links(page) if not (page.parent / target.split("#", 1)[0]).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to files that do not exist: {missing}"


def test_the_link_check_sees_links_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        '[a](a.md) [b](sub/b.md#part "title") [web](https://example.com) [anchor](#here) ![img](i.png)\n'
        "`[not](code.md)`\n```\n[nor](fenced.md)\n```\n"
    )
    assert relative_links(page) == ["a.md", "sub/b.md#part", "i.png"]


def test_the_architecture_page_names_every_module_of_every_layer_and_no_other():
    architecture = (DOCS / "architecture.md").read_text()
    modules = {
        f"{path.parent.name}/{path.stem}"
        for path in (REPO / "servekit").glob("*/*.py")
        if path.stem not in ("__init__", "__main__")
    }
    named = set(re.findall(r"`((?:cli|deliver|measure|serve|build|store|core)/[a-z_]+)`", architecture))
    assert modules - named == set(), f"docs/architecture.md does not say what these modules own: {modules - named}"
    assert named - modules == set(), f"docs/architecture.md names modules that do not exist: {named - modules}"
    rows = re.findall(r"^\| `([a-z]+)` \|", architecture, re.M)
    contract = re.search(r"^layers = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.M | re.S)[1]
    assert [f"servekit.{layer}" for layer in rows] == re.findall(r'"([a-z.]+)"', contract), "not the contract's layers"


def test_the_architecture_page_names_every_worker_module():
    architecture = (DOCS / "architecture.md").read_text()
    modules = sorted(p.stem for p in (REPO / "servekit_worker").glob("*.py") if p.stem != "__init__")
    unnamed = [m for m in modules if f"`{m}`" not in architecture]
    assert not unnamed, f"docs/architecture.md does not say what these servekit_worker modules own: {unnamed}"
