"""Validating readers for decoded msgpack (and TOML) values.

Every decoder in gcks turns untrusted, already-unpacked values into typed
fields through these readers, so that a wrong type, size or range always ends
as one `DecodeError` naming the field (`"GsaAnswer.teks[2].key"`), never as an
`IndexError`, `KeyError`, `TypeError` or a silently accepted `True` where an
integer was meant. Callers build the dotted/indexed field name; the readers
only check and convert.

May import: the standard library and `gcks.proto.errors`. Must never put a
value into an error message (it may be key material or an attacker's text):
errors name the field and the rule, at most the length or type of the value.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from gcks.proto.errors import DecodeError

__all__ = [
    "read_bool",
    "read_bytes",
    "read_enum",
    "read_int",
    "read_list",
    "read_map",
    "read_optional",
    "read_record",
    "read_str",
]

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.Enum)
_P = ParamSpec("_P")


def _type_name(value: object) -> str:
    return type(value).__name__


def read_int(value: object, name: str, lo: int, hi: int) -> int:
    """An integer in `[lo, hi]`. Booleans are rejected although Python counts
    them as integers: `True` must never pass for a message id of 1."""
    if type(value) is not int:
        raise DecodeError(f"{name}: expected an integer, got {_type_name(value)}")
    if not lo <= value <= hi:
        raise DecodeError(f"{name}: integer out of range [{lo}, {hi}]")
    return value


def read_bool(value: object, name: str) -> bool:
    """A boolean; the integers 0 and 1 are not booleans."""
    if type(value) is not bool:
        raise DecodeError(f"{name}: expected a boolean, got {_type_name(value)}")
    return value


def read_bytes(
    value: object, name: str, max_len: int, exact_len: int | None = None, *, min_len: int = 0
) -> bytes:
    """A byte string (msgpack bin) of at most `max_len` bytes, at least
    `min_len`, or exactly `exact_len` when given (key fields: 32)."""
    if type(value) is not bytes:
        raise DecodeError(f"{name}: expected bytes, got {_type_name(value)}")
    if exact_len is not None and len(value) != exact_len:
        raise DecodeError(f"{name}: expected exactly {exact_len} bytes, got {len(value)}")
    if not min_len <= len(value) <= max_len:
        raise DecodeError(f"{name}: length {len(value)} outside [{min_len}, {max_len}] bytes")
    return value


def read_str(
    value: object,
    name: str,
    max_len: int,
    pattern: re.Pattern[str] | None = None,
    *,
    min_len: int = 0,
) -> str:
    """A text string of `min_len..max_len` characters that, when `pattern` is
    given, matches it in full (`fullmatch`, so no stray suffix slips past)."""
    if type(value) is not str:
        raise DecodeError(f"{name}: expected a string, got {_type_name(value)}")
    if not min_len <= len(value) <= max_len:
        raise DecodeError(f"{name}: length {len(value)} outside [{min_len}, {max_len}] characters")
    if pattern is not None and pattern.fullmatch(value) is None:
        raise DecodeError(f"{name}: does not match {pattern.pattern!r}")
    return value


def read_list(
    value: object, name: str, max_items: int, *, min_items: int = 0
) -> tuple[object, ...]:
    """A variable-length array (list or tuple) of `min_items..max_items`
    elements, returned as a tuple; the caller reads each element."""
    if not isinstance(value, list | tuple):
        raise DecodeError(f"{name}: expected an array, got {_type_name(value)}")
    if not min_items <= len(value) <= max_items:
        raise DecodeError(f"{name}: {len(value)} items outside [{min_items}, {max_items}]")
    return tuple(value)


def read_record(value: object, name: str, length: int) -> tuple[object, ...]:
    """A fixed-shape array of exactly `length` positional fields (how records
    such as `KeySA` travel); the caller unpacks it by position."""
    if not isinstance(value, list | tuple):
        raise DecodeError(f"{name}: expected an array, got {_type_name(value)}")
    if len(value) != length:
        raise DecodeError(f"{name}: expected {length} fields, got {len(value)}")
    return tuple(value)


def read_map(value: object, name: str, max_items: int) -> dict[str, object]:
    """A map of at most `max_items` entries whose keys are all text strings."""
    if not isinstance(value, dict):
        raise DecodeError(f"{name}: expected a map, got {_type_name(value)}")
    if len(value) > max_items:
        raise DecodeError(f"{name}: {len(value)} entries, at most {max_items} allowed")
    result: dict[str, object] = {}
    for key, item in value.items():
        if type(key) is not str:
            raise DecodeError(f"{name}: map key of type {_type_name(key)}, expected a string")
        result[key] = item
    return result


def read_enum(value: object, name: str, enum_type: type[_E]) -> _E:
    """A member of `enum_type` (an IntEnum or StrEnum) given by its value.

    The value's type must equal the member value's type: `True` is not
    `Role(1)` and `1.0` is not `ErrorCode(1)`, although Python's lookup by
    equality would accept both."""
    if type(value) not in (int, str):
        raise DecodeError(f"{name}: expected an integer or string, got {_type_name(value)}")
    try:
        member = enum_type(value)
    except ValueError:
        raise DecodeError(f"{name}: not a known {enum_type.__name__}") from None
    if type(member.value) is not type(value):
        raise DecodeError(f"{name}: wrong type for {enum_type.__name__}")
    return member


def read_optional(
    value: object,
    name: str,
    reader: Callable[Concatenate[object, str, _P], _T],
    *args: _P.args,
    **kwargs: _P.kwargs,
) -> _T | None:
    """`None` (msgpack nil) or what `reader(value, name, *args, **kwargs)` reads:
    `read_optional(v, "leader_hint", read_str, 256)`."""
    if value is None:
        return None
    return reader(value, name, *args, **kwargs)
