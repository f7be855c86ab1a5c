"""`Server`: the one handle on a running TorchServe that every library call on a server takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from servekit.serve.client import ServeClient
from servekit.serve.torchserve import ServerState

if TYPE_CHECKING:
    from servekit.serve.deployments import DefaultHistory


@dataclass
class Server:
    """One running TorchServe as servekit recorded it: state, an authorized client, its model store."""

    state: ServerState
    client: ServeClient

    @classmethod
    def connect(cls, workdir: Path) -> Server:
        state = ServerState.load(Path(workdir).resolve())
        return cls(state, ServeClient(state.endpoints()))

    @property
    def store(self) -> Path:
        return Path(self.state.model_store)

    @property
    def workdir(self) -> Path:
        return Path(self.state.workdir)

    @property
    def history(self) -> DefaultHistory:
        """The defaults this server had, newest last (what `rollback` goes back through)."""
        from servekit.serve.deployments import DefaultHistory

        return DefaultHistory(self.workdir)
