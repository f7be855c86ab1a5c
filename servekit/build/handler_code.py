"""Which handler a model runs on: one of servekit's, or a user's subclass of servekit's base in a file of their own;
and any of them run in this process on request bodies, the way the worker decodes them (no model needed).

A user's handler file holds a subclass of `servekit_worker.base.ServekitHandler` (or `ClassifierHandler`) that
overrides what differs: decoding one request, encoding one answer. `servekit build` packs the file beside the worker
package and writes the runtime's entry point for it (`entry_source`), so the same class serves on TorchServe and
runs here, in `servekit import` and `optimize`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from servekit.core.errors import UsageError

if TYPE_CHECKING:
    import torch

    from servekit_worker.base import ServekitHandler

# servekit's handlers: the name `build --handler` takes -> the worker class (the runtime-neutral core).
WORKER_CLASSES = {
    "digits": "servekit_worker.digits:DigitsHandler",
    "image": "servekit_worker.image_classifier:ImageClassifierHandler",
    "tensor": "servekit_worker.tensor_handler:TensorHandler",
    "text": "servekit_worker.text_classifier:TextClassifierHandler",
}
RESERVED_MODULES = ("servekit", "servekit_worker", "servekit_handlers", "handler", "model_code")


@dataclass(frozen=True)
class HandlerChoice:
    """servekit's handler `name`, or a user's handler: `file` and the class in it (`class_name`)."""

    name: str
    file: Path | None = None
    class_name: str = ""

    @property
    def custom(self) -> bool:
        return self.file is not None

    def describe(self) -> str:
        return f"{self.file.name}:{self.class_name}" if self.file is not None else self.name


def parse_handler(text: str, base: Path | None = None) -> HandlerChoice:
    """`digits|image|tensor|text`, or `path/handler.py[:Class]` (relative to `base` when given and not absolute)."""
    if text in WORKER_CLASSES:
        return HandlerChoice(text)
    file_text, _, class_name = text.partition(".py:") if ".py:" in text else (text, "", "")
    file = Path(file_text + ".py" if class_name else file_text)
    if file.suffix != ".py":
        raise UsageError(
            f"unknown handler {text!r}: use one of {', '.join(WORKER_CLASSES)} or a file, path/handler.py[:Class]"
        )
    if base is not None and not file.is_absolute():
        file = base / file
    if not file.is_file():
        raise UsageError(f"handler file {file} not found")
    if file.stem in RESERVED_MODULES or file.stem in WORKER_CLASSES or file.stem.startswith("servekit"):
        raise UsageError(f"handler file {file.name}: rename it, {file.stem!r} is a module name servekit uses")
    cls = handler_class(HandlerChoice("custom", file.resolve(), class_name))
    return HandlerChoice("custom", file.resolve(), cls.__name__)


def handler_class(choice: HandlerChoice) -> type[ServekitHandler]:
    """The handler class: servekit's worker class, or the user's class in its file (the one ServekitHandler subclass
    the file defines, when no class is named)."""
    from servekit_worker.base import ServekitHandler

    if not choice.custom:
        module_name, _, class_name = WORKER_CLASSES[choice.name].partition(":")
        return getattr(importlib.import_module(module_name), class_name)
    module = load_file_module(choice.file)
    defined = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    if choice.class_name:
        found = [c for c in defined if c.__name__ == choice.class_name]
        if not found:
            raise UsageError(f"{choice.file} defines no class {choice.class_name!r} (it defines: "
                             f"{', '.join(c.__name__ for c in defined) or 'none'})")  # fmt: skip
        cls = found[0]
    else:
        handlers = [c for c in defined if issubclass(c, ServekitHandler)]
        if len(handlers) != 1:
            raise UsageError(
                f"{choice.file} defines {len(handlers)} ServekitHandler subclasses "
                f"({', '.join(c.__name__ for c in handlers) or 'none'}): name one as {choice.file.name}:Class"
            )
        cls = handlers[0]
    if not issubclass(cls, ServekitHandler):
        raise UsageError(
            f"{choice.file.name}:{cls.__name__} is not a servekit handler: subclass "
            "servekit_worker.base.ServekitHandler or ClassifierHandler"
        )
    return cls


def load_file_module(file: Path):
    """A user's Python file as a module of its own name (its folder on sys.path while it imports, for its helpers);
    an error while importing is one line that quotes it."""
    name = f"servekit_user_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    folder = str(file.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(f"{file} failed to import: {type(exc).__name__}: {first_line(exc)}") from None
    finally:
        sys.path.remove(folder)
    return module


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def entry_source(choice: HandlerChoice) -> str:
    """TorchServe's entry file for a user's handler: TorchServe's worker API on the user's class (one class, as
    TorchServe's loader requires). A class that already is a TorchServeHandler is taken as it is."""
    from servekit_worker.torchserve import TorchServeHandler

    user = handler_class(choice)
    bases = "Handler" if issubclass(user, TorchServeHandler) else "TorchServeHandler, Handler"
    return (
        f'"""TorchServe\'s entry point for {choice.describe()} (written by servekit build)."""\n\n'
        "from servekit_worker.torchserve import TorchServeHandler  # noqa: F401\n"
        f"from {choice.file.stem} import {choice.class_name} as Handler\n\n\n"
        f"class {choice.class_name}OnTorchServe({bases}):\n"
        f'    """{choice.class_name} on TorchServe."""\n'
    )


class Decoder:
    """A handler ready to decode request bodies in this process as its worker decodes them, without a model: its
    settings read, placed on the CPU, `setup()` run in `folder` (labels, vocabulary, transforms)."""

    def __init__(self, choice: HandlerChoice, settings: dict, folder: Path):
        from servekit_worker.base import Worker

        self.choice = choice
        self.handler = handler_class(choice)()
        self.handler.read_settings(Worker(model_dir=folder, weights=folder, settings=settings))
        self.handler.place(None)
        try:
            self.handler.setup()
        except Exception as exc:
            raise UsageError(f"the {choice.describe()} handler cannot start: {type(exc).__name__}: "
                             f"{first_line(exc)}") from None  # fmt: skip

    def samples(self, body: bytes, content_type: str, what: str) -> list:
        """One request body's samples, as the handler decodes them; a body it refuses is a UsageError."""
        from servekit_worker.errors import RequestError
        from servekit_worker.requests import PLAIN, Request, worker_value

        try:
            decoded = PLAIN.decode(self.handler, Request(worker_value(body, content_type), content_type, PLAIN))
            [finished] = self.handler.finish_decoding([decoded])
        except RequestError as exc:
            raise UsageError(f"the {self.choice.describe()} handler refuses {what}: {exc.detail}") from None
        if isinstance(finished, RequestError):
            raise UsageError(f"the {self.choice.describe()} handler refuses {what}: {finished.detail}")
        return finished.samples

    def batch(self, samples: list) -> torch.Tensor:
        """The model input the handler makes of these samples (one forward pass's batch)."""
        return self.handler.collate(samples)

    @property
    def classifier(self) -> bool:
        from servekit_worker.base import ClassifierHandler

        return isinstance(self.handler, ClassifierHandler)
