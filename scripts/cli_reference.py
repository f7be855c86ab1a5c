"""Write docs/cli.md, the CLI reference: every servekit command and subcommand with its full `--help`, from click.

Rerun it after changing a command or an option (tests/unit/test_docs.py fails while docs/cli.md is stale):

    .venv/bin/python scripts/cli_reference.py            # writes docs/cli.md
    .venv/bin/python scripts/cli_reference.py --stdout   # prints it instead
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import click

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "cli.md"
WIDTH = 100  # a fixed terminal width: the page is the same whoever's terminal generates it
# `build --workers` says its default, one worker per core; the page shows it as on a 2-core machine, so it does not
# change with the machine that writes it.
REFERENCE_CORES = 2

PREAMBLE = """\
# CLI reference

Generated from the code by `scripts/cli_reference.py`: do not edit this page, rerun
`.venv/bin/python scripts/cli_reference.py` after changing a command. Defaults that depend on the machine are shown as
on a {cores}-core machine (`build --workers`: one worker per core, up to 4).

Every command has `--help` (or `-h`). Errors print one red line: exit 2 for bad arguments, 1 for failures. Where the
commands fit together: the [README](../README.md) and the topic pages in this folder.
"""


def load_cli() -> click.Group:
    """`servekit.cli.cli`, imported with the machine's cores fixed at REFERENCE_CORES."""
    from servekit.build import archive

    if "servekit.cli" in sys.modules:
        raise RuntimeError("servekit.cli is already imported; run this script in a fresh process")
    with mock.patch.object(archive, "available_cores", return_value=REFERENCE_CORES):
        from servekit.cli import cli
    return cli


def commands(command: click.Command, ctx: click.Context) -> list[tuple[str, click.Command, click.Context]]:
    """(path, command, context) for the command and, in a group, each subcommand, depth first, in `--help` order."""
    found = [(ctx.command_path, command, ctx)]
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                found += commands(sub, context(sub, name, ctx))
    return found


def context(command: click.Command, name: str, parent: click.Context | None = None) -> click.Context:
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    return click.Context(command, info_name=name, parent=parent, **settings)


def render(cli: click.Group) -> str:
    """The whole page: an index of the commands, then each one's `--help` text."""
    found = commands(cli, context(cli, "servekit"))
    index = "\n".join(f"- [`{path}`](#{path.replace(' ', '-')})" for path, _, _ in found)
    sections = [f"## {path}\n\n```text\n{command.get_help(ctx).rstrip()}\n```\n" for path, command, ctx in found]
    return "\n".join([PREAMBLE.format(cores=REFERENCE_CORES), index + "\n", *sections])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdout", action="store_true", help="print the page instead of writing docs/cli.md")
    page = render(load_cli())
    if parser.parse_args().stdout:
        sys.stdout.write(page)
    else:
        REFERENCE.write_text(page)
        print(f"wrote {REFERENCE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
