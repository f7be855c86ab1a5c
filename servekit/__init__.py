"""servekit: from a trained PyTorch model to a versioned, measured TorchServe (or Triton) deployment.

The library the CLI is built on, its main entry points importable from here (each loaded at its first use, so
`import servekit` stays as light as the commands that never touch torch). Every call on a running server takes one
`Server` handle:

    from pathlib import Path
    from servekit import (BenchPlan, ImportPlan, OptimizePlan, RolloutPolicy, Server, TritonSpec, bench,
                          build_archive, export_triton, import_model, optimize, register, rollout)

    server = Server.connect(Path(".servekit"))       # the running server `servekit serve start` recorded
    server.client.predict("digits", Path("7.png").read_bytes(), content_type="image/png")

    import_model(ImportPlan("mynet", "mynet.py:Net", [Path("x.png")], Path("model_store/work/mynet"),
                            handler="image"))                                       # servekit import
    optimize(OptimizePlan("digits", Path("model_store/work/digits"), Path("model_store/work/digits-optimized")))
    build_archive("digits", "1.1.0", Path("model_store/work/digits"), server.store)  # servekit build
    register(server, "digits", "1.0.0")                                             # servekit register
    rollout(server, "digits", "1.1.0", policy=RolloutPolicy(watch_s=30))            # servekit rollout
    bench(server, BenchPlan("digits", concurrency=[1, 16], duration_s=10, peer="flask",
                            peer_model_dir=Path("model_store/work/digits")))       # servekit bench
    export_triton(server.store, TritonSpec("digits", ["1.1.0"], Path("deploy/triton")))  # servekit export triton
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
    "Catalog": "servekit.store.catalog",
    "ServekitError": "servekit.core.errors",
    "UsageError": "servekit.core.errors",
    "ImportPlan": "servekit.build.importer",
    "import_model": "servekit.build.importer",
    "save_model": "servekit.build.importer",
    "OptimizePlan": "servekit.build.optimize",
    "optimize": "servekit.build.optimize",
    "BuildOptions": "servekit.build.archive",
    "build_archive": "servekit.build.archive",
    "TritonSpec": "servekit.build.triton",
    "export_triton": "servekit.build.triton",
    "DefaultHistory": "servekit.serve.deployments",
    "register": "servekit.serve.deployments",
    "register_verified": "servekit.serve.deployments",
    "BenchPlan": "servekit.measure.bench",
    "bench": "servekit.measure.bench",
    "RolloutPolicy": "servekit.deliver.rollout",
    "rollout": "servekit.deliver.rollout",
}
__all__ = ["__version__", *PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in PUBLIC:
        raise AttributeError(f"module 'servekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(PUBLIC[name]), name)
    globals()[name] = value
    return value
