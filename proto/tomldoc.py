"""Configuration files as TOML documents: bounded bytes in, a parsed table out.

The node, the member and the admin tool read their TOML files the same way:
at most a size limit, UTF-8, `tomllib`. Every failure is one `TomlDocError`
whose key is `<file>` (too large, not UTF-8) or `<toml>` (syntax, nesting),
so each package re-raises it as its own `ConfigError` with the same key and
message.

May import the standard library only. Sans-IO: the caller reads the file (at
most `max_bytes + 1` bytes, so an oversized file is caught without reading it
whole); this module never touches the file system.
"""

from __future__ import annotations

import tomllib

__all__ = ["TomlDocError", "decode_toml_bytes", "parse_toml", "parse_toml_bytes"]


class TomlDocError(Exception):
    """A configuration file is not a TOML document; `key` is `<file>` or `<toml>`."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def decode_toml_bytes(data: bytes, *, name: str, max_bytes: int) -> str:
    """The text of the file `name` read as `data` (up to `max_bytes + 1` bytes)."""
    if len(data) > max_bytes:
        raise TomlDocError("<file>", f"{name} is larger than {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise TomlDocError("<file>", f"{name} is not UTF-8") from None


def parse_toml(text: str) -> dict[str, object]:
    """The TOML document `text` as a table."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TomlDocError("<toml>", str(exc)) from None
    except RecursionError:
        raise TomlDocError("<toml>", "nested too deeply") from None


def parse_toml_bytes(data: bytes, *, name: str, max_bytes: int) -> dict[str, object]:
    """`decode_toml_bytes` then `parse_toml`."""
    return parse_toml(decode_toml_bytes(data, name=name, max_bytes=max_bytes))
