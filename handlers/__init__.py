"""servekit's TorchServe handlers.

These files are copied flat into `.mar` archives and run inside TorchServe workers, where they import each
other as top-level modules (`from servekit_base import ...`). They must not import `servekit`.
"""
