"""Specification of the validating readers in `gcks.proto.schema`."""

from __future__ import annotations

import enum
import re

import pytest

from gcks.proto.errors import DecodeError
from gcks.proto.schema import (
    read_bool,
    read_bytes,
    read_enum,
    read_int,
    read_list,
    read_map,
    read_optional,
    read_record,
    read_str,
)


class Colour(enum.IntEnum):
    RED = 1


class Flavour(enum.StrEnum):
    SWEET = "sweet"


def test_read_int_accepts_bounds_inclusive() -> None:
    assert read_int(0, "x", 0, 10) == 0
    assert read_int(10, "x", 0, 10) == 10


@pytest.mark.parametrize("value", [True, False, 1.0, "1", b"1", None, [1]])
def test_read_int_rejects_bool_and_non_integers(value: object) -> None:
    with pytest.raises(DecodeError, match="count: expected an integer"):
        read_int(value, "count", 0, 10)


@pytest.mark.parametrize("value", [-1, 11, 2**64])
def test_read_int_rejects_out_of_range_naming_field(value: int) -> None:
    with pytest.raises(DecodeError, match=r"^msg\.count: integer out of range"):
        read_int(value, "msg.count", 0, 10)


@pytest.mark.parametrize("value", [0, 1, "true", None])
def test_read_bool_rejects_integers_and_strings(value: object) -> None:
    with pytest.raises(DecodeError, match="flag"):
        read_bool(
            value,
            "flag",
        )


def test_read_bool_accepts_booleans() -> None:
    assert read_bool(True, "flag") is True
    assert read_bool(False, "flag") is False


def test_read_bytes_enforces_exact_length_without_echoing_content() -> None:
    secret = b"\xaa" * 31
    with pytest.raises(DecodeError, match=r"key: expected exactly 32 bytes, got 31") as info:
        read_bytes(secret, "key", 32, 32)
    assert "aa" not in str(info.value).replace("bytes", "")
    assert read_bytes(b"\x00" * 32, "key", 32, 32) == b"\x00" * 32


@pytest.mark.parametrize("value", [bytearray(b"x"), "x", memoryview(b"x"), None])
def test_read_bytes_rejects_non_bytes(value: object) -> None:
    with pytest.raises(DecodeError, match="blob: expected bytes"):
        read_bytes(value, "blob", 10)


def test_read_bytes_enforces_min_and_max_length() -> None:
    with pytest.raises(DecodeError):
        read_bytes(b"", "blob", 10, min_len=1)
    with pytest.raises(DecodeError):
        read_bytes(b"x" * 11, "blob", 10)


def test_read_str_requires_full_pattern_match() -> None:
    pattern = re.compile(r"[a-z]+")
    assert read_str("abc", "name", 8, pattern) == "abc"
    with pytest.raises(DecodeError, match="name: does not match"):
        read_str("abc\n", "name", 8, pattern)
    with pytest.raises(DecodeError, match="name: length"):
        read_str("", "name", 8, min_len=1)
    with pytest.raises(DecodeError, match="name: length"):
        read_str("x" * 9, "name", 8)
    with pytest.raises(DecodeError, match="expected a string"):
        read_str(b"abc", "name", 8)


def test_read_list_and_record_check_counts() -> None:
    assert read_list([1, 2], "items", 2) == (1, 2)
    assert read_list((1,), "items", 2) == (1,)
    with pytest.raises(DecodeError, match="items: 3 items"):
        read_list([1, 2, 3], "items", 2)
    with pytest.raises(DecodeError, match="items: 0 items"):
        read_list([], "items", 2, min_items=1)
    with pytest.raises(DecodeError, match="expected an array"):
        read_list({"a": 1}, "items", 2)
    assert read_record([1, "a"], "rec", 2) == (1, "a")
    with pytest.raises(DecodeError, match="rec: expected 2 fields, got 1"):
        read_record([1], "rec", 2)


def test_read_map_requires_string_keys_and_bounds_size() -> None:
    assert read_map({"a": 1}, "m", 1) == {"a": 1}
    with pytest.raises(DecodeError, match="m: map key of type bytes"):
        read_map({b"a": 1}, "m", 1)
    with pytest.raises(DecodeError, match="m: 2 entries"):
        read_map({"a": 1, "b": 2}, "m", 1)
    with pytest.raises(DecodeError, match="expected a map"):
        read_map([("a", 1)], "m", 1)


def test_read_enum_requires_exact_value_type() -> None:
    assert read_enum(1, "c", Colour) is Colour.RED
    assert read_enum("sweet", "f", Flavour) is Flavour.SWEET
    for bad in (True, 1.0, "1", 2, None):
        with pytest.raises(DecodeError, match="c: "):
            read_enum(bad, "c", Colour)
    with pytest.raises(DecodeError, match="f: "):
        read_enum(1, "f", Flavour)


def test_read_optional_passes_none_and_delegates_otherwise() -> None:
    assert read_optional(None, "hint", read_str, 8) is None
    assert read_optional("n1", "hint", read_str, 8) == "n1"
    with pytest.raises(DecodeError, match="hint: length"):
        read_optional("x" * 9, "hint", read_str, 8)
