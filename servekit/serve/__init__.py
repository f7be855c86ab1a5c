"""Layer 4, serve: a running server — the TorchServe client, its protocols, starting and stopping TorchServe, Triton
and the proxy, the `Server` handle, deployments (the versions a server has), metrics and status."""
