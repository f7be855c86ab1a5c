"""An archive's own handler, run in this process the way a TorchServe worker runs it (minus Java and HTTP).

The bench measures serving overhead against it: same archive, same handler code, same request bodies.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml
from ts.context import Context, RequestProcessor

from servekit_worker.requests import worker_value


class InProcessHandler:
    """Unpacks a .mar into a temp folder and initialises its handler with a real `ts.context.Context`.

    `gpu_id` is what TorchServe hands a GPU worker (None: a CPU worker), so the handler runs on the device the
    served workers use. Use it as a context manager: leaving it removes the temp folder.
    """

    def __init__(self, archive: Path, batch_size: int | None = None, gpu_id: int | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="servekit-inprocess-"))
        with zipfile.ZipFile(archive) as mar:
            mar.extractall(self.folder)
        manifest = json.loads((self.folder / "MAR-INF" / "MANIFEST.json").read_text())
        config = yaml.safe_load((self.folder / "model-config.yaml").read_text()) or {}
        self.batch_size = batch_size or int(config.get("batchSize", 1))
        self.context = Context(
            manifest["model"]["modelName"],
            str(self.folder),
            manifest,
            self.batch_size,
            gpu_id,
            "servekit",
            model_yaml_config=config,
        )
        sys.path.insert(0, str(self.folder))  # handler files import each other as top-level modules
        handler_path = self.folder / manifest["model"]["handler"]
        spec = importlib.util.spec_from_file_location(f"servekit_inprocess_{handler_path.stem}", handler_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
        self.handler = classes[0]()
        self.handler.initialize(self.context)

    def __enter__(self) -> InProcessHandler:
        return self

    def __exit__(self, *exc_info) -> None:
        """Removes the unpacked archive and its place on sys.path."""
        if str(self.folder) in sys.path:
            sys.path.remove(str(self.folder))
        shutil.rmtree(self.folder, ignore_errors=True)

    def handle(self, bodies: list[tuple[bytes, str]]) -> list[Any]:
        """One batch, as TorchServe would hand it over (JSON and text decoded the way its worker decodes them)."""
        self.context.request_processor = [RequestProcessor({"body": {"content-type": ct}}) for _, ct in bodies]
        return self.handler.handle([{"body": worker_value(body, ct)} for body, ct in bodies], self.context)
