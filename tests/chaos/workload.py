"""The chaos workload: members that join, leave and follow rekeys, and an
administrator that evicts, forces rekeys, updates the policy and reads the
member list, every operation recorded in the `History`.

A `ChaosMember` is built from the member library's sans-IO key state
(`gcks.member.group.GroupKeys`) and its registration stream
(`gcks.member.session.Session`), reached through a fault proxy per node. Its
own task does all its registrations and deregistrations, one at a time, so
each is one recorded operation: the workload only says whether the member
should be in the group. It takes rekeys from the unicast pushes of its
session and from the shared multicast socket, re-registers on a gap (resync)
or a lost connection at another node, and gives up when the group refuses it
(evicted). Every key state it accepts is a `KeyEvent` (fingerprints only).

Test infrastructure; may import trio, `gcks.member`, `gcks.proto` and the
test kits. Never logs a key.
"""

from __future__ import annotations

import random
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from gcks.cluster.admin import AdminError
from gcks.member.group import GroupKeys
from gcks.member.group import Outcome as RekeyOutcome
from gcks.member.member import wall_clock_ms
from gcks.member.session import Refused, Session, SessionError
from gcks.member.tls import member_client_context
from gcks.proto.errors import ProtocolError
from gcks.proto.messages import ErrorCode, GsaAnswer
from gcks.proto.policy import Role
from tests.chaos.history import History, KeyEvent, Op, Outcome
from tests.cluster.clusterkit import Kit, admin_call

GROUP = "demo"
# Bounds on every network wait of a client (the node's own deadline is 15 s).
REQUEST_TIMEOUT_S = 12.0
CONNECT_TIMEOUT_S = 4.0
ADMIN_TIMEOUT_S = 20.0
RETRY_S = 0.3
_HELD_DATAGRAMS = 1024

# Refusals that say the operation did not take effect (checked before any
# proposal, or a join that was not applied); anything else is unknown.
_NO_EFFECT = frozenset({ErrorCode.UNAUTHORIZED, ErrorCode.UNKNOWN_GROUP, ErrorCode.BAD_REQUEST})
_ADMIN_NO_EFFECT = frozenset({"not_member", "unknown_group", "bad_request", "unknown_op"})


class TekLike(Protocol):
    """A TEK as members hold it (`KeySA`) or as `group.show` lists it."""

    @property
    def spi(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def activation_ms(self) -> int: ...


def newest_tek(teks: Iterable[TekLike]) -> str | None:
    """Fingerprint of the newest TEK (by activation, then SPI), as nodes list them."""
    best = max(teks, key=lambda t: (t.activation_ms, t.spi), default=None)
    return None if best is None else best.fingerprint


@dataclass
class MemberStats:
    rekeys: int = 0
    duplicates: int = 0
    resyncs: int = 0
    bad_datagrams: int = 0
    registrations: int = 0


@dataclass
class ChaosMember:
    member_id: str
    context: ssl.SSLContext
    routes: dict[str, tuple[str, int]]  # node id -> proxied member address
    history: History
    rng: random.Random
    want: bool = False
    evicted: bool = False  # the group refused it: it stays out
    keys: GroupKeys | None = None
    session: Session | None = None
    stats: MemberStats = field(default_factory=MemberStats)
    _changed: trio.Event = field(default_factory=trio.Event)
    _resync: bool = False
    # Rekeys that arrive while a registration is in flight are held and applied
    # to the new GSA afterwards (as `gcks.member.member.Member` does): the GSA
    # is built at the join's own log index, which copies of later rekeys may
    # already have passed by the time the answer arrives.
    _held: deque[tuple[bytes, str]] | None = None

    @classmethod
    def for_kit(
        cls,
        kit: Kit,
        member_id: str,
        routes: dict[str, tuple[str, int]],
        history: History,
        seed: int,
    ) -> ChaosMember:
        ca, crt, key = kit.member_files(member_id)
        context = member_client_context(cluster_ca=ca, cert=crt, key=key)
        return cls(member_id, context, routes, history, random.Random(seed))

    @property
    def joined(self) -> bool:
        return self.keys is not None and self.session is not None and not self._resync

    def set_want(self, want: bool) -> None:
        self.want = want
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---------------------------------------------------------------- rekeys

    def on_datagram(self, datagram: bytes, how: str) -> None:
        """One rekey datagram, from the push stream or multicast."""
        if self._held is not None:
            self._held.append((datagram, how))
            return
        keys = self.keys
        if keys is None:
            return
        before = keys.msg_id
        try:
            result = keys.handle_rekey(datagram, wall_clock_ms())
        except ProtocolError:
            self.stats.bad_datagrams += 1
            return
        if result.outcome is RekeyOutcome.ACCEPTED:
            self.stats.rekeys += 1
            self.history.key_events.append(
                KeyEvent(
                    self.member_id,
                    trio.current_time(),
                    result.msg_id,
                    keys.kek.fingerprint,
                    newest_tek(keys.teks),
                    f"rekey after {before} via {how}",
                )
            )
        elif result.outcome is RekeyOutcome.DUPLICATE:
            self.stats.duplicates += 1
        elif result.outcome in (RekeyOutcome.RESYNC, RekeyOutcome.AHEAD):
            self.stats.resyncs += 1
            self._resync = True
            self._wake()
        else:  # the group was terminated: nothing left to follow
            self.keys = None
            self.evicted, self.want = True, False
            self._wake()

    # ------------------------------------------------------------------ task

    async def run(self) -> None:
        """Register, follow and deregister as `want` says; never returns."""
        while True:
            if self.evicted:
                await trio.sleep_forever()
            changed = self._changed
            if self.want and not self.joined:
                if not await self._register():
                    await trio.sleep(RETRY_S)
                continue
            if not self.want and (self.keys is not None or self.session is not None):
                if not await self._deregister():
                    await trio.sleep(RETRY_S)
                continue
            await changed.wait()

    async def _connect(self, node: str) -> Session:
        host, port = self.routes[node]
        return await Session.connect(
            host, port, self.context, expected_node=node, timeout_s=CONNECT_TIMEOUT_S
        )

    async def _register(self) -> bool:
        node = self.rng.choice(sorted(self.routes))
        last = self.keys.msg_id if self.keys is not None else 0
        op = self.history.invoke(self.member_id, "register", self.member_id, trio.current_time())
        try:
            session = await self._connect(node)
        except SessionError as exc:
            # Nothing was sent: the registration cannot have happened.
            self.history.complete(op, Outcome.FAIL, trio.current_time(), detail=str(exc))
            return False
        self._held = deque(maxlen=_HELD_DATAGRAMS)
        try:
            answer = await session.register(
                GROUP, Role.RECEIVER, last_msg_id=last, sender_key=None, timeout_s=REQUEST_TIMEOUT_S
            )
        except Refused as exc:
            self._release_held()
            await session.aclose()
            outcome = Outcome.FAIL if exc.answer.code in _NO_EFFECT else Outcome.INFO
            self.history.complete(op, outcome, trio.current_time(), detail=str(exc))
            if exc.answer.code is ErrorCode.UNAUTHORIZED:
                self.evicted, self.want = True, False
                await self._drop_keys()
            return False
        except SessionError as exc:
            self._release_held()
            await session.aclose()
            self.history.complete(op, Outcome.INFO, trio.current_time(), detail=str(exc))
            return False
        except BaseException:
            self._release_held()
            raise
        self.history.complete(op, Outcome.OK, trio.current_time(), detail=f"at {node}")
        await self._adopt(answer, session)
        return True

    def _release_held(self) -> None:
        held, self._held = self._held or (), None
        for datagram, how in held:
            self.on_datagram(datagram, how)

    async def _adopt(self, answer: GsaAnswer, session: Session) -> None:
        self.stats.registrations += 1
        keys = GroupKeys(answer, now_ms=wall_clock_ms())
        self.history.key_events.append(
            KeyEvent(
                self.member_id,
                trio.current_time(),
                answer.msg_id,
                keys.kek.fingerprint,
                newest_tek(keys.teks),
                f"gsa from {session.node_id}"
                + (f" after {self.keys.msg_id}" if self.keys is not None else ""),
            )
        )
        old = self.session
        self.keys, self.session, self._resync = keys, session, False
        self._release_held()
        self._wake()
        if old is not None:
            # Closing the old stream ends its reader, which then takes the new one.
            await old.aclose()

    async def _drop_keys(self) -> None:
        self.keys = None
        session, self.session = self.session, None
        self._wake()
        if session is not None:
            await session.aclose()

    async def _deregister(self) -> bool:
        node = self.rng.choice(sorted(self.routes))
        op = self.history.invoke(self.member_id, "deregister", self.member_id, trio.current_time())
        try:
            session = await self._connect(node)
        except SessionError as exc:
            self.history.complete(op, Outcome.FAIL, trio.current_time(), detail=str(exc))
            return False
        try:
            await session.deregister(GROUP, timeout_s=REQUEST_TIMEOUT_S)
        except Refused as exc:
            code = exc.answer.code
            outcome = (
                Outcome.FAIL if code in (*_NO_EFFECT, ErrorCode.NOT_REGISTERED) else Outcome.INFO
            )
            self.history.complete(op, outcome, trio.current_time(), detail=str(exc))
            if code is ErrorCode.NOT_REGISTERED:
                await self._drop_keys()  # nothing to leave (evicted meanwhile)
                return True
            return False
        except SessionError as exc:
            self.history.complete(op, Outcome.INFO, trio.current_time(), detail=str(exc))
            return False
        finally:
            await session.aclose()
        self.history.complete(op, Outcome.OK, trio.current_time(), detail=f"at {node}")
        await self._drop_keys()
        return True

    async def read_pushes(self) -> None:
        """Feed the current session's pushes into the keys; follow session changes."""
        while True:
            session = self.session
            if session is None:
                await self._changed.wait()
                continue
            try:
                async for datagram in session.pushes():
                    self.on_datagram(datagram, f"push {session.node_id}")
            except SessionError:
                pass
            if self.session is session:
                # The node hung up (killed, restarted, cut): fail over elsewhere.
                self.session = None
                self._resync = True
                self._wake()
                await session.aclose()


class Admin:
    """Administrator operations at a random node, each one recorded."""

    def __init__(
        self, kit: Kit, history: History, rng: random.Random, tracked: frozenset[str]
    ) -> None:
        self.kit = kit
        self.history = history
        self.rng = rng
        # Reads report only these members: others (observers) are not modelled.
        self.tracked = tracked

    async def call(self, op: Op, node: str, name: str, args: dict[str, object]) -> object | None:
        """Run one admin request for `op`; complete `op` unless the request
        succeeded (the caller then completes it with its value)."""
        try:
            with trio.fail_after(ADMIN_TIMEOUT_S):
                answer: object = await admin_call(self.kit, node, name, args)
        except AdminError as exc:
            no_effect = exc.code in _ADMIN_NO_EFFECT or op.kind == "read"
            outcome = Outcome.FAIL if no_effect else Outcome.INFO
            detail = f"{name} at {node}: {exc.code}: {exc}"
            self.history.complete(op, outcome, trio.current_time(), detail=detail)
        except (OSError, ssl.SSLError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            # A read that failed says nothing; a change may have been proposed.
            outcome = Outcome.FAIL if op.kind == "read" else Outcome.INFO
            detail = f"{name} at {node}: {type(exc).__name__}"
            self.history.complete(op, outcome, trio.current_time(), detail=detail)
        else:
            op.detail = f"{name} at {node}"
            return answer
        return None

    def _node(self, nodes: list[str]) -> str:
        return self.rng.choice(nodes)

    async def read_members(self, nodes: list[str]) -> Op:
        op = self.history.invoke("admin", "read", None, trio.current_time())
        answer = await self.call(op, self._node(nodes), "member.list", {"group": GROUP})
        if answer is not None:
            assert isinstance(answer, list)
            members = tuple(
                sorted(m for entry in answer if (m := str(entry["member"])) in self.tracked)
            )
            self.history.complete(
                op, Outcome.OK, trio.current_time(), value=members, detail=op.detail
            )
        return op

    async def evict(self, nodes: list[str], member: str) -> Op:
        op = self.history.invoke("admin", "evict", member, trio.current_time())
        answer = await self.call(
            op, self._node(nodes), "member.evict", {"group": GROUP, "member": member}
        )
        if answer is not None:
            assert isinstance(answer, dict)
            ids = tuple(str(i) for i in answer.get("msg_ids", []))
            self.history.complete(op, Outcome.OK, trio.current_time(), value=ids, detail=op.detail)
        return op

    async def rekey(self, nodes: list[str]) -> Op:
        kek = self.rng.random() < 0.3
        op = self.history.invoke("admin", "rekey", None, trio.current_time())
        answer = await self.call(op, self._node(nodes), "rekey", {"group": GROUP, "kek": kek})
        if answer is not None:
            assert isinstance(answer, dict)
            ids = tuple(str(i) for i in answer.get("msg_ids", []))
            self.history.complete(op, Outcome.OK, trio.current_time(), value=ids, detail=op.detail)
        return op

    async def update_policy(self, nodes: list[str]) -> Op:
        """Set the group's `retransmit_count` to a fresh value (recorded in `value`)."""
        node = self._node(nodes)
        count = self.rng.randint(0, 3)
        op = self.history.invoke("admin", "policy", None, trio.current_time())
        op.value = (str(count),)
        shown = await self.call(op, node, "group.show", {"group": GROUP})
        if shown is None:
            return op
        assert isinstance(shown, dict)
        policy = {**shown["policy"], "retransmit_count": count}
        answer = await self.call(op, node, "group.update", {"policy": policy})
        if answer is not None:
            self.history.complete(
                op, Outcome.OK, trio.current_time(), value=(str(count),), detail=op.detail
            )
        return op


@dataclass
class Workload:
    """Client tasks choosing operations at random (seeded) until cancelled."""

    members: dict[str, ChaosMember]
    admin: Admin
    nodes: Callable[[], list[str]]
    rng: random.Random
    pause_s: tuple[float, float] = (0.05, 0.4)

    async def client(self) -> None:
        weights = {
            "join": 30,
            "leave": 12,
            "evict": 3,
            "rekey": 12,
            "policy": 4,
            "read": 30,
        }
        kinds = list(weights)
        while True:
            kind = self.rng.choices(kinds, [weights[k] for k in kinds])[0]
            await self.one(kind)
            await trio.sleep(self.rng.uniform(*self.pause_s))

    async def one(self, kind: str) -> None:
        candidates = [m for m in self.members.values() if not m.evicted]
        outside = [m for m in candidates if not m.want]
        inside = [m for m in candidates if m.want]
        if kind == "join" and outside:
            self.rng.choice(outside).set_want(True)
        elif kind == "leave" and inside:
            self.rng.choice(inside).set_want(False)
        elif kind == "evict" and len(inside) > 2:
            await self.admin.evict(self.nodes(), self.rng.choice(inside).member_id)
        elif kind == "rekey":
            await self.admin.rekey(self.nodes())
        elif kind == "policy":
            await self.admin.update_policy(self.nodes())
        elif kind == "read":
            await self.admin.read_members(self.nodes())
