"""Membership requests that a follower forwards to the leader's batch, on the wire.

Joins and leaves are coalesced into one `Rekey` per group and batch interval,
and the batch has to be the leader's: if every node batched the registrations
it serves, three nodes would send three rekeys per interval where the policy
promises one (and members would open, verify and apply each). So a follower
forwards each request over the peer link with a random tag, carried by its
join or leave into the leader's batch and the `Rekey` command, and the
follower answers when its own apply reaches the entry that reports the tag
(`ApplyResult.requests`). A tag, not the member id: a follower catching up
may first apply an older entry that names the same member, and that entry is
not the answer. Apply skips a tag it has already applied, so the follower
may send a request again (a new leader, a lost copy) without a second join.

Wire format: a msgpack array `[VERSION, tag, group, joins, leaves]`, joins and
leaves shaped as in a `Rekey` of the command version the cluster applies
(`gcks.cluster.versions`), so that a leader of an older version reads them.
Peers are authenticated nodes, but a newer or buggy one may still send what
this one cannot read: decoding validates every field and raises `DecodeError`.

May import `gcks.proto` and `gcks.cluster.commands`. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gcks.cluster.commands import (
    COMMAND_VERSION,
    MAX_REKEY_BATCH,
    Join,
    Leave,
    join_fields,
    leave_fields,
    read_joins,
    read_leaves,
    read_request_tag,
)
from gcks.proto.codec import packb, unpackb
from gcks.proto.errors import DecodeError
from gcks.proto.policy import GROUP_ID_PATTERN
from gcks.proto.schema import read_int, read_record, read_str

VERSION: Final = 1
MAX_REQUEST_BYTES: Final = 256 * 1024  # a full batch of joins with sender keys fits


@dataclass(frozen=True, slots=True)
class MembershipRequest:
    """Joins and leaves of `group` for the leader's next batch; `tag` names the request."""

    tag: int
    group: str
    joins: tuple[Join, ...] = ()
    leaves: tuple[Leave, ...] = ()


def encode_request(request: MembershipRequest, command_version: int) -> bytes:
    return packb(
        [
            VERSION,
            request.tag,
            request.group,
            [join_fields(join, command_version) for join in request.joins],
            [leave_fields(leave, command_version) for leave in request.leaves],
        ]
    )


def decode_request(data: bytes) -> MembershipRequest:
    """Validate and decode a forwarded request; raises `DecodeError`."""
    fields = unpackb(data, max_size=MAX_REQUEST_BYTES)
    version, tag, group, joins, leaves = read_record(fields, "MembershipRequest", 5)
    if read_int(version, "MembershipRequest.version", 0, 255) != VERSION:
        raise DecodeError("MembershipRequest.version: not supported")
    return MembershipRequest(
        tag=read_request_tag(tag, "MembershipRequest.tag"),
        group=read_str(group, "MembershipRequest.group", 64, GROUP_ID_PATTERN),
        joins=read_joins(joins, "MembershipRequest.joins", MAX_REKEY_BATCH, COMMAND_VERSION),
        leaves=read_leaves(leaves, "MembershipRequest.leaves", MAX_REKEY_BATCH, COMMAND_VERSION),
    )
