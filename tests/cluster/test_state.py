"""The replicated group state machine, with members following its rekeys.

Each test drives `GroupState` by committed commands, as Raft would, hands every
sealed datagram to members built from `GroupKeys`, and checks the rules of
DESIGN.md: identical bytes on every node, agreement, forward and backward
secrecy, forward access control, termination, no forged rekeys.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import gcks.cluster.state as state_module
from gcks.cluster.commands import (
    COMMAND_VERSION,
    MAX_REKEY_BATCH,
    CreateGroup,
    DeleteGroup,
    Join,
    Leave,
    LeaveReason,
    Rekey,
    RestoreState,
    UpdatePolicy,
    decode_command,
    encode_command,
)
from gcks.cluster.state import (
    DEDUPE_LIMIT,
    ApplyResult,
    GroupState,
    Outbound,
    StateError,
    UpgradeRequired,
)
from gcks.member.group import GroupKeys, Outcome
from gcks.proto.data import HEADER
from gcks.proto.errors import (
    BadSignature,
    DecodeError,
    DecryptError,
    KeyExpired,
    ProtocolError,
    UnknownSPI,
)
from gcks.proto.messages import MAX_TEKS, RekeyBody, decode_message
from gcks.proto.policy import Authorization, GroupPolicy, MulticastEndpoint, Role
from gcks.proto.rekey import open_rekey, parse_rekey_header, seal_rekey

T0 = 1_700_000_000_000


def policy(**overrides: object) -> GroupPolicy:
    fields: dict[str, object] = {
        "group_id": "demo",
        "multicast": MulticastEndpoint.parse("239.1.1.1", 5000),
        "authorize": (Authorization("*", frozenset({Role.SENDER, Role.RECEIVER})),),
        "activation_delay_ms": 0,
    }
    fields.update(overrides)
    return GroupPolicy(**fields)  # type: ignore[arg-type]


def seed(n: int) -> bytes:
    return n.to_bytes(32, "big")


class Cluster:
    """Several nodes' state machines fed the same log, and the members."""

    def __init__(self, nodes: int = 2, **policy_overrides: object) -> None:
        self.nodes = [GroupState() for _ in range(nodes)]
        self.index = 0
        self.now = T0
        self.members: dict[str, GroupKeys] = {}
        self.sent: list[Outbound] = []
        self.commit(
            CreateGroup(
                policy=policy(**policy_overrides),
                signing_seed=seed(1),
                tree_seed=seed(2),
                tek_key=seed(3),
                now_ms=self.now,
            )
        )

    def commit(self, command: object) -> list[Outbound]:
        data = encode_command(command)  # type: ignore[arg-type]
        self.index += 1
        results = [node.apply(self.index, data) for node in self.nodes]
        first = results[0]
        for other in results[1:]:
            assert other == first, "nodes disagree on the outcome of one command"
        self.sent.extend(first.outbound)
        return list(first.outbound)

    @property
    def state(self) -> GroupState:
        return self.nodes[0]

    def rekey(
        self,
        joins: Iterable[Join] = (),
        leaves: Iterable[Leave] = (),
        *,
        tek: bool = True,
        refresh_kek: bool = False,
        stamped: int | None = None,
        version: int = COMMAND_VERSION,
    ) -> list[Outbound]:
        """Commit a rekey a second later, or `stamped` at that time (as a batch
        stamped earlier and committed now); members' clocks read `self.now`."""
        self.now += 1000
        return self.commit(
            Rekey(
                group="demo",
                joins=tuple(joins),
                leaves=tuple(leaves),
                tree_seed=os.urandom(32),
                tek_key=os.urandom(32) if tek else None,
                refresh_kek=refresh_kek,
                now_ms=self.now if stamped is None else stamped,
                reason="test",
                version=version,
            )
        )

    def join(self, member_id: str, role: Role = Role.RECEIVER) -> GroupKeys:
        out = self.rekey([Join(member_id, role)])
        self.deliver(out)
        keys = GroupKeys(self.state.gsa("demo", member_id, request_id=1, nodes=()), now_ms=self.now)
        self.members[member_id] = keys
        return keys

    def deliver(
        self, out: Iterable[Outbound], to: Iterable[str] | None = None
    ) -> dict[str, list[Outcome]]:
        outcomes: dict[str, list[Outcome]] = {}
        for item in out:
            for mid in list(self.members) if to is None else to:
                result = self.members[mid].handle_rekey(item.datagram, self.now)
                outcomes.setdefault(mid, []).append(result.outcome)
        return outcomes


def test_command_encoding_round_trips() -> None:
    command = Rekey(
        group="demo",
        joins=(
            Join("m1", Role.SENDER, b"k" * 32, tag=5, requested_ms=T0 - 5),
            Join("m2", Role.RECEIVER),
        ),
        leaves=(Leave("m3", LeaveReason.EVICT, tag=2**63 - 1),),
        tree_seed=b"S" * 32,
        tek_key=b"T" * 32,
        refresh_kek=True,
        now_ms=T0,
        reason="r",
    )
    assert decode_command(encode_command(command)) == command
    assert "SSSS" not in repr(command)
    assert "TTTT" not in repr(command)


def _apply_everywhere(cluster: Cluster, command: object) -> ApplyResult:
    """Apply `command` on every node of `cluster`; the (identical) result."""
    data = encode_command(command)  # type: ignore[arg-type]
    cluster.index += 1
    result, *others = [node.apply(cluster.index, data) for node in cluster.nodes]
    assert all(other == result for other in others)
    return result


def _tagged_rekey(cluster: Cluster, joins: tuple[Join, ...], group: str = "demo") -> Rekey:
    cluster.now += 1000
    return Rekey(group, joins, (), os.urandom(32), None, False, cluster.now, "test")


def test_a_result_reports_the_request_tags_of_its_command_applied_or_not() -> None:
    # A node that forwarded a request to the leader finds its outcome by these
    # tags, so a join that apply skipped (the member is banned) must report its.
    cluster = Cluster()
    cluster.join("m1")
    cluster.rekey(leaves=[Leave("m1", LeaveReason.EVICT)])
    joins = (Join("m1", Role.RECEIVER, tag=11), Join("m2", Role.RECEIVER, tag=22))
    result = _apply_everywhere(cluster, _tagged_rekey(cluster, joins))
    assert result.joined == (("demo", "m2"),)
    assert result.requests == (11, 22)
    result = _apply_everywhere(cluster, _tagged_rekey(cluster, joins[:1], group="other"))
    assert result.rejected is not None
    assert result.requests == (11,)


def test_a_request_that_commits_twice_changes_nothing_the_second_time() -> None:
    # A follower sends a request again to a new leader when it has not seen
    # it applied; both copies may commit. A sender's second join would move
    # its sender id after its answer went out.
    cluster = Cluster()
    first = _apply_everywhere(
        cluster, _tagged_rekey(cluster, (Join("s1", Role.SENDER, tag=7), Join("m1", Role.RECEIVER)))
    )
    assert first.requests == (7,)
    record = next(m for m in cluster.state.members("demo") if m.member_id == "s1")
    msg_id = cluster.state.msg_id("demo")
    again = _apply_everywhere(cluster, _tagged_rekey(cluster, (Join("s1", Role.SENDER, tag=7),)))
    assert again.requests == (7,)
    assert again.joined == (("demo", "s1"),), "answered like a re-registration"
    assert again.outbound == ()
    assert cluster.state.msg_id("demo") == msg_id
    assert next(m for m in cluster.state.members("demo") if m.member_id == "s1") == record
    # The memory of applied tags survives a snapshot, as every node must agree.
    restored = GroupState.restore(cluster.state.snapshot())
    restored.applied_index = cluster.index
    assert (
        restored.apply(
            cluster.index + 1,
            encode_command(_tagged_rekey(cluster, (Join("s1", Role.SENDER, tag=7),))),
        ).outbound
        == ()
    )


def test_a_rekey_logged_before_request_tags_existed_still_decodes() -> None:
    # Joins of 3 fields and leaves of 2 are in logs of the previous version.
    old = msgpack.packb(
        [
            1,
            4,
            "demo",
            [["m1", "receiver", None]],
            [["m2", "evict"]],
            b"S" * 32,
            None,
            False,
            T0,
            "r",
        ]
    )
    command = decode_command(old)
    assert isinstance(command, Rekey)
    assert command.version == 1
    assert command.joins == (Join("m1", Role.RECEIVER),)
    assert command.leaves == (Leave("m2", LeaveReason.EVICT),)


def test_nodes_applying_the_same_log_seal_byte_identical_rekeys() -> None:
    cluster = Cluster(nodes=3)
    for i in range(5):
        cluster.rekey([Join(f"m{i}", Role.RECEIVER)])
    cluster.rekey(leaves=[Leave("m2", LeaveReason.EVICT)])
    # Cluster.commit asserted every node returned equal results, datagrams included.
    assert len(cluster.sent) >= 7
    assert [o.msg_id for o in cluster.sent] == list(range(1, len(cluster.sent) + 1))


def test_members_following_every_rekey_agree_with_the_nodes_on_keys() -> None:
    cluster = Cluster()
    for i in range(6):
        cluster.join(f"m{i}")
    cluster.deliver(cluster.rekey(leaves=[Leave("m3", LeaveReason.DEREGISTER)]))
    del cluster.members["m3"]
    cluster.deliver(cluster.rekey(refresh_kek=True))
    state = cluster.state
    for mid, keys in cluster.members.items():
        assert keys.msg_id == state.msg_id("demo")
        assert keys.kek == state.kek("demo")
        assert keys.teks == state.gsa("demo", mid, request_id=0, nodes=()).teks


def test_evicted_member_cannot_read_data_sent_after_its_eviction_rekey() -> None:
    cluster = Cluster()
    sender = cluster.join("s", Role.SENDER)
    evicted = cluster.join("bad")
    cluster.join("good")
    out = cluster.rekey(leaves=[Leave("bad", LeaveReason.EVICT)])
    # Forward access control: the KEK-changing message carries no TEK, the TEK
    # comes second, under the new KEK.
    assert len(out) == 2
    outcomes = cluster.deliver(out)
    assert outcomes["good"] == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert outcomes["s"] == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert Outcome.ACCEPTED not in outcomes["bad"]
    packet = sender.protect(b"after eviction", cluster.now)
    assert cluster.members["good"].unprotect(packet, cluster.now)[1] == b"after eviction"
    with pytest.raises(UnknownSPI):
        evicted.unprotect(packet, cluster.now)
    # The evicted identity stays out: a new Join of it changes nothing.
    before = cluster.state.msg_id("demo")
    cluster.rekey([Join("bad", Role.RECEIVER)], tek=False)
    assert not cluster.state.is_member("demo", "bad")
    assert cluster.state.msg_id("demo") == before


def test_first_message_after_an_eviction_reveals_nothing_new_to_the_evicted() -> None:
    cluster = Cluster()
    cluster.join("a")
    cluster.join("b")
    old_kek = cluster.state.kek("demo")
    first, _second = cluster.rekey(leaves=[Leave("b", LeaveReason.EVICT)])
    body = RekeyBody.decode(
        open_rekey(
            first.datagram,
            group="demo",
            keks={old_kek.spi: old_kek},
            verify_key=Ed25519PrivateKey.from_private_bytes(seed(1)).public_key(),
            last_msg_id=0,
        ).body
    )
    assert body.teks == ()
    assert body.kek is not None
    assert not hasattr(body.kek, "key")  # the new KEK only travels wrapped


def test_new_member_cannot_read_data_sent_before_its_join_rekey() -> None:
    cluster = Cluster()
    sender = cluster.join("s", Role.SENDER)
    old_tek = sender.sending_tek(cluster.now)
    before = sender.protect(b"before join", cluster.now)
    late = cluster.join("late")
    assert old_tek is not None
    assert all(tek.key != old_tek.key for tek in late.teks)
    with pytest.raises((UnknownSPI, KeyExpired)):
        late.unprotect(before, cluster.now)


def test_member_who_knows_the_kek_cannot_forge_a_rekey() -> None:
    cluster = Cluster()
    victim = cluster.join("v")
    cluster.join("attacker")
    kek = cluster.state.kek("demo")
    forged = seal_rekey(
        group="demo",
        kek=kek,
        msg_id=victim.msg_id + 1,
        body=RekeyBody(reason="forged").encode(),
        signer=Ed25519PrivateKey.generate(),
    )
    with pytest.raises(BadSignature):
        victim.handle_rekey(forged, cluster.now)


@pytest.mark.parametrize("new_kek", [False, True])
def test_a_message_past_a_gap_is_ahead_and_applies_once_the_gap_is_filled(new_kek: bool) -> None:
    # With a new KEK in the missing message, the next one is under a KEK the
    # member does not have yet: still ahead, not a key it cannot follow.
    cluster = Cluster()
    cluster.join("a")
    lagging = cluster.join("b")
    missed = cluster.rekey(refresh_kek=new_kek)
    cluster.deliver(missed, to=["a"])
    nxt = cluster.rekey()
    assert (parse_rekey_header(nxt[0].datagram).kek_spi != lagging.kek.spi) is new_kek
    result = lagging.handle_rekey(nxt[0].datagram, cluster.now)
    assert result.outcome is Outcome.AHEAD, "held or resynced by the caller, never guessed"
    assert result.msg_id == nxt[0].msg_id
    assert lagging.msg_id == missed[0].msg_id - 1, "nothing applied out of order"
    # The late message, then the one held: both apply, in order.
    assert lagging.handle_rekey(missed[0].datagram, cluster.now).outcome is Outcome.ACCEPTED
    assert lagging.handle_rekey(nxt[0].datagram, cluster.now).outcome is Outcome.ACCEPTED
    assert lagging.msg_id == nxt[0].msg_id
    cluster.deliver(nxt, to=["a"])
    steady = cluster.members["a"]  # missed nothing
    assert (lagging.kek.key, lagging.teks[-1]) == (steady.kek.key, steady.teks[-1])


def test_copies_from_other_nodes_are_duplicates_without_crypto() -> None:
    cluster = Cluster()
    member = cluster.join("a")
    out = cluster.rekey()
    assert member.handle_rekey(out[0].datagram, cluster.now).outcome is Outcome.ACCEPTED
    # A copy with a broken signature is still just a duplicate: dropped by id alone.
    tampered = out[0].datagram[:-1] + bytes([out[0].datagram[-1] ^ 1])
    assert member.handle_rekey(tampered, cluster.now).outcome is Outcome.DUPLICATE


def test_receiver_rejoin_is_idempotent_and_sender_rejoin_gets_a_fresh_sender_id() -> None:
    cluster = Cluster()
    cluster.join("r")
    sender = cluster.join("s", Role.SENDER)
    msg = cluster.state.msg_id("demo")
    assert cluster.rekey([Join("r", Role.RECEIVER)], tek=False) == []
    assert cluster.state.msg_id("demo") == msg
    cluster.rekey([Join("s", Role.SENDER)], tek=False)
    again = cluster.state.gsa("demo", "s", request_id=2, nodes=())
    assert again.sender_id is not None
    assert again.sender_id != sender.sender_id


@pytest.mark.parametrize("activation_delay_ms", [0, 3000])
def test_a_sender_that_registers_again_gets_the_current_tek_and_can_send(
    activation_delay_ms: int,
) -> None:
    # A resync or failover: the same identity and role, a batch that changes no
    # membership (so no TEK is made), a fresh sender id.
    cluster = Cluster(activation_delay_ms=activation_delay_ms)
    receiver = cluster.join("r")
    cluster.join("s", Role.SENDER)
    cluster.deliver(cluster.rekey())  # a TEK rotation while it is a member
    cluster.now += 5000  # the rotation's TEK is active now, past any activation delay
    current = cluster.state.teks("demo")
    before = cluster.state.gsa("demo", "s", request_id=1, nodes=()).teks
    assert before, "the TEK made while it was a member"
    cluster.deliver(cluster.rekey([Join("s", Role.SENDER)]))
    assert cluster.state.teks("demo") == current, "a moot batch makes no TEK"
    again = cluster.state.gsa("demo", "s", request_id=2, nodes=())
    assert again.teks == before
    sender = GroupKeys(again, now_ms=cluster.now)
    sent, payload = sender.protect(b"after the resync", cluster.now), b"after the resync"
    assert receiver.unprotect(sent, cluster.now) == (again.sender_id, payload)


def test_a_version_2_re_registration_still_applies_as_it_did() -> None:
    # Nodes replay old entries: their outcome must not change with the code.
    cluster = Cluster()
    cluster.join("s", Role.SENDER)
    cluster.rekey([Join("s", Role.SENDER)], version=2)
    assert cluster.state.gsa("demo", "s", request_id=2, nodes=()).teks == ()


def test_a_sender_never_goes_back_to_a_tek_when_the_wall_clock_steps_back() -> None:
    cluster = Cluster(activation_delay_ms=3000)
    receiver = cluster.join("r")
    sender = cluster.join("s", Role.SENDER)
    cluster.deliver(cluster.rekey())  # T2, active 3 s after T1
    t1, t2 = sorted(sender.teks, key=lambda t: t.activation_ms)[-2:]
    sender.protect(b"under T1", t1.activation_ms)
    sender.protect(b"under T2", t2.activation_ms)  # switched to T2
    stepped_back = t2.activation_ms - 1  # NTP steps the clock back: T1 is "the active one"
    out = cluster.rekey(tek=False, refresh_kek=True)
    result = sender.handle_rekey(out[0].datagram, stepped_back)
    assert result.outcome is Outcome.ACCEPTED
    packet = sender.protect(b"still T2", stepped_back)
    assert receiver.unprotect(packet, t2.activation_ms)[1] == b"still T2"
    assert HEADER.unpack_from(packet)[2] == t2.spi  # version, flags, SPI, ...


def test_a_member_takes_a_rekey_retiring_a_tek_it_was_never_given() -> None:
    # The GSA of a version 2 re-registration (a node not yet upgraded) holds no
    # TEK; the next rotation retires the one the member lacks and brings a new one.
    cluster = Cluster()
    cluster.join("s", Role.SENDER)
    cluster.rekey([Join("s", Role.SENDER)], version=2)
    keys = GroupKeys(cluster.state.gsa("demo", "s", request_id=2, nodes=()), now_ms=cluster.now)
    cluster.members["s"] = keys
    assert keys.teks == ()
    assert cluster.state.teks("demo"), "each live TEK is retired by the next rotation"
    assert cluster.deliver(cluster.rekey()) == {"s": [Outcome.ACCEPTED]}
    assert keys.sending_tek(cluster.now) == cluster.state.teks("demo")[-1]


def test_sender_ids_are_never_reused_within_a_group() -> None:
    cluster = Cluster()
    ids = []
    for i in range(4):
        cluster.join(f"s{i}", Role.SENDER)
        ids.append(cluster.state.gsa("demo", f"s{i}", request_id=0, nodes=()).sender_id)
        cluster.rekey(leaves=[Leave(f"s{i}", LeaveReason.DEREGISTER)])
    assert len(set(ids)) == 4


def test_deleting_a_group_sends_a_signed_termination_that_drops_all_keys() -> None:
    cluster = Cluster()
    member = cluster.join("a")
    out = cluster.commit(DeleteGroup("demo", cluster.now, "decommissioned"))
    assert out[0].terminate
    result = member.handle_rekey(out[0].datagram, cluster.now)
    assert result.outcome is Outcome.TERMINATED
    assert member.teks == ()
    assert not cluster.state.has_group("demo")


def test_policy_update_reaches_members() -> None:
    cluster = Cluster()
    member = cluster.join("a")
    cluster.deliver(cluster.commit(UpdatePolicy(policy(retransmit_count=5), cluster.now)))
    assert member.policy.retransmit_count == 5


def test_snapshot_restore_then_same_commands_give_identical_bytes() -> None:
    cluster = Cluster()
    for i in range(4):
        cluster.join(f"m{i}", Role.SENDER if i % 2 else Role.RECEIVER)
    cluster.rekey(leaves=[Leave("m1", LeaveReason.EVICT)])
    restored = GroupState.restore(cluster.state.snapshot())
    assert restored.snapshot() == cluster.state.snapshot()
    cluster.nodes.append(restored)
    cluster.rekey([Join("m9", Role.SENDER)])  # commit() asserts all three agree
    cluster.rekey(leaves=[Leave("m0", LeaveReason.DEREGISTER)])


def test_corrupt_snapshot_is_a_typed_error() -> None:
    with pytest.raises(StateError):
        GroupState.restore(b"\x93\x01\x02")


def test_old_tek_accepted_until_deactivation_then_rejected() -> None:
    cluster = Cluster(deactivation_delay_ms=5000)
    sender = cluster.join("s", Role.SENDER)
    receiver = cluster.join("r")
    old_packet = sender.protect(b"in flight", cluster.now)
    cluster.deliver(cluster.rekey(tek=True))
    assert receiver.unprotect(old_packet, cluster.now + 4000)[1] == b"in flight"
    replay = sender.protect(b"x", cluster.now)  # already under the new TEK
    assert receiver.unprotect(replay, cluster.now)[1] == b"x"
    with pytest.raises(ProtocolError):
        receiver.unprotect(old_packet, cluster.now + 6000)


@settings(max_examples=25)
@given(
    st.lists(
        st.tuples(st.sampled_from(["join", "leave", "evict", "tek", "kek"]), st.integers(0, 7)),
        min_size=1,
        max_size=12,
    )
)
def test_random_membership_histories_keep_members_and_nodes_in_agreement(
    ops: list[tuple[str, int]],
) -> None:
    cluster = Cluster()
    gone: set[str] = set()
    for op, n in ops:
        mid = f"m{n}"
        if op == "join" and mid not in cluster.members and mid not in gone:
            cluster.join(mid, Role.SENDER if n % 2 else Role.RECEIVER)
        elif op in ("leave", "evict") and mid in cluster.members:
            reason = LeaveReason.EVICT if op == "evict" else LeaveReason.DEREGISTER
            out = cluster.rekey(leaves=[Leave(mid, reason)])
            departed = cluster.members.pop(mid)
            cluster.deliver(out)
            for item in out:
                try:
                    outcome = departed.handle_rekey(item.datagram, cluster.now).outcome
                except DecryptError:
                    continue
                assert outcome is not Outcome.ACCEPTED
            if op == "evict":
                gone.add(mid)
        elif op == "tek":
            cluster.deliver(cluster.rekey())
        elif op == "kek":
            cluster.deliver(cluster.rekey(tek=False, refresh_kek=True))
    for keys in cluster.members.values():
        assert keys.kek == cluster.state.kek("demo")
        assert keys.msg_id == cluster.state.msg_id("demo")


def test_restoring_a_backup_brings_back_its_groups_without_rewinding_message_ids() -> None:
    cluster = Cluster()
    cluster.join("a")
    backup = cluster.state.snapshot()
    saved_kek = cluster.state.kek("demo")
    cluster.join("b")
    cluster.rekey()
    msg_before = cluster.state.msg_id("demo")
    cluster.commit(RestoreState(backup, cluster.now))
    assert cluster.state.kek("demo") == saved_kek
    assert [m.member_id for m in cluster.state.members("demo")] == ["a"]
    assert cluster.state.msg_id("demo") == msg_before
    # The next rekey continues above every id members have seen.
    assert cluster.rekey()[0].msg_id == msg_before + 1


def test_a_proposal_committed_twice_applies_once() -> None:
    cluster = Cluster()
    cluster.join("a")
    command = Rekey(
        group="demo",
        joins=(Join("s", Role.SENDER),),
        leaves=(),
        tree_seed=seed(7),
        tek_key=seed(8),
        refresh_kek=False,
        now_ms=cluster.now,
        reason="re-sent after a leader change",
    )
    first = cluster.commit(command)
    sender_id = cluster.state.gsa("demo", "s", request_id=0, nodes=()).sender_id
    assert first
    assert cluster.commit(command) == []  # the second copy changes nothing
    assert cluster.state.gsa("demo", "s", request_id=0, nodes=()).sender_id == sender_id
    restored = GroupState.restore(cluster.state.snapshot())
    cluster.nodes.append(restored)
    assert cluster.commit(command) == []  # remembered across snapshots too


def test_oversized_membership_batch_is_rejected_without_a_state_change() -> None:
    # A batch whose LKH update might not fit one rekey message is refused
    # deterministically: an exception in apply would stop every node at the
    # same log index, and again at each restart (the entry stays in the log).
    cluster = Cluster()
    cluster.join("a")
    msg_id, kek = cluster.state.msg_id("demo"), cluster.state.kek("demo")
    joins = tuple(Join(f"b{i}", Role.RECEIVER) for i in range(MAX_REKEY_BATCH))
    data = encode_command(
        Rekey("demo", joins, (Leave("a", LeaveReason.EVICT),), seed(5), None, False, 0, "burst")
    )
    result = cluster.state.apply(cluster.index + 1, data)
    assert result.rejected is not None
    assert "batch" in result.rejected
    assert (result.outbound, result.joined, result.left) == ((), (), ())
    assert [m.member_id for m in cluster.state.members("demo")] == ["a"]
    assert (cluster.state.msg_id("demo"), cluster.state.kek("demo")) == (msg_id, kek)


def test_restoring_a_deleted_group_never_reuses_a_message_id() -> None:
    # The backup's KEK sealed message ids up to the deletion; a restored group
    # counting on from the backup's id would seal another body under the same
    # (KEK, nonce = SPI || message id) and give members two different messages
    # with one id. Ids continue above every id the group name ever used.
    cluster = Cluster()
    cluster.join("a")
    backup = cluster.state.snapshot()
    cluster.rekey()  # a new TEK: same KEK, higher message id
    cluster.commit(DeleteGroup("demo", cluster.now))
    restarted = GroupState.restore(cluster.state.snapshot())  # a node restarting here
    cluster.nodes.append(restarted)
    cluster.commit(RestoreState(backup, cluster.now))
    cluster.rekey()
    cluster.commit(DeleteGroup("demo", cluster.now))
    cluster.commit(CreateGroup(policy(), seed(4), seed(5), seed(6), cluster.now))
    cluster.rekey()
    ids = [o.msg_id for o in cluster.sent]
    assert ids == sorted(set(ids)), "message ids of one group name must strictly increase"
    assert len({node.snapshot() for node in cluster.nodes}) == 1


def test_policy_update_cannot_switch_source_authentication_of_a_live_group() -> None:
    # Members fix signing and verification when they register: flipping
    # source_auth later would leave earlier members accepting packets that any
    # member can forge, while later ones reject the earlier senders' packets.
    cluster = Cluster()
    sender = cluster.join("s", Role.SENDER)
    receiver = cluster.join("r")
    msg_id = cluster.state.msg_id("demo")
    data = encode_command(UpdatePolicy(policy(source_auth=True), cluster.now))
    result = cluster.state.apply(cluster.index + 1, data)
    assert result.rejected is not None
    assert "source_auth" in result.rejected
    assert result.outbound == ()
    assert not cluster.state.policy("demo").source_auth
    assert cluster.state.msg_id("demo") == msg_id
    packet = sender.protect(b"still readable", cluster.now)
    assert receiver.unprotect(packet, cluster.now)[1] == b"still readable"


def test_rekeys_faster_than_the_deactivation_delay_keep_the_state_encodable() -> None:
    # Each new TEK keeps its predecessors for the deactivation delay; a burst
    # of rekeys inside that window must not outgrow what a GSA and a snapshot
    # can hold, or every registration fails and the node cannot restart.
    cluster = Cluster(deactivation_delay_ms=600_000)
    cluster.join("s", Role.SENDER)
    receiver = cluster.join("r")
    for _ in range(MAX_TEKS + 6):
        cluster.deliver(cluster.rekey())
    assert len(cluster.state.teks("demo")) <= MAX_TEKS
    gsa = cluster.state.gsa("demo", "r", request_id=1, nodes=())
    assert decode_message(gsa.encode()) == gsa
    restored = GroupState.restore(cluster.state.snapshot())
    assert restored.teks("demo") == cluster.state.teks("demo")
    packet = cluster.members["s"].protect(b"newest", cluster.now)
    assert receiver.unprotect(packet, cluster.now)[1] == b"newest"


def test_member_forgets_teks_once_expired_so_its_keyring_stays_bounded() -> None:
    cluster = Cluster(deactivation_delay_ms=2000)
    sender = cluster.join("s", Role.SENDER)
    receiver = cluster.join("r")
    for _ in range(50):
        cluster.deliver(cluster.rekey())
    for keys in (sender, receiver):
        assert len(keys.teks) <= 4
        assert {t.spi for t in keys.teks} <= {t.spi for t in cluster.state.teks("demo")}
    packet = sender.protect(b"current", cluster.now)
    assert receiver.unprotect(packet, cluster.now)[1] == b"current"


def test_a_command_committed_twice_past_the_dedupe_window_never_repeats_a_tek() -> None:
    # Senders restart their sequence numbers on every new TEK, so two TEKs
    # sharing key bytes would repeat AEAD nonces (sender id || sequence).
    cluster = Cluster()
    sender = cluster.join("s", Role.SENDER)
    forced = Rekey("demo", (), (), seed(8), seed(9), False, cluster.now, "forced")
    cluster.deliver(cluster.commit(forced))
    for junk in range(DEDUPE_LIMIT + 1):  # entries that push the first copy's digest out
        cluster.index += 1
        for node in cluster.nodes:
            node.apply(cluster.index, b"\xc1" + junk.to_bytes(4, "big"))
    cluster.deliver(cluster.commit(forced))
    keys = [t.key for t in cluster.state.teks("demo")]
    assert len(set(keys)) == len(keys)
    assert sender.protect(b"under the second copy's TEK", cluster.now)


def test_members_a_new_policy_no_longer_admits_leave_in_the_same_entry() -> None:
    cluster = Cluster()
    for mid in ("a1", "a2", "m1", "m2"):
        cluster.join(mid)
    only_a = (Authorization("a*", frozenset({Role.SENDER, Role.RECEIVER})),)
    out = cluster.commit(UpdatePolicy(policy(authorize=only_a), cluster.now, seed(7), seed(8)))
    state = cluster.state
    assert sorted(m.member_id for m in state.members("demo")) == ["a1", "a2"]
    outcomes = cluster.deliver(out)
    # The revoked members read the policy message, then nothing more: not the
    # new KEK (wrapped past them), not the new TEK (sealed under that KEK).
    assert outcomes["m1"][0] is Outcome.ACCEPTED
    assert Outcome.ACCEPTED not in outcomes["m1"][1:]
    assert outcomes["a1"] == [Outcome.ACCEPTED] * len(out)
    for mid in ("a1", "a2"):
        assert cluster.members[mid].kek == state.kek("demo")
        assert cluster.members[mid].teks == state.gsa("demo", mid, request_id=0, nodes=()).teks
    assert cluster.members["m1"].kek != state.kek("demo")
    assert [a.event for a in state.audit() if a.member == "m1"][-1] == "revoke"
    # Revoked, not banned: a policy that admits it again lets it back in.
    cluster.commit(UpdatePolicy(policy(), cluster.now, seed(9), seed(10)))
    cluster.rekey([Join("m1", Role.RECEIVER)])
    assert state.is_member("demo", "m1")


def test_a_policy_update_revoking_more_than_one_batch_is_refused_whole() -> None:
    cluster = Cluster()
    cluster.rekey([Join(f"m{i}", Role.RECEIVER) for i in range(MAX_REKEY_BATCH)])
    cluster.rekey([Join("m-one-more", Role.RECEIVER)])
    before = cluster.state.policy("demo")
    only_a = (Authorization("a*", frozenset({Role.RECEIVER})),)
    data = encode_command(UpdatePolicy(policy(authorize=only_a), cluster.now, seed(7), seed(8)))
    cluster.index += 1
    result = cluster.state.apply(cluster.index, data)
    assert result.rejected is not None
    assert "narrow it in steps" in result.rejected
    assert cluster.state.policy("demo") == before
    assert cluster.state.member_count("demo") == MAX_REKEY_BATCH + 1


def test_a_policy_update_logged_before_revocation_existed_revokes_nobody() -> None:
    # Replaying an old log must give the state it gave then.
    cluster = Cluster()
    cluster.join("m1")
    only_a = policy(authorize=(Authorization("a*", frozenset({Role.RECEIVER})),))
    old = msgpack.packb([1, 2, only_a.to_mapping(), cluster.now])
    command = decode_command(old)
    assert command == UpdatePolicy(only_a, cluster.now, version=1)
    cluster.index += 1
    result = cluster.state.apply(cluster.index, old)
    assert result.rejected is None
    assert result.left == ()
    assert cluster.state.is_member("demo", "m1")


def test_join_proposed_before_a_policy_revoked_it_is_not_applied() -> None:
    # A node authorizes a registration against its own, possibly older, copy of
    # the policy; apply checks again, at the log position where it counts.
    cluster = Cluster()
    cluster.join("a1")
    only_a = (Authorization("a*", frozenset({Role.SENDER, Role.RECEIVER})),)
    cluster.commit(UpdatePolicy(policy(authorize=only_a), cluster.now))
    msg_id = cluster.state.msg_id("demo")
    out = cluster.rekey([Join("m1", Role.RECEIVER), Join("a2", Role.RECEIVER)])
    assert not cluster.state.is_member("demo", "m1")
    assert cluster.state.is_member("demo", "a2")
    assert [o.msg_id for o in out] == [msg_id + 1]
    out = cluster.rekey([Join("m2", Role.RECEIVER)])
    assert out == []
    assert not cluster.state.is_member("demo", "m2")


def test_sender_joins_past_what_a_gsa_can_list_are_refused_as_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under source authentication every GSA lists every sender key, and one
    # answer holds MAX_SENDERS (65,536): the next sender is refused, not every
    # later registration (the GSA could not be encoded any more).
    monkeypatch.setattr(state_module, "MAX_SENDERS", 3)
    cluster = Cluster(source_auth=True)

    def sender(mid: str) -> Join:
        return Join(mid, Role.SENDER, mid.encode().ljust(32, b"k"))

    cluster.rekey([sender("s1"), sender("s2")])
    cluster.index += 1
    now = cluster.now + 1000
    command = Rekey(
        "demo",
        (sender("s3"), sender("s4"), Join("r1", Role.RECEIVER)),
        (),
        seed(11),
        None,
        False,
        now,
        "t",
    )
    data = encode_command(command)
    result, *others = [node.apply(cluster.index, data) for node in cluster.nodes]
    assert all(other == result for other in others)
    assert result.full == (("demo", "s4"),)
    assert sorted(mid for _, mid in result.joined) == ["r1", "s3"]
    # A sender registering again frees its old key's slot for its new one.
    cluster.rekey([sender("s1")])
    assert cluster.state.is_member("demo", "s1")
    cluster.rekey(leaves=[Leave("s2", LeaveReason.DEREGISTER)])
    cluster.rekey([sender("s4")])
    assert cluster.state.is_member("demo", "s4")
    keys = cluster.state.gsa("demo", "s4", request_id=0, nodes=()).sender_verify_keys
    assert len(keys) == 3


def test_a_batch_is_one_audit_record_per_member_and_one_log_line_per_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = Cluster(nodes=1)
    cluster.join("m1")
    caplog.set_level("INFO", logger="gcks.cluster.state")
    caplog.clear()
    cluster.rekey(
        [Join("m2", Role.RECEIVER), Join("m3", Role.RECEIVER)],
        [Leave("m1", LeaveReason.DEREGISTER)],
    )
    index = cluster.index
    records = [(a.event, a.member) for a in cluster.state.audit() if a.index == index]
    assert records == [("join", "m2"), ("join", "m3"), ("leave", "m1"), ("rekey", None)]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit")]
    assert [line.split(" ")[3:5] for line in lines] == [
        ["event=join", "member=m2,m3"],
        ["event=leave", "member=m1"],
        ["event=rekey", "member=None"],
    ]


def test_an_entry_from_a_newer_version_stops_the_node_there_instead_of_being_skipped() -> None:
    # Newer nodes apply it: skipping it here would make this node's keys differ
    # from theirs for good. A malformed entry of our own version is skipped (every
    # node of this version does the same).
    cluster = Cluster(nodes=1)
    state = cluster.state
    before = state.applied_index
    newer = msgpack.packb([COMMAND_VERSION + 1, 99, "a field we do not know"])
    with pytest.raises(UpgradeRequired, match=f"log entry {before + 1} .* newer gcks"):
        state.apply(before + 1, newer)
    assert state.applied_index == before
    malformed = msgpack.packb([COMMAND_VERSION, 99])
    assert state.apply(before + 1, malformed).rejected is not None
    assert state.applied_index == before + 1


def test_restoring_a_backup_from_a_newer_version_stops_the_node_there() -> None:
    cluster = Cluster(nodes=1)
    state = cluster.state
    fields = msgpack.unpackb(state.snapshot())
    fields[0] = state_module.SNAPSHOT_FORMAT + 1
    before = state.applied_index
    with pytest.raises(UpgradeRequired, match="backup written by a newer gcks"):
        state.apply(before + 1, encode_command(RestoreState(msgpack.packb(fields), cluster.now)))
    assert state.applied_index == before
    with pytest.raises(state_module.NewerSnapshot):
        GroupState.restore(msgpack.packb(fields))


# ------------------------------------------------------- key times never go back


def _stamped_out_of_order(cluster: Cluster, *, version: int = COMMAND_VERSION) -> list[Outbound]:
    """What a leader change can commit: m1 leaves in an entry stamped now, then
    m3 joins in the entry after it, a batch stamped 2 s before that one."""
    out = cluster.rekey(leaves=[Leave("m1", LeaveReason.DEREGISTER)])
    del cluster.members["m1"]
    cluster.deliver(out)
    return cluster.rekey([Join("m3", Role.RECEIVER)], stamped=cluster.now - 2000, version=version)


def test_a_batch_stamped_before_the_entry_ahead_of_it_still_moves_key_times_forward() -> None:
    cluster = Cluster(nodes=2)
    cluster.join("m1")
    cluster.join("m2", Role.SENDER)
    previous_tek = cluster.state.teks("demo")[-1]
    out = _stamped_out_of_order(cluster)
    cluster.deliver(out)
    tek = cluster.state.teks("demo")[-1]
    assert tek.activation_ms > previous_tek.activation_ms
    assert cluster.state.kek("demo").activation_ms == tek.activation_ms
    # The TEK it replaced is retired, so members that followed the rekeys
    # hold the nodes' newest key and send with it.
    sender = cluster.members["m2"]
    assert sender.teks[-1] == tek
    assert sender.sending_tek(cluster.now) == tek
    # m3 joined after `previous_tek` protected traffic: it must not get it.
    joined = next(m for m in cluster.state.members("demo") if m.member_id == "m3")
    assert joined.joined_ms > previous_tek.activation_ms
    gsa = cluster.state.gsa("demo", "m3", request_id=1, nodes=())
    assert [t.spi for t in gsa.teks] == [tek.spi]


def test_entries_of_version_1_replay_at_their_own_times() -> None:
    # Older nodes applied them so; a node replaying its log must agree.
    cluster = Cluster(nodes=1)
    cluster.join("m1")
    cluster.join("m2")
    previous_tek = cluster.state.teks("demo")[-1]
    _stamped_out_of_order(cluster, version=1)
    assert cluster.state.teks("demo")[-1].activation_ms == previous_tek.activation_ms - 1000


def test_a_command_stamped_far_behind_the_group_clock_applies_at_its_own_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The group's clock came from a node whose own ran ahead: holding key times
    # there would leave every new TEK inactive until real time catches up.
    cluster = Cluster(nodes=1)
    ahead = cluster.now + 3_600_000
    cluster.rekey(stamped=ahead)  # by a leader whose clock is an hour ahead
    cluster.rekey(stamped=ahead - state_module.CLOCK_HOLD_MS)  # within the hold: moved up
    assert cluster.state.teks("demo")[-1].activation_ms == ahead + 1
    assert not caplog.records
    with caplog.at_level("WARNING", logger="gcks.cluster.state"):
        cluster.rekey()  # by a leader whose clock is right
    assert cluster.state.teks("demo")[-1].activation_ms == cluster.now
    assert "clock ran ahead" in caplog.text


def test_group_clocks_and_departures_survive_a_snapshot() -> None:
    cluster = Cluster(nodes=1)
    cluster.join("m1")
    cluster.join("m2")
    cluster.nodes.append(GroupState.restore(cluster.state.snapshot()))
    _stamped_out_of_order(cluster)  # commit() asserts both nodes agree
    cluster.rekey(stamped=cluster.now - 500)  # a TEK only: the clock passes the KEK's time
    restored = GroupState.restore(cluster.state.snapshot())
    assert restored.snapshot() == cluster.state.snapshot()
    assert restored._groups["demo"].departed == {"m1": (0, T0 + 3000)}
    assert restored.latest_ms == cluster.state.latest_ms > cluster.state.kek("demo").activation_ms
    cluster.nodes.append(restored)
    cluster.rekey([Join("m1", Role.RECEIVER)], stamped=cluster.now - 4000)


def test_restoring_a_backup_moves_no_clock_back_and_keeps_the_current_departures() -> None:
    cluster = Cluster(nodes=1)
    cluster.join("m1")
    backup = cluster.state.snapshot()
    cluster.join("m2")
    asked = cluster.now
    leave = Leave("m2", LeaveReason.DEREGISTER, requested_ms=asked + 6000)
    cluster.rekey(leaves=[leave], stamped=asked + 6000)
    clock = cluster.state._groups["demo"].clock_ms
    departed = dict(cluster.state._groups["demo"].departed)
    cluster.commit(RestoreState(backup, cluster.now))
    assert cluster.state._groups["demo"].clock_ms == clock
    assert cluster.state._groups["demo"].departed == departed
    # A stale copy of m2's join, requested before its leave, is still recognised.
    assert _join_requested(cluster, "m2", asked).stale == (("demo", "m2"),)


# ------------------------------------------- joins older than the member's leave


def _join_requested(cluster: Cluster, member_id: str, requested_ms: int) -> ApplyResult:
    join = Join(member_id, Role.RECEIVER, requested_ms=requested_ms)
    return _apply_everywhere(cluster, _tagged_rekey(cluster, (join,)))


def test_a_join_requested_before_its_members_latest_leave_is_skipped() -> None:
    # The member gave up on one node (after 5 s), registered at another and
    # left there; the first node's copy of its join, sent again, commits last.
    cluster = Cluster(nodes=2)
    cluster.join("m1")
    asked = cluster.now
    leave = Leave("m1", LeaveReason.DEREGISTER, requested_ms=asked + 6000)
    cluster.rekey(leaves=[leave], stamped=asked + 6000)
    cluster.nodes.append(GroupState.restore(cluster.state.snapshot()))  # it remembers too
    msg_id = cluster.state.msg_id("demo")
    result = _join_requested(cluster, "m1", asked)
    assert result.stale == (("demo", "m1"),)
    assert result.joined == ()
    assert not cluster.state.is_member("demo", "m1")
    assert cluster.state.msg_id("demo") == msg_id, "nothing changed: no rekey"
    # Requested after the leave, up to the clock skew allowed between nodes: a join.
    result = _join_requested(cluster, "m1", leave.requested_ms - state_module.REQUEST_SKEW_MS)
    assert result.joined == (("demo", "m1"),)
    assert result.stale == ()


def test_no_clock_running_ahead_makes_a_join_look_stale() -> None:
    # Requests are timed where they arrive, leaves as much as joins: the
    # leader's clock, which times the entries, plays no part.
    cluster = Cluster(nodes=1)
    cluster.join("m1")
    asked = cluster.now
    leave = Leave("m1", LeaveReason.DEREGISTER, requested_ms=asked)
    cluster.rekey(leaves=[leave], stamped=asked + 3_600_000)
    assert _join_requested(cluster, "m1", asked + 100).joined == (("demo", "m1"),)
    # Nor does the clock of the node that took the leave: no leave is asked
    # for after it applied.
    cluster = Cluster(nodes=1)
    cluster.join("m1")
    leave = Leave("m1", LeaveReason.DEREGISTER, requested_ms=cluster.now + 3_600_000)
    cluster.rekey(leaves=[leave])
    assert _join_requested(cluster, "m1", cluster.now).joined == (("demo", "m1"),)


def test_departures_are_kept_oldest_first_at_the_time_they_applied() -> None:
    cluster = Cluster(nodes=1)
    for mid in ("m1", "m2"):
        cluster.join(mid)
    departed = cluster.state._groups["demo"].departed
    cluster.rekey(leaves=[Leave("m1", LeaveReason.DEREGISTER)])
    asked = cluster.now
    leave = Leave("m2", LeaveReason.DEREGISTER, requested_ms=asked)
    cluster.rekey(leaves=[leave], stamped=cluster.now - 5000)
    clock = cluster.state._groups["demo"].clock_ms
    assert departed["m2"] == (asked, clock), "applied at the clock, not at its stamp"
    _join_requested(cluster, "m1", cluster.now)
    cluster.rekey(leaves=[Leave("m1", LeaveReason.DEREGISTER)])
    assert list(departed) == ["m2", "m1"], "m1's latest leave is the newest"


def test_departures_are_forgotten_after_the_hold() -> None:
    cluster = Cluster(nodes=1)
    cluster.join("m1")
    cluster.join("m2")
    cluster.rekey(leaves=[Leave("m1", LeaveReason.DEREGISTER)])
    cluster.rekey(leaves=[Leave("m2", LeaveReason.DEREGISTER)])
    departed = cluster.state._groups["demo"].departed
    assert list(departed) == ["m1", "m2"]
    cluster.now += state_module.CLOCK_HOLD_MS - 1000  # m1 left just past the hold
    cluster.rekey()
    assert list(departed) == ["m2"]
    # Nor is a join stale without a request time (logged by version 1), or
    # after a leave without one (m2's, like those a policy update makes).
    assert _join_requested(cluster, "m2", 1).joined == (("demo", "m2"),)
    cluster.rekey(leaves=[Leave("m2", LeaveReason.DEREGISTER, requested_ms=cluster.now)])
    assert _join_requested(cluster, "m2", 0).joined == (("demo", "m2"),)


def test_a_clock_that_ran_ahead_leaves_no_departures_behind() -> None:
    # Timed by the fast clock, they would outstay the hold by as long as it ran ahead.
    cluster = Cluster(nodes=1)
    cluster.join("m1")
    cluster.rekey(leaves=[Leave("m1", LeaveReason.DEREGISTER)], stamped=cluster.now + 3_600_000)
    assert cluster.state._groups["demo"].departed
    cluster.rekey()  # by a leader whose clock is right
    assert cluster.state._groups["demo"].departed == {}


# ---------------------------------------------------------- the previous version


def test_a_command_made_in_version_1_is_what_version_1_nodes_read() -> None:
    # An upgraded leader proposes version 1 until every node applies version 2
    # (`gcks.cluster.versions`); nodes of version 1 read joins of 4 fields.
    join = Join("m1", Role.SENDER, b"k" * 32, tag=5, requested_ms=T0)
    leave = Leave("m2", LeaveReason.DEREGISTER, tag=6, requested_ms=T0)
    command = Rekey("demo", (join,), (leave,), b"S" * 32, None, False, T0, "r", version=1)
    fields = msgpack.unpackb(encode_command(command))
    assert fields[0] == 1
    assert fields[3] == [["m1", "sender", b"k" * 32, 5]]
    assert fields[4] == [["m2", "deregister", 6]]
    decoded = decode_command(encode_command(command))
    assert decoded == dataclasses.replace(
        command,
        joins=(dataclasses.replace(join, requested_ms=0),),
        leaves=(dataclasses.replace(leave, requested_ms=0),),
    )
    # And version 1 entries are read as version 1 nodes read them: one more
    # field would make them skip the entry; this version must not apply it.
    for position, longer in ((3, ["m1", "sender", b"k" * 32, 5, T0]), (4, ["m2", "evict", 6, T0])):
        wrong = list(fields)
        wrong[position] = [longer]
        with pytest.raises(DecodeError, match=r"Rekey\.(joins|leaves)\[0\]"):
            decode_command(msgpack.packb(wrong))


def test_version_1_entries_leave_no_trace_of_version_2_and_snapshots_stay_format_2() -> None:
    # A leader sends its snapshot to followers that may still run version 1.
    state = GroupState()

    def apply(command: object) -> ApplyResult:
        return state.apply(state.applied_index + 1, encode_command(command))  # type: ignore[arg-type]

    apply(CreateGroup(policy(), seed(1), seed(2), seed(3), T0, version=1))
    for i, mid in enumerate(("a1", "m1", "m2")):
        join = Join(mid, Role.RECEIVER, requested_ms=T0)
        apply(Rekey("demo", (join,), (), seed(4 + i), None, False, T0 + i, "j", version=1))
    leave = Leave("m1", LeaveReason.DEREGISTER, requested_ms=T0 + 10)
    apply(Rekey("demo", (), (leave,), seed(9), seed(10), False, T0 + 10, "l", version=1))
    only_a = policy(authorize=(Authorization("a*", frozenset({Role.RECEIVER})),))
    revoked = apply(UpdatePolicy(only_a, T0 + 20, seed(11), seed(12), version=1))
    assert revoked.left == (("demo", "m2", LeaveReason.REVOKE),)
    assert state._groups["demo"].clock_ms == 0
    assert state._groups["demo"].departed == {}
    fields = msgpack.unpackb(state.snapshot())
    assert (fields[0], len(fields), [len(group) for group in fields[2]]) == (2, 6, [10])
    # A node restored from it agrees with this one on the first version 2 entry.
    restored = GroupState.restore(state.snapshot())
    assert restored.snapshot() == state.snapshot()
    late = Rekey("demo", (), (), seed(13), seed(14), False, T0 + 5, "t", version=2)
    assert restored.apply(state.applied_index + 1, encode_command(late)) == apply(late)
    assert restored._groups["demo"].clock_ms == state._groups["demo"].clock_ms == T0 + 5
    assert msgpack.unpackb(state.snapshot())[0] == state_module.SNAPSHOT_FORMAT == 3


def test_the_newest_command_version_applied_is_kept_in_snapshots() -> None:
    # Proposers never go below it (`Node.command_version`).
    state = GroupState()
    state.apply(1, encode_command(CreateGroup(policy(), seed(1), seed(2), seed(3), T0, version=1)))
    assert state.newest_version == 1
    state.apply(2, encode_command(DeleteGroup("demo", T0, version=2)))
    assert state.newest_version == 2
    assert GroupState.restore(state.snapshot()).newest_version == 2
    fields = msgpack.unpackb(state.snapshot())
    fields[6] = COMMAND_VERSION + 1
    with pytest.raises(state_module.NewerSnapshot, match="command version"):
        GroupState.restore(msgpack.packb(fields))


def test_the_command_version_a_snapshot_needs_is_read_from_its_ends() -> None:
    cluster = Cluster()
    cluster.join("m1")
    data = cluster.state.snapshot()
    assert msgpack.unpackb(data)[-1] == COMMAND_VERSION
    assert GroupState.snapshot_version(data) == COMMAND_VERSION
    fields = msgpack.unpackb(data)
    assert GroupState.snapshot_version(msgpack.packb([*fields[:6], 1])) == 2, "format 3 came with 2"
    assert GroupState.snapshot_version(msgpack.packb([2, *fields[1:6]])) == 1
    with pytest.raises(StateError, match="newer gcks"):
        GroupState.snapshot_version(msgpack.packb([state_module.SNAPSHOT_FORMAT + 1, *fields[1:]]))
    with pytest.raises(StateError, match="items outside"):
        GroupState.snapshot_version(msgpack.packb([3, 1, 2]))
    with pytest.raises(StateError, match="not a group state snapshot"):
        GroupState.snapshot_version(b"not msgpack at all")
    with pytest.raises(StateError, match="not a group state snapshot"):
        GroupState.snapshot_version(data[:-1])  # a backup cut short
