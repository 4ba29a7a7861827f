"""Majority arithmetic of one Raft configuration: commit index and vote tallies.

Pure functions over voter sets and match indexes; no state, no I/O. Learners
never reach these functions: callers pass voters only.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping

from .types import NodeId


class VoteResult(enum.Enum):
    PENDING = 0
    WON = 1
    LOST = 2


def committed_index(voters: Collection[NodeId], match: Mapping[NodeId, int]) -> int:
    """Largest index that a majority of `voters` has durably stored (0 with no voters).

    A voter missing from `match` counts as having stored nothing."""
    n = len(voters)
    if n == 0:
        return 0
    indexes = sorted((match.get(v, 0) for v in voters), reverse=True)
    return indexes[n // 2]


def vote_result(voters: Collection[NodeId], votes: Mapping[NodeId, bool]) -> VoteResult:
    """Tally of the (pre-)votes received so far; votes from non-voters are ignored."""
    granted = rejected = 0
    for v in voters:
        answer = votes.get(v)
        if answer is True:
            granted += 1
        elif answer is False:
            rejected += 1
    need = len(voters) // 2 + 1
    if granted >= need:
        return VoteResult.WON
    if len(voters) - rejected < need:
        return VoteResult.LOST
    return VoteResult.PENDING


def has_quorum(voters: Collection[NodeId], active: Collection[NodeId]) -> bool:
    """True when a majority of `voters` is in `active`."""
    return sum(1 for v in voters if v in active) >= len(voters) // 2 + 1
