"""UDP latency probes from a member to every known node: the trio driver.

One probe round sends `probes_per_round` `ProbeRequest`s to every candidate's
probe address, `spacing_s` apart, each with a fresh random 16-byte nonce, over
one UDP socket. A response counts only if it decodes as a `ProbeResponse`
whose nonce is pending and arrives before that probe's deadline (`timeout_s`);
its RTT is measured with `trio.current_time()`. The 128-bit nonce is what
authenticates a response: an off-path sender cannot guess it, so datagrams
from anyone else are dropped and counted (`unmatched`, `malformed`), and the
source address is not relied on (a proxy or NAT may answer for the node).

Node ids: a statically configured candidate must answer with its configured id
(anything else is `wrong_node` and a lost probe: a misconfigured address book
must not steer the member). A DNS-discovered candidate has no id; the first
response names it, and the id is remembered per probe address, so later lost
probes count against that node.

Each outcome (RTT or loss) is recorded into a `gcks.member.ranking.Ranking`;
the caller then decides (`choose_initial`, `on_round_complete`). May import
trio, `gcks.proto` and `gcks.member`; never imports `gcks.cluster`.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from gcks.member.discovery import Candidate
from gcks.member.ranking import Ranking
from gcks.proto.errors import DecodeError
from gcks.proto.messages import (
    NONCE_SIZE,
    NodeEndpoint,
    ProbeRequest,
    ProbeResponse,
    decode_message,
    parse_host_port,
)

__all__ = [
    "DatagramSocket",
    "ProbeConfig",
    "ProbeCounters",
    "Prober",
    "RoundResult",
    "open_probe_socket",
]

log = logging.getLogger(__name__)

# A ProbeResponse is under 100 bytes; anything larger is not one.
_RECEIVE_SIZE: Final = 512


class DatagramSocket(Protocol):
    """What the prober needs of a UDP socket (a trio socket; a fake in tests)."""

    def sendto(self, data: bytes, address: tuple[str, int], /) -> Awaitable[int]: ...

    def recvfrom(self, bufsize: int, /) -> Awaitable[tuple[bytes, Any]]: ...


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """Probe round shape. `timeout_s` is the deadline of one probe: an answer
    later than that is a loss, so it bounds a round to about
    `timeout_s + (probes_per_round - 1) * spacing_s`."""

    probes_per_round: int = 3
    timeout_s: float = 1.0
    spacing_s: float = 0.02

    def __post_init__(self) -> None:
        if not 1 <= self.probes_per_round <= 64:
            raise ValueError("probes_per_round must be in [1, 64]")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError("timeout_s must be finite and > 0")
        if not (math.isfinite(self.spacing_s) and self.spacing_s >= 0):
            raise ValueError("spacing_s must be finite and >= 0")


@dataclass(slots=True)
class ProbeCounters:
    """Monotonic counters over the prober's life (for metrics and tests)."""

    sent: int = 0
    answered: int = 0
    lost: int = 0  # no valid answer before the deadline (late answers included)
    late: int = 0  # matched a probe whose deadline had passed
    unmatched: int = 0  # a ProbeResponse with no pending nonce (stale, duplicate, forged)
    malformed: int = 0  # not a gcks message, or not a ProbeResponse
    wrong_node: int = 0  # answered with another node id than configured
    send_errors: int = 0
    receive_errors: int = 0


@dataclass(frozen=True, slots=True)
class RoundResult:
    """What one round found. `rtts`: every outcome per node id (ms, `None` = lost);
    `endpoints`: where each node id registers; `silent`: DNS candidates that
    have never answered, so have no node id yet."""

    rtts: dict[str, list[float | None]] = field(default_factory=dict)
    endpoints: dict[str, NodeEndpoint] = field(default_factory=dict)
    silent: tuple[Candidate, ...] = ()


@dataclass(slots=True)
class _Pending:
    index: int  # candidate index in this round
    sent_at: float
    deadline: float


class Prober:
    """Runs probe rounds over one socket it does not own (see `open_probe_socket`)."""

    def __init__(
        self,
        sock: DatagramSocket,
        config: ProbeConfig | None = None,
        *,
        nonces: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._sock = sock
        self.config = config or ProbeConfig()
        self._nonces = nonces
        self.counters = ProbeCounters()
        self._learned: dict[str, str] = {}  # DNS candidate probe_addr -> node id
        self._running = False

    async def probe_round(self, candidates: Sequence[Candidate], ranking: Ranking) -> RoundResult:
        """Probe every candidate, record the outcomes into `ranking`, return them.

        Takes at most about `timeout_s` after the last probe is sent. One round
        at a time: two rounds on one socket would read each other's answers."""
        if self._running:
            raise RuntimeError("a probe round is already running on this prober")
        if not candidates:
            return RoundResult()
        self._running = True
        try:
            return await self._probe_round(candidates, ranking)
        finally:
            self._running = False

    async def _probe_round(self, candidates: Sequence[Candidate], ranking: Ranking) -> RoundResult:
        outcomes: list[list[float | None]] = [[] for _ in candidates]
        ids: list[str | None] = [
            candidate.node_id or self._learned.get(candidate.probe_addr) for candidate in candidates
        ]
        # Drawn before any task starts, so a broken nonce source fails plainly.
        nonces = [
            self._nonces(NONCE_SIZE) for _ in range(self.config.probes_per_round * len(candidates))
        ]
        if len(set(nonces)) != len(nonces) or any(len(nonce) != NONCE_SIZE for nonce in nonces):
            raise RuntimeError("nonce source returned a wrong-sized or repeated nonce")
        pending: dict[bytes, _Pending] = {}
        sending_done = False
        all_answered = trio.Event()

        def settle(entry: _Pending, rtt_ms: float | None) -> None:
            outcomes[entry.index].append(rtt_ms)
            if rtt_ms is None:
                self.counters.lost += 1
            else:
                self.counters.answered += 1
            if sending_done and not pending:
                all_answered.set()

        async def receive() -> None:
            while True:
                try:
                    data, _source = await self._sock.recvfrom(_RECEIVE_SIZE)
                except OSError as exc:
                    # e.g. an ICMP error queued on the socket; the next read waits again.
                    self.counters.receive_errors += 1
                    log.debug("probe socket receive error: %s", exc)
                    continue
                now = trio.current_time()
                response = self._decode(data)
                if response is None:
                    continue
                entry = pending.pop(response.nonce, None)
                if entry is None:
                    self.counters.unmatched += 1
                    continue
                if now > entry.deadline:
                    self.counters.late += 1
                    settle(entry, None)
                    continue
                if not self._accept_id(candidates[entry.index], response.node_id, ids, entry):
                    settle(entry, None)
                    continue
                settle(entry, (now - entry.sent_at) * 1000.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            for round_index in range(self.config.probes_per_round):
                if round_index:
                    await trio.sleep(self.config.spacing_s)
                for index, candidate in enumerate(candidates):
                    nonce = nonces.pop()
                    await self._send(index, candidate, nonce, pending, outcomes)
            sending_done = True
            if pending:
                last_deadline = max(entry.deadline for entry in pending.values())
                with trio.move_on_at(last_deadline):
                    await all_answered.wait()
            nursery.cancel_scope.cancel()
        for entry in pending.values():
            settle(entry, None)
        pending.clear()
        return self._record(candidates, ids, outcomes, ranking)

    def _decode(self, data: bytes) -> ProbeResponse | None:
        try:
            message = decode_message(data, max_size=_RECEIVE_SIZE)
        except DecodeError:
            self.counters.malformed += 1
            return None
        if not isinstance(message, ProbeResponse):
            self.counters.malformed += 1
            return None
        return message

    def _accept_id(
        self, candidate: Candidate, node_id: str, ids: list[str | None], entry: _Pending
    ) -> bool:
        if candidate.node_id is not None:
            if node_id != candidate.node_id:
                self.counters.wrong_node += 1
                log.debug(
                    "probe to %s answered by %r, configured as %r",
                    candidate.probe_addr,
                    node_id,
                    candidate.node_id,
                )
                return False
            return True
        # A DNS address may be reused by another node (a rescheduled pod): follow it.
        self._learned[candidate.probe_addr] = node_id
        ids[entry.index] = node_id
        return True

    async def _send(
        self,
        index: int,
        candidate: Candidate,
        nonce: bytes,
        pending: dict[bytes, _Pending],
        outcomes: list[list[float | None]],
    ) -> None:
        datagram = ProbeRequest(nonce).encode()
        try:
            address = parse_host_port(candidate.probe_addr, "probe_addr")
            await self._sock.sendto(datagram, address)
        except (DecodeError, OSError) as exc:
            self.counters.send_errors += 1
            self.counters.lost += 1
            outcomes[index].append(None)
            log.debug("probe to %s not sent: %s", candidate.probe_addr, exc)
            return
        self.counters.sent += 1
        now = trio.current_time()
        pending[nonce] = _Pending(index, now, now + self.config.timeout_s)

    def _record(
        self,
        candidates: Sequence[Candidate],
        ids: list[str | None],
        outcomes: list[list[float | None]],
        ranking: Ranking,
    ) -> RoundResult:
        now = trio.current_time()
        rtts: dict[str, list[float | None]] = {}
        endpoints: dict[str, NodeEndpoint] = {}
        silent: list[Candidate] = []
        for candidate, node_id, node_outcomes in zip(candidates, ids, outcomes, strict=True):
            if node_id is None:
                silent.append(candidate)
                continue
            for rtt in node_outcomes:
                ranking.record_probe(node_id, rtt, now)
            rtts.setdefault(node_id, []).extend(node_outcomes)
            endpoints[node_id] = NodeEndpoint(node_id, candidate.member_addr, candidate.probe_addr)
        return RoundResult(rtts, endpoints, tuple(silent))


def open_probe_socket() -> trio.socket.SocketType:
    """A UDP socket for probes to IPv4 and IPv6 nodes alike (bind happens on
    first send, to an ephemeral port). The caller closes it
    (`with open_probe_socket() as sock:`).

    Dual-stack IPv6 where the host has IPv6: IPv4 nodes are reached through
    v4-mapped addresses (trio resolves with AI_V4MAPPED), so one socket and one
    receive loop serve a mixed address book. Plain IPv4 where the host has no
    IPv6 (`ipv6.disable=1`) or cannot turn IPV6_V6ONLY off."""
    try:
        sock = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_DGRAM)
    except OSError:
        return trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    try:
        sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 0)
    except OSError:
        sock.close()
        return trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    return sock
