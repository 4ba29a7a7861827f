"""The wire format of membership requests a follower forwards to the leader."""

from __future__ import annotations

import msgpack
import pytest

from gcks.cluster.commands import MAX_REKEY_BATCH, Join, Leave, LeaveReason
from gcks.cluster.membership import (
    VERSION,
    MembershipRequest,
    decode_request,
    encode_request,
)
from gcks.proto.errors import DecodeError
from gcks.proto.policy import Role


def test_a_request_round_trips() -> None:
    request = MembershipRequest(
        2**63 - 1,
        "demo",
        joins=(Join("m1", Role.SENDER, b"k" * 32, requested_ms=5), Join("m2", Role.RECEIVER)),
        leaves=(Leave("m3", LeaveReason.EVICT, requested_ms=6),),
    )
    assert decode_request(encode_request(request, 2)) == request


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ([VERSION + 1, 1, "demo", [], []], r"version"),
        ([VERSION, 1, "demo", []], r"expected 5 fields"),
        ([VERSION, 0, "demo", [], []], r"MembershipRequest\.tag"),
        ([VERSION, 2**63, "demo", [], []], r"MembershipRequest\.tag"),
        ([VERSION, 1, "bad group!", [], []], r"MembershipRequest\.group"),
        ([VERSION, 1, "demo", [["m1", "king", None]], []], r"joins\[0\]\.role"),
        ([VERSION, 1, "demo", [["m1", "sender", b"short"]], []], r"joins\[0\]\.sender_key"),
        (
            [VERSION, 1, "demo", [["m1", "receiver", None, 1, -1]], []],
            r"joins\[0\]\.requested_ms",
        ),
        ([VERSION, 1, "demo", [], [["m1", "vanish"]]], r"leaves\[0\]\.reason"),
        ([VERSION, 1, "demo", [["m1", "receiver", None]] * (MAX_REKEY_BATCH + 1), []], r"items"),
    ],
)
def test_a_malformed_request_is_one_decode_error_naming_the_field(
    fields: list[object], error: str
) -> None:
    with pytest.raises(DecodeError, match=error):
        decode_request(msgpack.packb(fields))


def test_garbage_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_request(b"\xc1 not msgpack")
