"""Configuration bytes to a TOML table: one typed error naming `<file>` or `<toml>`."""

from __future__ import annotations

import pytest

from gcks.proto.tomldoc import TomlDocError, parse_toml_bytes


def test_a_valid_document_parses_to_a_table() -> None:
    assert parse_toml_bytes(b'a = 1\n[t]\nb = "x"\n', name="f.toml", max_bytes=64) == {
        "a": 1,
        "t": {"b": "x"},
    }


@pytest.mark.parametrize(
    ("data", "key", "message"),
    [
        (b"a = 1\n" * 20, "<file>", "f.toml is larger than 64 bytes"),
        (b"a = '\xff'\n", "<file>", "f.toml is not UTF-8"),
        (b"a = = 1\n", "<toml>", "Invalid value (at line 1, column 5)"),
        (b"a = " + b"[" * 5000 + b"]" * 5000, "<toml>", "nested too deeply"),
    ],
)
def test_every_bad_file_is_one_typed_error_naming_file_or_toml(
    data: bytes, key: str, message: str
) -> None:
    with pytest.raises(TomlDocError) as caught:
        parse_toml_bytes(data, name="f.toml", max_bytes=64 if key == "<file>" else 1 << 20)
    assert (caught.value.key, caught.value.message) == (key, message)
