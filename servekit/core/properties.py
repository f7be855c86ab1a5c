"""TorchServe's `config.properties`: Java properties read and written, and the settings TorchServe 0.12 gets wrong.

Both the archives' and configs' writers (build) and the server's starter (serve) need these, so they live below both.
"""

from __future__ import annotations

import re
from pathlib import Path

from servekit.core.errors import UsageError

ARCHIVE_FILE_PATTERN = r"(?!.*\.\.)[A-Za-z][A-Za-z0-9_-]*-[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?\.mar"


# java.util.Properties' one-letter escapes; any other escaped character stands for itself (`\\:` is `:`).
PROPERTY_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f"}


def read_properties(path: Path) -> dict[str, str]:
    """Java-style `key=value` lines (`#` and `!` start comments; `\\:`, `\\n` and `\\uXXXX` escapes, as in
    snapshots)."""
    if not path.is_file():
        raise UsageError(f"TorchServe config {path} not found")
    properties = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#!" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        properties[key.strip()] = unescape_property(value.strip())
    return properties


def unescape_property(value: str) -> str:
    def one(match: re.Match) -> str:
        escaped = match[1]
        return chr(int(escaped[1:], 16)) if len(escaped) == 5 else PROPERTY_ESCAPES.get(escaped, escaped)

    # \uXXXX are UTF-16 code units: a character beyond U+FFFF comes as two, joined here
    units = re.sub(r"\\(u[0-9A-Fa-f]{4}|.)", one, value)
    return units.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")


def property_line(key: str, value: str) -> str:
    """`key=value` as java.util.Properties reads it back: it drops a lone backslash (`\\.` is written `\\\\.`) and
    reads bytes as Latin-1 (anything beyond ASCII is written `\\uXXXX`)."""
    escapes = {"\\": "\\\\", **{char: f"\\{letter}" for letter, char in PROPERTY_ESCAPES.items()}}

    def one(char: str) -> str:
        if char in escapes:
            return escapes[char]
        if char.isascii():
            return char
        units = char.encode("utf-16-be")
        return "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))

    return f"{key}=" + "".join(one(char) for char in value)


def write_properties(properties: dict[str, str], path: Path) -> None:
    lines = ["# Written by servekit serve start; edit the base config.properties instead."]
    lines += [property_line(key, value) for key, value in properties.items()]
    path.write_text("\n".join(lines) + "\n")


def store_archives_only(model_store: str) -> str:
    """TorchServe's `allowed_urls` for a server that loads nothing but its own store's archives.

    TorchServe 0.12 fetches any `file://` or `http(s)://` URL it is given to register (its default allows them all)
    and saves the answer in the model store; a URL this pattern does not match is refused before anything is
    fetched. The pattern matches only file URLs of servekit archive names (NAME-VERSION.mar) directly in
    `model_store` (case-sensitive, no `%`, `/` or `..` after the store). A bare file name, which is how servekit
    registers, is no URL: TorchServe reads it from the store and refuses one with `..`.
    In the store path, every ASCII character but letters, digits, `/`, `_` and `-` is written `\\xHH` (Java's and
    Python's regexes read that alike; TorchServe splits the setting at commas, so a comma must not appear as one).
    """
    store = "".join(c if c.isalnum() or c in "/_-" or not c.isascii() else f"\\x{ord(c):02X}" for c in model_store)
    return f"(?-i:file://{store.rstrip('/')}/{ARCHIVE_FILE_PATTERN})"


def check_max_batch_delay(milliseconds: int) -> None:
    """TorchServe 0.12 reads maxBatchDelay 0 as unset and waits its own default, 100 ms, for every batch."""
    if milliseconds < 1:
        raise UsageError(
            f"max batch delay {milliseconds} ms: TorchServe treats 0 as unset and then waits 100 ms for every "
            "batch; use 1 ms, the smallest window it honours"
        )
