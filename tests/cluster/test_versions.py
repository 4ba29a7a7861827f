"""The version gate: proposers use the newest command version every node applies.

During a rolling upgrade an upgraded leader must not propose entries that the
nodes still on the previous version stop at (`GroupState.apply`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
import trio

from gcks.cluster.commands import COMMAND_VERSION
from gcks.cluster.config import load_config
from gcks.cluster.node import Node
from gcks.cluster.raft.types import ConfState
from gcks.cluster.state import GroupState
from gcks.cluster.versions import (
    FORGET_AFTER_S,
    UNANNOUNCED_VERSION,
    PeerVersions,
    decode_advert,
    encode_advert,
)
from gcks.proto.errors import DecodeError
from tests.cluster.clusterkit import make_kit


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


async def test_a_node_proposes_in_what_its_voters_and_learners_apply_never_below_its_log(
    tmp_path: Path,
) -> None:
    kit = make_kit(tmp_path)
    node = Node(load_config(kit.config("n1")))
    state = GroupState()
    conf = ConfState(voters=frozenset({"n1", "n2"}), learners=frozenset({"n3"}))
    node.driver = SimpleNamespace(status=SimpleNamespace(conf=conf), state=state)  # type: ignore[assignment]
    now = trio.current_time()
    node.versions.heard("n2", 2, now)
    assert node.command_version() == 1, "the learner n3 has not said"
    node.versions.heard("n3", 2, now)
    assert node.command_version() == 2
    node.versions = PeerVersions("n1")  # n2 and n3 quiet for a while: a restart, say
    assert node.command_version() == 1
    state.newest_version = 2  # but an entry of version 2 is applied: old nodes stop there
    assert node.command_version() == 2


async def test_a_node_records_adverts_and_drops_what_it_cannot_read_a_line_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A newer peer may send, every few seconds, what this node cannot read.
    node = Node(load_config(make_kit(tmp_path).config("n1")))
    send, receive = trio.open_memory_channel[tuple[str, bytes]](16)
    for payload in (
        b"\x02" + encode_advert(2),
        b"\x02junk",
        b"\x02junk",
        b"\x07a frame of a later kind",
        b"\x07another",
        b"",
    ):
        send.send_nowait(("n2", payload))
    send.close()
    with caplog.at_level(logging.WARNING, logger="gcks.cluster.node"):
        await node._pump(SimpleNamespace(incoming=receive), None, None)  # type: ignore[arg-type]
    assert node.versions.of("n2", trio.current_time()) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("malformed version advert from n2" in w for w in warnings) == 1
    assert sum("unknown kind 07 from n2" in w for w in warnings) == 1
    assert sum("unknown kind (empty) from n2" in w for w in warnings) == 1
    assert len(warnings) == 3
