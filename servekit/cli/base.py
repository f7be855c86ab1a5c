"""What every command shares: the consoles, one-line errors, the option bundles, parameter types, the `cli` group."""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path
from typing import Any

import click

from servekit import __version__
from servekit.build.archive import HANDLERS, BuildOptions
from servekit.core.choices import GENERATORS
from servekit.core.errors import ServekitError, UsageError
from servekit.deliver.rollout import RolloutPolicy
from servekit.serve.client import Endpoints, FailoverClient, ServeClient
from servekit.serve.handle import Server
from servekit.store.workspace import DEFAULT_STORE, DEFAULT_WORKDIR, Workspace


class DeferredConsole:
    """rich's Console, made at its first use: importing rich costs ~60 ms that `--help` and `--json` never need."""

    def __init__(self, stderr: bool = False):
        self.stderr = stderr

    @functools.cached_property
    def rich(self):
        """A terminal's width on a terminal; piped into a file or a CI log (and no COLUMNS set), lines and tables at
        their full width, never cut to rich's default of 80 columns."""
        import os
        import sys

        from rich.console import Console

        stream = sys.stderr if self.stderr else sys.stdout
        piped = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
        return Console(stderr=self.stderr, width=PIPED_WIDTH if piped else None)

    def print(self, *objects: Any, **settings: Any) -> None:
        self.rich.print(*objects, **settings)


PIPED_WIDTH = 10_000  # "no limit": rich lays a table out at its natural width within this
console = DeferredConsole()
errors = DeferredConsole(stderr=True)
DEFAULTS = Workspace()
BUILD_DEFAULTS = BuildOptions()
ROLLOUT_DEFAULTS = RolloutPolicy()


def os_error_line(exc: OSError) -> str:
    """One line for a file-system error a command did not expect (a file where a folder belongs, or the
    reverse; a missing permission; a full disk)."""
    where = f"{exc.filename}: " if exc.filename else ""
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        hint = " (a file stands where a folder is needed: move it or choose another path)"
    elif isinstance(exc, IsADirectoryError):
        hint = " (a folder stands where a file is needed: move it or choose another path)"
    else:
        hint = ""
    return f"{where}{exc.strerror or exc}{hint}"


class ServekitGroup(click.Group):
    """Prints a ServekitError (exit 2 for usage errors, else 1) or an unexpected file-system error (exit 1) as one
    red line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ServekitError as exc:
            self.fail(ctx, str(exc), 2 if isinstance(exc, UsageError) else 1)
        except OSError as exc:
            self.fail(ctx, os_error_line(exc), 1)

    @staticmethod
    def fail(ctx: click.Context, message: str, code: int) -> None:
        from rich.markup import escape

        # escaped: a path or version the user typed may hold "[...]", which rich would read as markup
        errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, emoji=False)
        ctx.exit(code)


@click.group(cls=ServekitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="servekit")
def cli() -> None:
    """servekit: train, archive, serve and query PyTorch models on TorchServe."""


# Parameter types: what the user types, parsed once; a bad value is click's usage error (exit 2) ---------------------
class Seconds(click.ParamType):
    """A duration in seconds, `20` or `20s`: positive, or 0 too where `allow_zero`."""

    name = "seconds"

    def __init__(self, allow_zero: bool = False):
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            try:
                seconds = float(str(value).strip().removesuffix("s"))
            except ValueError:
                self.fail(f"{value!r} is not seconds like 20 or 20s", param, ctx)
        if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not self.allow_zero):
            self.fail("the duration must be " + ("0 or more" if self.allow_zero else "positive"), param, ctx)
        return seconds


class IntList(click.ParamType):
    """A comma list of integers, each at least `minimum`, `what` each one is in the error (e.g. 1,4,16)."""

    name = "list"

    def __init__(self, minimum: int | None = None, what: str = "integers", allow_empty: bool = True):
        self.minimum, self.what, self.allow_empty = minimum, what, allow_empty

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int]:
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            numbers = [int(part) for part in str(value).split(",") if part.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma list of {self.what}", param, ctx)
        if not numbers and not self.allow_empty:
            self.fail(f"give at least one of the {self.what}", param, ctx)
        if self.minimum is not None and numbers and min(numbers) < self.minimum:
            self.fail(f"{value!r}: each of the {self.what} must be >= {self.minimum}", param, ctx)
        return numbers


class AutoOrCount(click.ParamType):
    """`auto`, or a whole number >= 0."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | int:
        if value == "auto" or isinstance(value, int):
            return value
        if not str(value).isdigit():
            self.fail(f"{value!r} must be a number or auto", param, ctx)
        return int(value)


class Names(click.ParamType):
    """A comma list of names (e.g. digits,image), blanks dropped."""

    name = "names"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[str]:
        return (
            list(value) if isinstance(value, (list, tuple)) else [n.strip() for n in str(value).split(",") if n.strip()]
        )


class JsonObject(click.ParamType):
    """A JSON object (e.g. constructor arguments: '{"num_classes": 10}')."""

    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict:
        if isinstance(value, dict):
            return value
        try:
            loaded = json.loads(value)
        except ValueError as exc:
            self.fail(f"is not JSON: {exc}", param, ctx)
        if not isinstance(loaded, dict):
            self.fail("is a JSON object of constructor arguments, e.g. '{\"num_classes\": 10}'", param, ctx)
        return loaded


SECONDS = Seconds()
SECONDS_OR_ZERO = Seconds(allow_zero=True)
LEVELS = IntList(minimum=1, what="concurrency levels", allow_empty=False)


# Option bundles ----------------------------------------------------------------------------------------------------
def path_option(*declarations: str, **settings):
    """An option that takes a path (None unless `default` is given)."""
    return click.option(*declarations, type=click.Path(path_type=Path), **{"default": None, **settings})


store_option = path_option("--store", default=DEFAULT_STORE, show_default=True, help="Archives and catalog.json.")
workdir_option = path_option("--workdir", default=DEFAULT_WORKDIR, show_default=True,
                             help="The server's working folder (logs, key_file.json, server.json).")  # fmt: skip
generator_option = click.option("--generator", type=click.Choice(GENERATORS), default="auto", show_default=True,
                                help="wrk (C; when installed, closed loop) or servekit's aiohttp one.")  # fmt: skip


class ServerOf:
    """The server of a workdir, connected at its first use, so a command checks its own arguments first and a
    usage error is reported as one even where no server runs. Reads like the `Server` it stands for."""

    def __init__(self, workdir: Path):
        self.workdir_given = workdir

    @functools.cached_property
    def connected(self) -> Server:
        return Server.connect(self.workdir_given)

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_"):  # a probe of private names (copy, pickle, a frame walk) does not connect
            raise AttributeError(attribute)
        return getattr(self.connected, attribute)


def with_server(function):
    """--workdir, turned into a `server` handle (state, client, store), connected when the command first uses it."""

    @workdir_option
    @functools.wraps(function)
    def wrapper(*args, workdir: Path, **kwargs):
        return function(*args, server=ServerOf(workdir), **kwargs)

    return wrapper


def json_option(function):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(function)


def version_option(required: bool = True, help_text: str = "Semantic version, e.g. 1.0.0."):
    return click.option("--version", "version", required=required, default=None, help=help_text)


def source_option(what: str = "Trained model folder"):
    return path_option("--from", "source_dir", help=f"{what} [default: STORE/work/NAME].")


# Output ------------------------------------------------------------------------------------------------------------
def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def print_table(headers: list[str], rows: list[list], title: str | None = None) -> None:
    from rich.table import Table

    table = Table(*headers, title=title)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


@contextlib.contextmanager
def progress_line(description: str):
    """A transient progress line; yields a callback that shows what is being worked on."""
    from rich.progress import Progress

    with Progress(console=console.rich, transient=True) as progress:
        task = progress.add_task(description, total=None)
        yield lambda text: progress.update(task, description=str(text))


# Arguments that name things ---------------------------------------------------------------------------------------
def handler_for(name: str, handler: str | None) -> str:
    handler = handler or name
    if handler not in HANDLERS:
        raise UsageError(f"no handler named {handler!r}: pass --handler ({', '.join(sorted(HANDLERS))})")
    return handler


def checked_url(url: str) -> str:
    """`url` without a trailing slash, once it is an http(s) address with a host and a valid port."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port out of range, a broken IPv6 address
        valid = False
    if not valid:
        raise UsageError(f"--url {url!r} is not an inference address like http://127.0.0.1:8080")
    return url.rstrip("/")


def failover_client(urls: tuple[str, ...], key_files: tuple[Path, ...]) -> FailoverClient:
    if len(key_files) != len(urls):
        raise UsageError(f"{len(urls)} --url but {len(key_files)} --key-file: give one key_file.json per server")
    urls = tuple(checked_url(url) for url in urls)
    return FailoverClient([ServeClient(Endpoints(url, "", "", key)) for url, key in zip(urls, key_files, strict=True)])
