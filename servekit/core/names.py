"""The one place that says which model names and versions servekit accepts.

Names and versions become file names (`store/NAME-VERSION.mar`, `work/NAME-optimized/`) and URL path segments
(`/predictions/NAME/VERSION`), so each is checked with a full match before anything touches disk or the server:
`re.fullmatch`, never `re.match` with `$` (which also matches before a trailing newline).
"""

from __future__ import annotations

import re

from servekit.core.errors import UsageError

# What servekit builds: a letter first, then letters, digits, _ and -.
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
# Semantic versions (https://semver.org), without build metadata: TorchServe puts versions in URLs.
VERSION_PATTERN = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?")
# What the client may put in a URL path segment: any model TorchServe serves, including ones servekit did not
# build (TorchServe's own default version is "1.0"), but never a separator, whitespace or a control character.
SEGMENT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
# TorchServe 0.12 hands every management request whose URL contains "/token" to its token API: a model named
# tokens-... could be registered but never described, scaled or unregistered, and each try renews a key.
TOKEN_API_PREFIX = "token"


def check_name(name: str) -> str:
    """`name` itself when servekit may create files and archives under it, else UsageError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"model name {name!r} must start with a letter and use only letters, digits, _ and - (at most 64)"
        )
    if name.startswith(TOKEN_API_PREFIX):
        raise UsageError(
            f"model name {name!r} cannot start with {TOKEN_API_PREFIX!r}: TorchServe 0.12 answers every management "
            f"call on /models/{name} as its token API; pick another name"
        )
    return name


def check_version(version: str) -> str:
    """`version` itself when it is a semantic version like 1.0.0 or 1.1.0-rc.1, else UsageError."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version) or ".." in version:
        raise UsageError(f"version {version!r} is not a semantic version like 1.0.0 or 1.1.0-rc.1")
    return version


def check_name_version(name: str, version: str) -> None:
    check_name(name)
    check_version(version)


def check_segment(value: str, what: str = "model name") -> str:
    """`value` itself when it is safe as one URL path segment of TorchServe's APIs, else UsageError."""
    if not isinstance(value, str) or not SEGMENT_PATTERN.fullmatch(value) or ".." in value:
        raise UsageError(
            f"{what} {value!r} may hold only letters, digits, '_', '.', '+' and '-' (no '/', '..', "
            "whitespace or control characters)"
        )
    return value
