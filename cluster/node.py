"""One GCKS node: every part wired together and run under one nursery.

Startup order matters for safety: the configuration is already validated (a
bad one never gets here); the storage is opened and recovered before anything
listens; the group state is rebuilt from the last snapshot and the committed
log; only then do the listeners bind. On SIGTERM a leader hands leadership to
a caught-up peer before stopping, so a rolling restart costs no election
timeout. SIGKILL at any moment is safe: nothing is acknowledged before fsync.

May import trio and the rest of `gcks.cluster`; this is the composition root.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from gcks.cluster import tlsreload
from gcks.cluster.admin import AdminServer
from gcks.cluster.config import Address, NodeConfig
from gcks.cluster.driver import DriverSettings, RaftDriver
from gcks.cluster.logthrottle import LogThrottle
from gcks.cluster.multicast import RekeySender
from gcks.cluster.ops import MetricFamily, MetricType, Sample, readiness, serve_ops
from gcks.cluster.peer import PeerTransport
from gcks.cluster.probe import ProbeResponder
from gcks.cluster.raft.errors import RaftError
from gcks.cluster.raft.raft import RaftConfig, RawNode
from gcks.cluster.raft.storage import DiskStorage
from gcks.cluster.raft.types import ConfState
from gcks.cluster.raft.types import Role as RaftRole
from gcks.cluster.registrar import Registrar, RegistrarSettings
from gcks.cluster.rekeyer import Rekeyer, RekeyerSettings
from gcks.cluster.state import ApplyResult, GroupState
from gcks.cluster.versions import (
    ADVERTISE_INTERVAL_S,
    UNANNOUNCED_VERSION,
    PeerVersions,
    decode_advert,
    encode_advert,
)
from gcks.proto.errors import DecodeError
from gcks.proto.messages import NodeEndpoint

log = logging.getLogger(__name__)

# The first byte of every peer payload names its consumer: Raft, the
# membership requests followers forward to the leader's batch, or the command
# version a node applies (`gcks.cluster.versions`).
_RAFT, _MEMBERSHIP, _VERSIONS = b"\x00", b"\x01", b"\x02"


class _PeerChannel:
    """One consumer's share of the peer transport: its payloads carry `tag` first."""

    def __init__(self, transport: PeerTransport, tag: bytes) -> None:
        self._transport = transport
        self._tag = tag

    def send(self, peer_id: str, payload: bytes) -> bool:
        return self._transport.send(peer_id, self._tag + payload)


@dataclass
class Bound:
    """Where the node's listeners ended up (port 0 in tests picks a free one)."""

    peer: list[Address]
    member: list[Address]
    admin: list[Address]


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.storage: DiskStorage | None = None
        self.driver: RaftDriver | None = None
        self.registrar: Registrar | None = None
        self.rekeyer: Rekeyer | None = None
        self.sender: RekeySender | None = None
        self.transport: PeerTransport | None = None
        self.tls: tlsreload.NodeTls | None = None
        self.stopping = False
        self.probe = ProbeResponder(config.node_id)
        self.versions = PeerVersions(config.node_id)
        # A newer peer may send what this node cannot read, every few seconds
        # (a version advert of a later gcks, say): a line a minute per kind.
        self._peer_warnings = LogThrottle()

    def nodes(self) -> tuple[NodeEndpoint, ...]:
        """The cluster's member-facing endpoints, for GSAs (failover list)."""
        return tuple(
            NodeEndpoint(node_id, str(entry.member), str(entry.probe))
            for node_id, entry in sorted(self.config.peers.items())
        )

    def _on_install(self, state: GroupState) -> None:
        assert self.registrar is not None
        self.registrar.reconcile(state)

    def _on_apply(self, index: int, result: ApplyResult, *, replay: bool) -> None:
        assert self.registrar is not None
        assert self.sender is not None
        if result.rejected:
            log.info("entry %d changed nothing: %s", index, result.rejected)
        assert self.rekeyer is not None
        self.rekeyer.on_apply(result)
        for group, member_id, _reason in result.left:
            self.registrar.detach(group, member_id)
        if not replay:  # else sent before the restart; members resync if they missed it
            for outbound in result.outbound:
                self.sender.submit(outbound)
                self.registrar.push(outbound)
        # After the pushes: a member this entry joins gets a GSA that already
        # holds the entry's keys, so its push would be a wasted write.
        self.registrar.on_apply(result)

    async def run(self, *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        storage = await trio.to_thread.run_sync(
            DiskStorage.open, cfg.data_dir / "raft", cfg.storage_key
        )
        self.storage = storage
        try:
            await self._run(storage, task_status)
        finally:
            await trio.to_thread.run_sync(storage.close)

    async def _run(self, storage: DiskStorage, task_status: trio.TaskStatus[Bound]) -> None:
        cfg = self.config
        recovered = storage.initial_state()
        state = GroupState()
        if recovered.snapshot is not None:
            state = GroupState.restore(recovered.snapshot.data)
            state.applied_index = recovered.snapshot.meta.index
        raw = RawNode(
            RaftConfig(
                id=cfg.node_id,
                election_tick=cfg.raft.election_ticks,
                heartbeat_tick=cfg.raft.heartbeat_ticks,
                # Fresh at every start: seeded by the node id, nodes named
                # alike (gcks-node-0, gcks-node-1: the same first 8 bytes) drew
                # the same election timeouts and split their votes, and a
                # restarted node repeated its own.
                seed=int.from_bytes(os.urandom(8), "big"),
            ),
            # A brand-new data directory bootstraps the configured cluster, unless
            # the node joins a running one (it then learns the configuration from
            # the leader); an existing directory recovers its own configuration.
            conf=ConfState() if cfg.join else ConfState(voters=frozenset(cfg.peers)),
            hard_state=recovered.hard_state,
            entries=recovered.entries,
            snapshot=recovered.snapshot,
        )
        node_tls = self.tls = tlsreload.NodeTls(cfg.tls, cfg.node_id, scratch=cfg.data_dir)
        transport = PeerTransport(
            cfg.node_id,
            cfg.peer_listen,
            {i: e.peer for i, e in cfg.other_peers.items()},
            server_context=node_tls.peer_server,
            client_context=node_tls.peer_client,
            settings=cfg.peer_link,
        )
        self.transport = transport
        driver = RaftDriver(
            raw,
            storage,
            state,
            _PeerChannel(transport, _RAFT),
            DriverSettings(
                tick_s=cfg.raft.tick_ms / 1000, snapshot_every=cfg.raft.snapshot_entries
            ),
            on_apply=self._on_apply,
            on_install=self._on_install,
            replay_until=recovered.hard_state.commit,
            link_up=lambda peer: (
                (stats := transport.stats.peers.get(peer)) is not None and stats.connected
            ),
        )
        self.driver = driver
        rekeyer = Rekeyer(
            driver,
            RekeyerSettings(),
            bootstrap_groups=cfg.groups,
            forward=_PeerChannel(transport, _MEMBERSHIP).send,
            command_version=self.command_version,
        )
        self.rekeyer = rekeyer
        self.sender = RekeySender(
            cfg.multicast.interface, cfg.multicast.ttl, interface6=cfg.multicast.interface6
        )
        self.registrar = Registrar(
            driver,
            rekeyer,
            self.nodes(),
            node_tls.member_server,
            RegistrarSettings(
                handshake_timeout_s=cfg.member_link.handshake_timeout_ms / 1000,
                max_connections=cfg.member_link.max_connections,
                max_connections_per_member=cfg.member_link.max_connections_per_member,
            ),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(self.sender.run)
            await nursery.start(driver.run)
            peer_bound = await nursery.start(transport.run)
            nursery.start_soon(self._pump, transport, driver, rekeyer)
            nursery.start_soon(self._advertise, _PeerChannel(transport, _VERSIONS))
            member_bound = await nursery.start(self.registrar.serve, cfg.member_listen)
            await nursery.start(rekeyer.run)
            await nursery.start(self.probe.serve, cfg.probe_listen.host, cfg.probe_listen.port)
            admin = AdminServer(self, node_tls.admin_server)
            admin_bound = await nursery.start(admin.serve, cfg.admin_listen)
            await nursery.start(serve_ops, self, cfg.ops_listen.host, cfg.ops_listen.port)
            nursery.start_soon(self._signals, nursery.cancel_scope)
            await nursery.start(tlsreload.watch, node_tls)
            log.info("node %s started", cfg.node_id)
            task_status.started(Bound(peer=peer_bound, member=member_bound, admin=admin_bound))

    async def _pump(self, transport: PeerTransport, driver: RaftDriver, rekeyer: Rekeyer) -> None:
        async for from_id, payload in transport.incoming:
            channel, body = payload[:1], payload[1:]
            if channel == _RAFT:
                driver.deliver(from_id, body)
            elif channel == _MEMBERSHIP:
                rekeyer.deliver(from_id, body)
            elif channel == _VERSIONS:
                try:
                    self.versions.heard(from_id, decode_advert(body), trio.current_time())
                except DecodeError as exc:
                    if self._peer_warnings.ready(("advert", from_id)):
                        log.warning("dropped a malformed version advert from %s: %s", from_id, exc)
            elif self._peer_warnings.ready(("kind", channel)):
                log.warning(
                    "dropped a peer frame of unknown kind %s from %s (a newer gcks?); "
                    "more are not logged for a minute",
                    channel.hex() or "(empty)",
                    from_id,
                )

    async def _advertise(self, channel: _PeerChannel) -> None:
        advert = encode_advert()
        while True:
            for peer_id in self.config.other_peers:
                channel.send(peer_id, advert)
            await trio.sleep(ADVERTISE_INTERVAL_S)

    def command_version(self) -> int:
        """The command version to propose in: the newest every node applies."""
        if self.driver is None:
            return UNANNOUNCED_VERSION
        conf = self.driver.status.conf
        usable = self.versions.usable(conf.voters | conf.learners, trio.current_time())
        # Never below an entry already applied: a node of an older version stops
        # there anyway, and a node merely quiet for a while (a restart) must not
        # bring back what version 1 lacks.
        return max(usable, self.driver.state.newest_version)

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: stopping", signal.Signals(signum).name)
                await self.stop()
                scope.cancel()
                return

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Graceful stop: a leader first hands leadership to a caught-up voter."""
        self.stopping = True
        driver = self.driver
        if driver is None or driver.status.role is not RaftRole.LEADER:
            return
        target = _best_transferee(driver.status.progress, driver.status.conf, self.config.node_id)
        if target is None:
            return
        log.info("transferring leadership to %s before stopping", target)
        with trio.move_on_after(timeout_s):
            try:
                await driver.call(lambda raw: raw.transfer_leadership(target))
            except RaftError as exc:
                log.warning("leadership transfer to %s refused: %s", target, exc)
                return
            while driver.status.role is RaftRole.LEADER:
                await driver.wait_status_change()

    def ready(self) -> tuple[bool, str]:
        driver = self.driver
        if driver is None or self.stopping:
            return False, "starting" if driver is None else "stopping"
        st = driver.status
        return readiness(
            in_cluster=self.config.node_id in st.conf.voters | st.conf.learners,
            leader=st.leader,
            commit_index=st.commit,
            applied_index=driver.state.applied_index,
        )

    def metrics(self) -> Iterable[MetricFamily]:
        driver, registrar, sender = self.driver, self.registrar, self.sender
        if driver is None or registrar is None or sender is None or self.rekeyer is None:
            return
        st, state = driver.status, driver.state

        def one(name: str, kind: MetricType, text: str, value: float) -> MetricFamily:
            return MetricFamily(name, kind, text, (Sample(value),))

        gauge, counter = MetricType.GAUGE, MetricType.COUNTER
        yield one("gcks_raft_term", gauge, "Current Raft term.", st.term)
        yield MetricFamily(
            "gcks_raft_role",
            gauge,
            "1 for this node's current Raft role.",
            tuple(Sample(1 if st.role is r else 0, {"role": r.value}) for r in RaftRole),
        )
        yield one("gcks_raft_commit_index", gauge, "Highest committed log index.", st.commit)
        yield one(
            "gcks_raft_applied_index", gauge, "Highest applied log index.", state.applied_index
        )
        yield one(
            "gcks_raft_leader_changes_total", counter, "Leader changes seen.", driver.leader_changes
        )
        yield one("gcks_raft_proposals_total", counter, "Proposals submitted.", driver.proposals)
        yield one(
            "gcks_command_version",
            gauge,
            "Command version this node proposes in: the newest that every node applies.",
            self.command_version(),
        )
        yield one(
            "gcks_registrations_total",
            counter,
            "Successful member registrations.",
            registrar.stats.registrations,
        )
        yield one(
            "gcks_registration_errors_total",
            counter,
            "Refused or failed registrations.",
            registrar.stats.registration_errors,
        )
        yield one(
            "gcks_rekeys_sent_total", counter, "Rekey datagrams multicast.", sender.stats.sent
        )
        yield one(
            "gcks_rekeys_too_large_total",
            counter,
            "Rekey datagrams over the UDP limit: pushed only, not multicast.",
            sender.stats.too_large,
        )
        yield one(
            "gcks_rekeys_send_errors_total",
            counter,
            "Rekey datagrams not multicast: a send error or an IPv6 group.",
            sender.stats.errors,
        )
        yield one(
            "gcks_rekeys_dropped_total",
            counter,
            "Rekey datagrams dropped before sending: the send queue was full.",
            sender.stats.dropped,
        )
        yield one(
            "gcks_rekey_pushes_total", counter, "Rekey datagrams pushed.", registrar.stats.pushes
        )
        yield one(
            "gcks_rekey_pushes_dropped_total",
            counter,
            "Pushes dropped on full member queues.",
            registrar.stats.pushes_dropped,
        )
        yield one("gcks_members_attached", gauge, "Member connections here.", registrar.attached)
        yield one(
            "gcks_member_connections_refused_total",
            counter,
            "Member connections closed unserved: over the limit, a failed handshake "
            "or a wrong role.",
            registrar.stats.refused,
        )
        yield one(
            "gcks_member_connections_evicted_total",
            counter,
            "Member connections closed for a newer one of the same member id "
            "(over max_connections_per_member).",
            registrar.stats.evicted,
        )
        yield one(
            "gcks_member_handshakes_waiting",
            gauge,
            "Member handshakes with bytes to work on, waiting for their turn (oldest first).",
            registrar.handshakes_waiting,
        )
        if self.tls is not None:
            yield one(
                "gcks_tls_cert_expiry_timestamp_seconds",
                gauge,
                "When the certificate this node presents expires (Unix time).",
                self.tls.expiry.timestamp(),
            )
            yield one("gcks_tls_reloads_total", counter, "TLS files reloaded.", self.tls.reloads)
            yield one(
                "gcks_tls_reload_failures_total",
                counter,
                "Changed TLS files refused (the old certificate stays).",
                self.tls.reload_failures,
            )
        yield MetricFamily(
            "gcks_group_members",
            gauge,
            "Members per group.",
            tuple(Sample(state.member_count(g), {"group": g}) for g in state.groups),
        )
        yield MetricFamily(
            "gcks_peer_lag_entries",
            gauge,
            "Leader only: entries a peer is behind the leader's log.",
            tuple(
                Sample(max(0, st.commit - p.match), {"peer": pid})
                for pid, p in st.progress.items()
                if pid != st.id
            ),
        )
        yield MetricFamily(
            "gcks_peer_recent_active",
            gauge,
            "Leader only: 1 if the peer answered within the last election timeout.",
            tuple(
                Sample(1 if p.recent_active else 0, {"peer": pid})
                for pid, p in st.progress.items()
                if pid != st.id
            ),
        )
        if self.transport is not None:
            peers = self.transport.stats.peers
            yield MetricFamily(
                "gcks_peer_connected",
                gauge,
                "1 if the outbound link to the peer is up.",
                tuple(Sample(1 if ps.connected else 0, {"peer": pid}) for pid, ps in peers.items()),
            )
            for attribute, help_text in (
                ("frames_dropped", "Frames dropped on a full send queue."),
                ("frames_sent", "Frames written to the outbound link."),
                ("bytes_sent", "Bytes written to the outbound link (before TLS)."),
                ("disconnects", "Outbound links lost."),
            ):
                yield MetricFamily(
                    f"gcks_peer_{attribute}_total",
                    counter,
                    help_text,
                    tuple(
                        Sample(getattr(ps, attribute), {"peer": pid}) for pid, ps in peers.items()
                    ),
                )

    def status(self) -> dict[str, Any]:
        """`/status` and `gcks admin cluster status`: the fields external tools parse."""
        driver = self.driver
        if driver is None:
            return {"id": self.config.node_id, "role": "starting"}
        st = driver.status
        role = st.role.value if st.role is not RaftRole.PRE_CANDIDATE else "candidate"
        return {
            "id": st.id,
            "role": role,
            "term": st.term,
            "leader": st.leader,
            "commit_index": st.commit,
            "applied_index": driver.state.applied_index,
            "voters": sorted(st.conf.voters),
            "learners": sorted(st.conf.learners),
            "peers": {
                pid: {
                    "match": p.match,
                    "next": p.next,
                    "state": str(p.state),
                    "active": p.recent_active,
                }
                for pid, p in st.progress.items()
            },
            "groups": {
                g: {
                    "members": driver.state.member_count(g),
                    "msg_id": driver.state.msg_id(g),
                    "kek": driver.state.kek(g).fingerprint,
                }
                for g in driver.state.groups
            },
        }


def _best_transferee(progress: Mapping[str, Any], conf: ConfState, me: str) -> str | None:
    """The voter most likely to take over at once: recently heard from (the flag
    is reset every election timeout, so it is a preference, not a filter), then
    the most caught up."""
    candidates = [
        (pr.recent_active, pr.match, pid)
        for pid, pr in progress.items()
        if pid != me and pid in conf.voters
    ]
    return max(candidates)[2] if candidates else None
