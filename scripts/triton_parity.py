"""TorchServe and Triton on the same archives, file by file: each held-out sample sent as the same v2 document to
TorchServe's KServe v2 route and to Triton (exported with `servekit export triton`), both on loopback ports of
this machine, both stopped at the end. Prints one row per model: accuracy on each, answers that differ, the largest
probability difference.

    .venv/bin/python scripts/triton_parity.py --store model_store digits image text
"""

from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from servekit.build.triton import TritonSpec, export_triton
from servekit.core.transport import Retries, Session
from servekit.serve import torchserve
from servekit.serve.client import ServeClient
from servekit.serve.deployments import register_verified
from servekit.serve.protocols import v2_body
from servekit.serve.triton import start_triton, stop_triton
from servekit.store.catalog import Catalog
from servekit.store.heldout import read_held_out
from servekit.store.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent


def answers(url: str, headers: dict, samples) -> list[tuple[str, list[float]]]:
    """(label, probabilities) per sample, each sent alone as a v2 document of one instance, 4 at a time."""

    session = Session(Retries())  # no retries: every answer counts

    def ask(sample):
        body, content_type = v2_body(sample.path.read_bytes(), sample.content_type)
        reply = session.request("POST", url, data=body, headers={**headers, "Content-Type": content_type}, timeout=120)
        if reply.status_code != 200:
            raise RuntimeError(f"{url} answered {sample.path.name} with {reply.status_code}: {reply.content[:300]}")
        outputs = {o["name"]: o["data"] for o in json.loads(reply.content)["outputs"]}
        return outputs["label"][0], outputs["probabilities"]

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(ask, samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+")
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    args = parser.parse_args()
    catalog, work = Catalog.load(args.store), tempfile.mkdtemp(prefix="servekit-parity-")
    versions = {name: max(catalog.models[name], key=lambda v: tuple(map(int, v.split(".")))) for name in args.names}
    repository = Path(work) / "repository"
    for name, version in versions.items():
        export_triton(args.store, TritonSpec(name, [version], repository))
    ports = {api: torchserve.free_port() for api in torchserve.DEFAULT_PORTS}
    settings = torchserve.ServerSettings(REPO / "config.properties", args.store, Path(work) / "torchserve", ports=ports)
    state = torchserve.start(settings)
    triton_dir = Path(work) / "triton"
    try:
        client = ServeClient(state.endpoints())
        for name, version in versions.items():
            register_verified(client, args.store, name, version, workers=1)
        triton = start_triton(
            repository, triton_dir, {api: torchserve.free_port() for api in ("http", "grpc", "metrics")}
        )
        columns = ["model", "version", "samples", "TorchServe correct", "Triton correct", "answers that differ",
                   "max abs prob diff"]  # fmt: skip
        print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
        for name, version in versions.items():
            samples = read_held_out(Workspace(args.store).held_out(name))
            served = answers(f"{client.endpoints.inference_url}/v2/models/{name}/infer",
                             client.auth_headers("inference"), samples)  # fmt: skip
            other = answers(f"{triton.url}/v2/models/{name}/infer", {}, samples)
            differ = sum(a[0] != b[0] for a, b in zip(served, other, strict=True))
            diff = max(abs(x - y) for a, b in zip(served, other, strict=True) for x, y in zip(a[1], b[1], strict=True))
            correct = [
                sum(label == s.label for (label, _), s in zip(run, samples, strict=True)) for run in (served, other)
            ]
            print(f"| {name} | {version} | {len(samples)} | {correct[0]} | {correct[1]} | {differ} | {diff:.2g} |")
        print(json.dumps({"torchserve": state.inference_url, "triton": triton.url}))
    finally:
        stop_triton(triton_dir)
        torchserve.stop(Path(work) / "torchserve")


if __name__ == "__main__":
    main()
