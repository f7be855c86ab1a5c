"""servekit's TorchServe handlers: one small file per archive kind, the entry point TorchServe loads.

Each is a servekit_worker handler on TorchServe's worker API; `servekit build` packs the file with the
servekit_worker folder beside it, which TorchServe's worker imports from the unpacked archive. They must not import
`servekit`.
"""
