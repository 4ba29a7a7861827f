"""The admin API: mTLS with an admin certificate, one request per frame.

Wire: length-prefixed msgpack frames (`gcks.proto.codec`). A request is
`[ADMIN_VERSION, request_id, op, args]` (args a map); an answer is
`[ADMIN_VERSION, request_id, true, result]` or `[ADMIN_VERSION, request_id,
false, {"code", "message", "leader"}]`. Only certificates of the admin role
(`urn:gcks:admin:NAME`) get past the handshake check; every operation is
logged with the admin's name (audit).

Changes go through Raft (proposals are forwarded to the leader by the core);
reads first confirm a ReadIndex so they are linearizable from any node.
Membership changes and leadership transfers must reach the leader: a
follower answers NOT_LEADER with the leader's id, and the client retries
there. Nothing here returns key material, except `snapshot.save`, which the
client encrypts before it touches the disk.

May import trio and `gcks.cluster`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import trio

from gcks.cluster import tlslisten
from gcks.cluster.commands import (
    DeleteGroup,
    LeaveReason,
    RestoreState,
    encode_command,
)
from gcks.cluster.config import Address
from gcks.cluster.driver import NoQuorum, RaftDriver
from gcks.cluster.raft.errors import NotLeader, RaftError
from gcks.cluster.raft.types import ConfChange, ConfChangeType
from gcks.cluster.rekeyer import Rekeyer
from gcks.cluster.state import GroupState, StateError
from gcks.cluster.tls import verify_peer
from gcks.proto.codec import FrameDecoder, encode_frame, packb, unpackb
from gcks.proto.errors import DecodeError, PolicyError, ProtocolError
from gcks.proto.identity import Role as CertRole
from gcks.proto.identity import is_valid_id
from gcks.proto.policy import GroupPolicy
from gcks.proto.schema import read_bool, read_int, read_map, read_record, read_str

if TYPE_CHECKING:
    from gcks.cluster.node import Node

log = logging.getLogger(__name__)

ADMIN_VERSION: Final = 1
MAX_ADMIN_FRAME: Final = 1 << 30  # snapshots travel through here
_RECEIVE_CHUNK = 65536


class AdminError(Exception):
    """A request failed; `code` is machine-readable, `leader` a retry hint."""

    def __init__(self, code: str, message: str, leader: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.leader = leader


@dataclass(frozen=True, slots=True)
class AdminRequest:
    request_id: int
    op: str
    args: dict[str, object] = field(repr=False)  # snapshot.restore carries every key

    def encode(self) -> bytes:
        return packb([ADMIN_VERSION, self.request_id, self.op, self.args])

    @classmethod
    def decode(cls, data: bytes) -> AdminRequest:
        version, request_id, op, args = read_record(
            unpackb(data, max_size=MAX_ADMIN_FRAME), "admin request", 4
        )
        if read_int(version, "version", 0, 255) != ADMIN_VERSION:
            raise DecodeError(f"admin protocol version {version} not supported")
        return cls(
            read_int(request_id, "request_id", 0, 2**63),
            read_str(op, "op", 64),
            read_map(args, "args", 64),
        )


def _answer_frame(request: AdminRequest, answer: bytes) -> bytes:
    """The framed answer, or a typed refusal when it is past the frame limit (a
    snapshot of a very large state): an error for the caller, not an exception
    that would end the admin listener."""
    try:
        return encode_frame(answer, max_size=MAX_ADMIN_FRAME)
    except ValueError:
        log.error(
            "admin %s: the answer is %d bytes, over the %d-byte limit",
            request.op,
            len(answer),
            MAX_ADMIN_FRAME,
        )
        error = AdminError("too_large", f"the answer is over {MAX_ADMIN_FRAME} bytes")
        return encode_frame(encode_error(request.request_id, error), max_size=MAX_ADMIN_FRAME)


def encode_answer(request_id: int, result: object) -> bytes:
    return packb([ADMIN_VERSION, request_id, True, result])


def encode_error(request_id: int, error: AdminError) -> bytes:
    return packb(
        [
            ADMIN_VERSION,
            request_id,
            False,
            {"code": error.code, "message": str(error), "leader": error.leader},
        ]
    )


def decode_answer(data: bytes, request_id: int) -> object:
    """The result of an answer, or raise its `AdminError`."""
    version, rid, ok, payload = read_record(unpackb(data, max_size=MAX_ADMIN_FRAME), "answer", 4)
    if read_int(version, "version", 0, 255) != ADMIN_VERSION or rid != request_id:
        raise DecodeError("answer does not match the request")
    if read_bool(ok, "ok"):
        return payload
    error = read_map(payload, "error", 8)
    leader = error.get("leader")
    raise AdminError(
        read_str(error.get("code"), "code", 64),
        read_str(error.get("message"), "message", 4096),
        leader if isinstance(leader, str) else None,
    )


Handler = Callable[[dict[str, object]], Awaitable[object]]


class AdminServer:
    def __init__(
        self,
        node: Node,
        context: ssl.SSLContext,
        *,
        timeout_s: float = 15.0,
        handshake_timeout_s: float = 5.0,
    ) -> None:
        self._node = node
        self._context = context
        self._timeout_s = timeout_s
        self._handshake_timeout_s = handshake_timeout_s
        self._ops: Mapping[str, Handler] = {
            "status": self._status,
            "group.list": self._group_list,
            "group.show": self._group_show,
            "group.create": self._group_create,
            "group.update": self._group_update,
            "group.delete": self._group_delete,
            "member.list": self._member_list,
            "member.evict": self._member_evict,
            "rekey": self._rekey,
            "cluster.add-node": self._add_node,
            "cluster.add-learner": self._add_learner,
            "cluster.promote": self._promote,
            "cluster.remove-node": self._remove_node,
            "cluster.transfer-leader": self._transfer,
            "snapshot.save": self._snapshot_save,
            "snapshot.restore": self._snapshot_restore,
        }

    async def serve(
        self,
        listen: Address,
        *,
        task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await tlslisten.serve(listen, self._handle, task_status=task_status)

    async def _handle(self, tcp: trio.SocketStream) -> None:
        remote = tlslisten.remote(tcp)
        try:
            stream, identity = await tlslisten.accept(
                tcp, self._context, CertRole.ADMIN, self._handshake_timeout_s
            )
        except tlslisten.Refused as exc:
            log.warning("admin connection refused (from %s): %s", remote, exc)
            return
        decoder = FrameDecoder(MAX_ADMIN_FRAME)
        try:
            while True:
                data = await stream.receive_some(_RECEIVE_CHUNK)
                if not data:
                    return
                decoder.feed(bytes(data))
                for frame in decoder:
                    request = AdminRequest.decode(frame)
                    log.info("admin %s: %s", identity.id, request.op)
                    answer = await self._answer(request)
                    await stream.send_all(_answer_frame(request, answer))
        except ProtocolError as exc:
            log.warning("admin %s sent a bad frame: %s", identity.id, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(self, request: AdminRequest) -> bytes:
        handler = self._ops.get(request.op)
        try:
            if handler is None:
                raise AdminError("unknown_op", f"unknown operation {request.op!r}")
            with trio.fail_after(self._timeout_s):
                return encode_answer(request.request_id, await handler(request.args))
        except AdminError as exc:
            return encode_error(request.request_id, exc)
        except NotLeader as exc:
            return encode_error(
                request.request_id, AdminError("not_leader", str(exc), exc.leader_hint)
            )
        except (NoQuorum, trio.TooSlowError) as exc:
            return encode_error(
                request.request_id, AdminError("no_quorum", str(exc) or "timed out")
            )
        except RaftError as exc:
            return encode_error(request.request_id, AdminError("refused", str(exc)))
        except (DecodeError, PolicyError) as exc:
            return encode_error(request.request_id, AdminError("bad_request", str(exc)))

    # ------------------------------------------------------------ operations

    @property
    def _driver(self) -> RaftDriver:
        assert self._node.driver is not None
        return self._node.driver

    async def _linearizable(self) -> None:
        await self._driver.read_index(self._timeout_s)

    def _group_arg(self, args: dict[str, object]) -> str:
        group = read_str(args.get("group"), "group", 64)
        if not self._driver.state.has_group(group):
            raise AdminError("unknown_group", f"no group {group!r}")
        return group

    async def _status(self, args: dict[str, object]) -> object:
        return self._node.status()

    async def _group_list(self, args: dict[str, object]) -> object:
        await self._linearizable()
        state = self._driver.state
        return [
            {
                "group": g,
                "members": state.member_count(g),
                "msg_id": state.msg_id(g),
                "kek": state.kek(g).fingerprint,
            }
            for g in state.groups
        ]

    async def _group_show(self, args: dict[str, object]) -> object:
        await self._linearizable()
        group = self._group_arg(args)
        state = self._driver.state
        return {
            "group": group,
            "policy": state.policy(group).to_mapping(),
            "members": state.member_count(group),
            "msg_id": state.msg_id(group),
            "kek": {
                "spi": state.kek(group).spi,
                "fingerprint": state.kek(group).fingerprint,
                "expiry_ms": state.kek(group).expiry_ms,
            },
            "teks": [
                {
                    "spi": t.spi,
                    "fingerprint": t.fingerprint,
                    "activation_ms": t.activation_ms,
                    "expiry_ms": t.expiry_ms,
                }
                for t in state.teks(group)
            ],
        }

    def _policy_arg(self, args: dict[str, object]) -> GroupPolicy:
        return GroupPolicy.from_mapping(read_map(args.get("policy"), "policy", 64))

    async def _group_create(self, args: dict[str, object]) -> object:
        result = await self._rekeyer.create_group(self._policy_arg(args))
        if result.rejected:
            raise AdminError("rejected", result.rejected)
        return {"created": True}

    async def _group_update(self, args: dict[str, object]) -> object:
        policy = self._policy_arg(args)
        result = await self._rekeyer.update_policy(policy)
        if result.rejected:
            raise AdminError("rejected", result.rejected)
        return {"msg_ids": [o.msg_id for o in result.outbound]}

    async def _group_delete(self, args: dict[str, object]) -> object:
        await self._linearizable()  # a lagging node must not refuse by stale state
        group = self._group_arg(args)
        return await self._propose(self._rekeyer.encode(DeleteGroup(group, self._rekeyer.now_ms())))

    async def _propose(self, data: bytes) -> object:
        result = await self._driver.propose(data, self._timeout_s)
        if result.rejected:
            raise AdminError("rejected", result.rejected)
        return {"msg_ids": [o.msg_id for o in result.outbound]}

    @property
    def _rekeyer(self) -> Rekeyer:
        assert self._node.rekeyer is not None
        return self._node.rekeyer

    async def _member_list(self, args: dict[str, object]) -> object:
        await self._linearizable()
        group = self._group_arg(args)
        return [
            {
                "member": m.member_id,
                "role": m.role.value,
                "sender_id": m.sender_id,
                "joined_ms": m.joined_ms,
            }
            for m in self._driver.state.members(group)
        ]

    async def _member_evict(self, args: dict[str, object]) -> object:
        await self._linearizable()  # a lagging node must not refuse by stale state
        group = self._group_arg(args)
        member = read_str(args.get("member"), "member", 64)
        if not self._driver.state.is_member(group, member):
            raise AdminError("not_member", f"{member!r} is not a member of {group!r}")
        result = await self._rekeyer.leave(group, member, LeaveReason.EVICT)
        return {"evicted": member, "msg_ids": [o.msg_id for o in result.outbound]}

    async def _rekey(self, args: dict[str, object]) -> object:
        await self._linearizable()  # a lagging node must not refuse by stale state
        group = self._group_arg(args)
        tek = read_bool(args.get("tek", True), "tek")
        kek = read_bool(args.get("kek", False), "kek")
        result = await self._rekeyer.force(group, tek=tek, kek=kek)
        return {"msg_ids": [o.msg_id for o in result.outbound]}

    def _node_arg(self, args: dict[str, object]) -> str:
        node_id = read_str(args.get("node"), "node", 64)
        if not is_valid_id(node_id):
            # Such a voter could never authenticate and would cost the majority.
            raise AdminError("bad_request", f"node: {node_id!r} is not a valid node id")
        return node_id

    async def _conf_change(self, kind: ConfChangeType, args: dict[str, object]) -> object:
        node_id = self._node_arg(args)
        await self._driver.propose_conf_change(ConfChange(kind, node_id))
        return {"proposed": kind.name.lower(), "node": node_id}

    async def _add_node(self, args: dict[str, object]) -> object:
        return await self._conf_change(ConfChangeType.ADD_VOTER, args)

    async def _add_learner(self, args: dict[str, object]) -> object:
        return await self._conf_change(ConfChangeType.ADD_LEARNER, args)

    async def _promote(self, args: dict[str, object]) -> object:
        return await self._conf_change(ConfChangeType.ADD_VOTER, args)

    async def _remove_node(self, args: dict[str, object]) -> object:
        return await self._conf_change(ConfChangeType.REMOVE_NODE, args)

    async def _transfer(self, args: dict[str, object]) -> object:
        target = self._node_arg(args)
        await self._driver.call(lambda raw: raw.transfer_leadership(target))
        return {"transfer_to": target}

    async def _snapshot_save(self, args: dict[str, object]) -> object:
        await self._linearizable()
        state = self._driver.state
        return {"applied_index": state.applied_index, "snapshot": state.snapshot()}

    async def _snapshot_restore(self, args: dict[str, object]) -> object:
        snapshot = args.get("snapshot")
        if not isinstance(snapshot, bytes):
            raise AdminError("bad_request", "snapshot: expected bytes")
        version = self._rekeyer.command_version()
        try:
            # From the backup's first and last items only: one of 100,000
            # members is about 17 MB, and decoding it whole would hold up the
            # event loop (skipping the rest costs about a twelfth of that).
            needs = GroupState.snapshot_version(snapshot)
        except StateError as exc:
            raise AdminError("rejected", str(exc)) from None
        if needs > version:
            # Nodes that apply only older versions cannot read it: they would stop.
            raise AdminError(
                "rejected",
                f"this backup was written by a gcks of command version {needs}; restore it "
                f"once every node runs one (gcks_command_version shows {needs})",
            )
        # In the version checked above, not one a peer's advert changed since.
        return await self._propose(
            encode_command(RestoreState(snapshot, self._rekeyer.now_ms(), version=version))
        )


class AdminClient:
    """One connection to one node's admin API."""

    def __init__(self, stream: trio.SSLStream[Any]) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(MAX_ADMIN_FRAME)
        self._next_id = 1

    @classmethod
    async def connect(
        cls, host: str, port: int, context: ssl.SSLContext, timeout_s: float
    ) -> AdminClient:
        with trio.fail_after(timeout_s):
            tcp = await trio.open_tcp_stream(host, port)
            stream = trio.SSLStream(tcp, context, server_hostname=None)
            await stream.do_handshake()
            verify_peer(stream, CertRole.NODE)
        return cls(stream)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)

    async def call(
        self, op: str, args: dict[str, object] | None = None, *, timeout_s: float = 30
    ) -> object:
        request = AdminRequest(self._next_id, op, args or {})
        self._next_id += 1
        with trio.fail_after(timeout_s):
            await self._stream.send_all(encode_frame(request.encode(), max_size=MAX_ADMIN_FRAME))
            while True:
                frame = self._decoder.next_frame()
                if frame is not None:
                    return decode_answer(frame, request.request_id)
                data = await self._stream.receive_some(_RECEIVE_CHUNK)
                if not data:
                    raise AdminError("closed", "the node closed the connection")
                self._decoder.feed(bytes(data))
