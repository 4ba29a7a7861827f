"""Which command version the whole cluster applies: the version gate.

A node that meets a log entry of a newer command version stops right before
it (`GroupState.apply`), and rightly so: newer nodes apply it, and skipping it
would leave that node with other keys for good. During a rolling upgrade (a
Kubernetes StatefulSet replaces one pod at a time) an upgraded leader must
therefore keep proposing the version every node applies, until the last one
runs the new code. So each node tells its peers, every few seconds, the newest
command version it applies, and proposers use the lowest of the
configuration's nodes (`PeerVersions.usable`).

A node that never said is taken to apply version 1 (gcks before the gate), as
is one not heard from for a while: a node rolled back to an older gcks stops
saying. Proposing an older version is always safe, since every node applies
entries of every version it knows the same way, whatever their order. So
the version is not replicated: a new leader proposes version 1 until its peers
have spoken, a second or so.

Wire: the payload of the peer channel for versions is a msgpack array
`[command_version]`. Peers are authenticated nodes; a newer or buggy one may
still send what this one cannot read, so decoding raises `DecodeError`.

May import `gcks.proto` and `gcks.cluster.commands`. No I/O, no clock: callers
pass the time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from gcks.cluster.commands import COMMAND_VERSION
from gcks.proto.codec import packb, unpackb
from gcks.proto.schema import read_int, read_record

ADVERTISE_INTERVAL_S: Final = 2.0
# Missing this many adverts in a row puts a peer back at version 1.
FORGET_AFTER_S: Final = 5 * ADVERTISE_INTERVAL_S
UNANNOUNCED_VERSION: Final = 1  # what gcks before the gate applied


def encode_advert(version: int = COMMAND_VERSION) -> bytes:
    return packb([version])


def decode_advert(data: bytes) -> int:
    """The command version a peer says it applies; raises `DecodeError`."""
    (version,) = read_record(unpackb(data, max_size=64), "VersionAdvert", 1)
    return read_int(version, "VersionAdvert.version", 1, 255)


class PeerVersions:
    """What each peer last said it applies, and when."""

    def __init__(self, node_id: str, own: int = COMMAND_VERSION) -> None:
        self._node_id = node_id
        self._own = own
        self._heard: dict[str, tuple[int, float]] = {}

    def heard(self, peer_id: str, version: int, now: float) -> None:
        self._heard[peer_id] = (version, now)

    def of(self, peer_id: str, now: float) -> int:
        if peer_id == self._node_id:
            return self._own
        version, at = self._heard.get(peer_id, (UNANNOUNCED_VERSION, now))
        return version if now - at <= FORGET_AFTER_S else UNANNOUNCED_VERSION

    def usable(self, nodes: Iterable[str], now: float) -> int:
        """The newest command version that every one of `nodes` (the voters and
        learners of the configuration) applies, and this node too."""
        return min([self._own, *(self.of(n, now) for n in nodes)])
