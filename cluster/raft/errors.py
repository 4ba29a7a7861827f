"""Errors of the Raft core (`gcks.cluster.raft`).

Two kinds, as in h11: `RaftError` subclasses are raised to the *local* caller
of the core (a proposal that cannot be accepted here, a misuse of the API);
`RaftCodecError` means a *remote* peer sent bytes that are not a valid Raft
message, and is a `gcks.proto.errors.DecodeError` so the transport handles it
like every other undecodable frame. May import only `gcks.proto.errors`.
Messages never carry entry data or snapshot bytes (they can hold keys).
"""

from __future__ import annotations

from gcks.proto.errors import DecodeError

from .types import NodeId


class RaftError(Exception):
    """Base of the errors the Raft core raises to its local caller."""


class NotLeader(RaftError):
    """This node cannot take the request now; retry on `leader_hint` (None: no leader known yet)."""

    def __init__(self, leader_hint: NodeId | None) -> None:
        hint = (
            "no leader known; retry after an election timeout"
            if leader_hint is None
            else (f"retry on {leader_hint!r}")
        )
        super().__init__(f"not the leader: {hint}")
        self.leader_hint = leader_hint


class ProposalDropped(RaftError):
    """The proposal was refused (e.g. a membership change is already pending); retry later."""


class TransferRefused(RaftError):
    """A leadership transfer target is not a voter of the current configuration."""


class RaftUsageError(RaftError):
    """The driver broke the core's calling contract (a bug in the caller, not in a peer)."""


class RaftCodecError(DecodeError):
    """Bytes from a peer are not a valid Raft message or membership change; drop the frame."""
