"""servekit: from a trained PyTorch model to a versioned, measured TorchServe (or Triton) deployment.

The library the CLI is built on, its main entry points importable from here (each loaded at its first use, so
`import servekit` stays as light as the commands that never touch torch):

    from servekit import DefaultHistory, Server, build_archive, register_verified, rollout  # rollout: the module
    server = Server.connect(Path(".servekit"))             # the running server `servekit serve start` recorded
    server.client.predict("digits", Path("7.png").read_bytes(), content_type="image/png")

    build_archive("digits", "1.1.0", Path("model_store/work/digits"), Path("model_store"))   # servekit build
    register_verified(server.client, server.store, "digits", "1.1.0")                        # servekit register
    rollout.rollout(server.client, server.store, "digits", "1.1.0", DefaultHistory(server.workdir))  # rollout
    import_model(ImportPlan("mynet", "mynet.py:Net", [Path("x.png")], Path("model_store/work/mynet"),
                            handler="image"))                                                  # servekit import
    save_model("mynet", module, [Path("x.png")], Path("model_store/work/mynet"), handler="image")
    export_triton(Path("model_store"), TritonSpec("digits", ["1.1.0"], Path("deploy/triton")))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
PUBLIC = {
    "ServeClient": "servekit.serve.client",
    "FailoverClient": "servekit.serve.client",
    "Server": "servekit.serve.handle",
    "Workspace": "servekit.store.workspace",
    "ServekitError": "servekit.core.errors",
    "UsageError": "servekit.core.errors",
    "BuildOptions": "servekit.build.archive",
    "build_archive": "servekit.build.archive",
    "Catalog": "servekit.store.catalog",
    "DefaultHistory": "servekit.serve.deployments",
    "register_verified": "servekit.serve.deployments",
    "RolloutPolicy": "servekit.deliver.rollout",
    "ImportPlan": "servekit.build.importer",
    "import_model": "servekit.build.importer",
    "save_model": "servekit.build.importer",
    "TritonSpec": "servekit.build.triton",
    "export_triton": "servekit.build.triton",
}
__all__ = ["__version__", *PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in PUBLIC:
        raise AttributeError(f"module 'servekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(PUBLIC[name]), name)
    globals()[name] = value
    return value
