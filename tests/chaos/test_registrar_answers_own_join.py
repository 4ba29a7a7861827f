"""Found by the chaos harness (seed 101, 3 nodes): a node catching up after a
partition answered a registration with a GSA built at an OLD log entry - an
earlier registration of the same member, applied while the new request was
waiting - although the new request's own join was skipped (the member had
been evicted in between). The member was told "registered", with keys older
than those it already held (message 63 after 69).

Rule: a registration is answered with the GSA of its own batch's commit, or
refused when that batch did not join the member. Proved against the
registrar with a scripted rekeyer and a real group state machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from gcks.cluster.commands import CreateGroup, Join, Leave, LeaveReason, Rekey, encode_command
from gcks.cluster.registrar import Registrar, RegistrarSettings, _MemberLink
from gcks.cluster.state import ApplyResult, GroupState
from gcks.proto.messages import ErrorAnswer, ErrorCode, GsaAnswer, RegisterRequest
from gcks.proto.policy import Authorization, GroupPolicy, MulticastEndpoint, Role

T0 = 1_700_000_000_000


def seed(n: int) -> bytes:
    return n.to_bytes(32, "big")


def demo_policy() -> GroupPolicy:
    return GroupPolicy(
        group_id="demo",
        multicast=MulticastEndpoint.parse("239.1.1.1", 5000),
        authorize=(Authorization("*", frozenset({Role.RECEIVER})),),
        activation_delay_ms=0,
    )


def rekey(index: int, *, joins: tuple[Join, ...] = (), leaves: tuple[Leave, ...] = ()) -> bytes:
    return encode_command(
        Rekey("demo", joins, leaves, seed(100 + index), seed(200 + index), False, T0 + index, "")
    )


@dataclass
class Driver:
    state: GroupState


class ScriptedRekeyer:
    """While the registration waits, the node applies the log it is catching up
    on: an old entry that joined the member, then the member's eviction, then
    the request's own batch, whose join the state machine skips (banned)."""

    def __init__(self, registrar: Registrar, state: GroupState) -> None:
        self.registrar = registrar
        self.state = state

    def apply(self, index: int, data: bytes) -> ApplyResult:
        result = self.state.apply(index, data)
        self.registrar.on_apply(result)
        return result

    async def join(
        self, group: str, member_id: str, role: Role, sender_key: bytes | None
    ) -> ApplyResult:
        self.apply(3, rekey(3, joins=(Join(member_id, role),)))  # an earlier registration
        self.apply(4, rekey(4, leaves=(Leave(member_id, LeaveReason.EVICT),)))
        return self.apply(5, rekey(5, joins=(Join(member_id, role),)))  # this request's


def state_with_member() -> GroupState:
    state = GroupState()
    state.apply(1, encode_command(CreateGroup(demo_policy(), seed(1), seed(2), seed(3), T0)))
    state.apply(2, rekey(2, joins=(Join("m1", Role.RECEIVER),)))
    return state


async def test_registration_whose_own_join_was_skipped_is_refused_not_answered_stale() -> None:
    state = state_with_member()
    registrar = Registrar(
        cast(Any, Driver(state)), cast(Any, None), (), cast(Any, None), RegistrarSettings()
    )
    registrar._rekeyer = cast(Any, ScriptedRekeyer(registrar, state))
    link = _MemberLink("m2", cast(Any, None))
    answer = await registrar._register(link, RegisterRequest("demo", Role.RECEIVER, 3, 7, None))
    assert state.is_banned("demo", "m2")
    assert isinstance(answer, ErrorAnswer), f"answered with a GSA at message {answer.msg_id}"
    assert answer.code is ErrorCode.UNAUTHORIZED


async def test_registration_is_answered_with_the_gsa_of_its_own_commit() -> None:
    state = state_with_member()
    registrar = Registrar(
        cast(Any, Driver(state)), cast(Any, None), (), cast(Any, None), RegistrarSettings()
    )

    class Rejoin(ScriptedRekeyer):
        async def join(
            self, group: str, member_id: str, role: Role, sender_key: bytes | None
        ) -> ApplyResult:
            self.apply(3, rekey(3, joins=(Join(member_id, role),)))  # an earlier registration
            self.apply(4, rekey(4))  # a forced rekey: message ids move on
            return self.apply(5, rekey(5, joins=(Join(member_id, role),)))

    registrar._rekeyer = cast(Any, Rejoin(registrar, state))
    answer = await registrar._register(
        _MemberLink("m2", cast(Any, None)), RegisterRequest("demo", Role.RECEIVER, 3, 7, None)
    )
    assert isinstance(answer, GsaAnswer)
    assert answer.msg_id == state.msg_id("demo")
