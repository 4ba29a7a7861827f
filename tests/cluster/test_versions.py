"""The version gate: proposers use the newest command version every node applies.

During a rolling upgrade an upgraded leader must not propose entries that the
nodes still on the previous version stop at (`GroupState.apply`).
"""

from __future__ import annotations

import msgpack
import pytest

from gcks.cluster.commands import COMMAND_VERSION
from gcks.cluster.versions import (
    FORGET_AFTER_S,
    UNANNOUNCED_VERSION,
    PeerVersions,
    decode_advert,
    encode_advert,
)
from gcks.proto.errors import DecodeError


def test_an_advert_round_trips() -> None:
    assert decode_advert(encode_advert()) == COMMAND_VERSION
    assert decode_advert(encode_advert(7)) == 7


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        msgpack.packb([]),
        msgpack.packb([2, 3]),
        msgpack.packb([0]),
        msgpack.packb([256]),
        msgpack.packb(["2"]),
        msgpack.packb([True]),
        msgpack.packb([2]) + b"\x00" * 100,
    ],
)
def test_a_malformed_advert_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_advert(payload)


def test_a_peer_that_never_said_counts_as_the_version_before_the_gate() -> None:
    versions = PeerVersions("n1", own=2)
    assert versions.usable({"n1", "n2", "n3"}, now=0.0) == UNANNOUNCED_VERSION == 1
    versions.heard("n2", 2, now=0.0)
    assert versions.usable({"n1", "n2", "n3"}, now=0.0) == 1, "n3 still on the old version"
    versions.heard("n3", 2, now=0.5)
    assert versions.usable({"n1", "n2", "n3"}, now=1.0) == 2


def test_nobody_proposes_past_its_own_version() -> None:
    versions = PeerVersions("n1", own=2)
    versions.heard("n2", 5, now=0.0)
    assert versions.usable({"n1", "n2"}, now=0.0) == 2
    assert versions.usable({"n1"}, now=0.0) == 2  # a cluster of one
    assert versions.usable(set(), now=0.0) == 2  # a node joining: no configuration yet


def test_a_peer_not_heard_from_for_a_while_counts_as_the_old_version_again() -> None:
    # A node rolled back to a gcks before the gate stops saying anything.
    versions = PeerVersions("n1", own=2)
    versions.heard("n2", 2, now=10.0)
    assert versions.usable({"n1", "n2"}, now=10.0 + FORGET_AFTER_S) == 2
    assert versions.usable({"n1", "n2"}, now=10.1 + FORGET_AFTER_S) == 1
    versions.heard("n2", 2, now=30.0)
    assert versions.usable({"n1", "n2"}, now=30.0) == 2
