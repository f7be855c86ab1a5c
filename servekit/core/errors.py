"""The exceptions servekit raises; each message says what went wrong and how to fix it."""


class ServekitError(Exception):
    """Base class: the CLI prints these as one line and exits 1."""


class UsageError(ServekitError):
    """Bad arguments or input files (exit code 2)."""


class ArchiveError(ServekitError):
    """Building, storing or verifying a .mar failed."""


class ServerError(ServekitError):
    """Starting, stopping or reaching TorchServe failed."""


class ApiError(ServekitError):
    """TorchServe answered an API call with an error status."""

    def __init__(self, status: int, message: str, url: str = ""):
        self.status = status
        self.message = message
        self.url = url
        where = f" ({url})" if url else ""
        super().__init__(f"TorchServe answered {status}: {message}{where}")
