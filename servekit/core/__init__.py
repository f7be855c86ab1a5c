"""Layer 1, core: what every other layer leans on and that knows nothing of models or servers.

Errors, names, locks, lazy imports, processes, devices, timing, the user's choices, HTTP transport, requirement lines
and TorchServe's `config.properties` format. Imports nothing of servekit above it.
"""
