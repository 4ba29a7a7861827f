"""Where the member finds GCKS nodes: a static list, or a DNS name.

- Static: the configured `NodeEndpoint`s (node id, registration address, probe
  address), as given, plus the nodes the cluster's own address book (sent in
  every GSA answer) names that the configuration does not: a node added to the
  cluster later is found without touching every member's configuration.
- DNS: a name with one address record per node, as a Kubernetes headless
  service gives for a StatefulSet. Every address becomes a `Candidate` with the
  configured member and probe ports and no node id: the id is learned from that
  address's probe responses (`gcks.member.probe`). The name is re-resolved
  every `interval_s`, so nodes that come and go (rescheduled pods with new
  addresses) are followed. A failed resolution keeps the last good list: a DNS
  hiccup must not make the member forget a working cluster.

Resolution goes through an injectable `Resolver` (default: `getaddrinfo` via
trio, under `timeout_s`), so tests never touch real DNS. May import trio and
`gcks.proto`; never imports `gcks.cluster`.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

import trio

from gcks.proto.errors import DecodeError
from gcks.proto.messages import MAX_NODES, NodeEndpoint, parse_host_port

__all__ = [
    "Candidate",
    "Discovery",
    "DiscoveryError",
    "DnsConfig",
    "Resolver",
    "resolve_addresses",
]

log = logging.getLogger(__name__)

Resolver = Callable[[str], Awaitable[Sequence[str]]]
"""Resolves a DNS name to IP address strings; raises `OSError` on failure."""

_MAX_PORT: Final = 65_535


class DiscoveryError(Exception):
    """Nodes could not be discovered (DNS failure or timeout); the message says why."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A node to probe. `node_id` is known for a static list and `None` for a
    DNS-discovered address until a probe response names it."""

    member_addr: str  # "host:port" of the node's member TLS listener
    probe_addr: str  # "host:port" of the node's UDP probe responder
    node_id: str | None = None


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """DNS discovery: `name` resolves to one address per node; every node
    listens on `member_port` (registration) and `probe_port` (UDP probes)."""

    name: str
    member_port: int
    probe_port: int
    interval_s: float = 30.0  # re-resolution period
    timeout_s: float = 5.0  # deadline of one resolution
    max_nodes: int = MAX_NODES  # addresses beyond this are ignored (and logged)

    def __post_init__(self) -> None:
        for port in (self.member_port, self.probe_port):
            if not 1 <= port <= _MAX_PORT:
                raise ValueError(f"port {port} out of range [1, {_MAX_PORT}]")
        try:
            parse_host_port(f"{self.name}:{self.member_port}", "name")
        except DecodeError as exc:
            raise ValueError(f"invalid DNS name {self.name[:80]!r}: {exc}") from None
        for field_name in ("interval_s", "timeout_s"):
            value = getattr(self, field_name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{field_name} must be finite and > 0")
        if not 1 <= self.max_nodes <= MAX_NODES:
            raise ValueError(f"max_nodes must be in [1, {MAX_NODES}]")


async def resolve_addresses(name: str) -> list[str]:
    """Every address `name` resolves to (A and AAAA records), via getaddrinfo."""
    infos = await trio.socket.getaddrinfo(name, None, type=trio.socket.SOCK_DGRAM)
    return [str(info[4][0]) for info in infos]


def _host_port(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


class Discovery:
    """The current candidate nodes; build with `static()` or `dns()`."""

    def __init__(
        self,
        *,
        static: Sequence[NodeEndpoint] = (),
        dns: DnsConfig | None = None,
        resolver: Resolver = resolve_addresses,
    ) -> None:
        if dns is None and not static:
            raise ValueError("discovery needs a static node list or a DNS name")
        if dns is not None and static:
            raise ValueError("discovery takes a static node list or a DNS name, not both")
        self._dns = dns
        self._resolver = resolver
        self.resolutions = 0  # successful DNS resolutions
        self.failures = 0  # failed DNS resolutions
        self._configured = tuple(self._static_candidates(static))
        self._candidates = self._configured

    @classmethod
    def static(cls, endpoints: Sequence[NodeEndpoint]) -> Discovery:
        """Discovery from a fixed list; raises `ValueError` for bad addresses or ids."""
        return cls(static=endpoints)

    @classmethod
    def dns(cls, config: DnsConfig, resolver: Resolver = resolve_addresses) -> Discovery:
        """Discovery by resolving `config.name`; nothing is resolved until `refresh()`."""
        return cls(dns=config, resolver=resolver)

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        """The last known candidates (empty for DNS before the first resolution)."""
        return self._candidates

    @staticmethod
    def _static_candidates(endpoints: Sequence[NodeEndpoint]) -> list[Candidate]:
        if len(endpoints) > MAX_NODES:
            raise ValueError(f"at most {MAX_NODES} nodes")
        seen: set[str] = set()
        candidates = []
        for endpoint in endpoints:
            try:
                endpoint.member_host_port  # noqa: B018 - validation only
                endpoint.probe_host_port  # noqa: B018
            except DecodeError as exc:
                raise ValueError(f"node {endpoint.node_id!r}: {exc}") from None
            if endpoint.node_id in seen:
                raise ValueError(f"node {endpoint.node_id!r} listed twice")
            seen.add(endpoint.node_id)
            candidates.append(
                Candidate(endpoint.member_addr, endpoint.probe_addr, endpoint.node_id)
            )
        return candidates

    def learn(self, book: Sequence[NodeEndpoint]) -> bool:
        """Take the cluster's address book from a GSA answer (static lists only;
        DNS stays the source of truth). Nodes it names that the configuration
        does not are added; nodes learned earlier that it no longer names are
        dropped. Configured nodes always stay, at their configured addresses: a
        member may reach a node by another address than the cluster's book
        gives. Returns whether the candidates changed."""
        if self._dns is not None:
            return False
        configured = {candidate.node_id for candidate in self._configured}
        learned = [
            Candidate(endpoint.member_addr, endpoint.probe_addr, endpoint.node_id)
            for endpoint in book
            if endpoint.node_id not in configured
        ]
        candidates = (*self._configured, *learned)[:MAX_NODES]
        changed = candidates != self._candidates
        self._candidates = candidates
        return changed

    async def refresh(self) -> tuple[Candidate, ...]:
        """Re-resolve (DNS) and return the candidates. Raises `DiscoveryError` on
        failure, keeping the previous list; a static list is returned as is."""
        config = self._dns
        if config is None:
            return self._candidates
        try:
            with trio.fail_after(config.timeout_s):
                resolved = await self._resolver(config.name)
        except trio.TooSlowError:
            self.failures += 1
            raise DiscoveryError(
                f"resolving {config.name!r} took longer than {config.timeout_s} s"
            ) from None
        except OSError as exc:
            self.failures += 1
            raise DiscoveryError(f"resolving {config.name!r} failed: {exc}") from None
        addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        for text in resolved:
            try:
                addresses.add(ipaddress.ip_address(text))
            except ValueError:
                log.warning("discovery: %r resolved to a non-address entry, ignored", config.name)
        if not addresses:
            self.failures += 1
            raise DiscoveryError(f"{config.name!r} resolved to no usable address")
        ordered = sorted(addresses, key=lambda address: (address.version, address))
        if len(ordered) > config.max_nodes:
            log.warning(
                "discovery: %r resolved to %d addresses, using the first %d",
                config.name,
                len(ordered),
                config.max_nodes,
            )
            ordered = ordered[: config.max_nodes]
        self.resolutions += 1
        self._candidates = tuple(
            Candidate(
                _host_port(address, config.member_port), _host_port(address, config.probe_port)
            )
            for address in ordered
        )
        return self._candidates

    async def watch(
        self,
        on_change: Callable[[tuple[Candidate, ...]], None],
        *,
        task_status: trio.TaskStatus[tuple[Candidate, ...]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Run until cancelled: report the first list through `task_status` (after
        the first resolution attempt; possibly empty), then call `on_change`
        whenever a re-resolution gives a different list. Failures are logged
        and counted; the last good list stays in force."""
        current = await self._refresh_logged()
        task_status.started(current)
        if self._dns is None:
            await trio.sleep_forever()
        while True:
            await trio.sleep(self._dns.interval_s)
            candidates = await self._refresh_logged()
            if candidates != current:
                current = candidates
                on_change(candidates)

    async def _refresh_logged(self) -> tuple[Candidate, ...]:
        try:
            return await self.refresh()
        except DiscoveryError as exc:
            log.warning("discovery: %s; keeping %d known nodes", exc, len(self._candidates))
            return self._candidates
