"""Layer 3, build: from a model to archives — training data, training, importing, serialized formats, optimization,
`.mar` archives, TorchServe configs, KServe/Docker manifests and Triton model repositories. No running server."""
