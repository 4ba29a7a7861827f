"""The node's UDP probe responder: members measure their RTT to this node.

A member sends `ProbeRequest(nonce)`; the responder answers at once with
`ProbeResponse(nonce, node_id)` to the datagram's source. Nothing is kept per
request, so the responder holds no state an attacker could grow except the
rate-limit table, which is bounded.

UDP sources can be forged and the response is larger than the request, so an
unlimited responder would be a (small) traffic amplifier aimed at whoever the
forged source names. Two token buckets bound that: one per source IP address
(ports are free for an attacker to vary, so they are not part of the key) and
one for the whole responder, which also caps the output when the per-source
table is churned by many forged addresses. Datagrams over either limit, and
datagrams that do not decode as a `ProbeRequest`, are dropped and counted;
drops are logged at debug level at most once per `log_interval_s`, with the
counts, never with payload bytes.

`RateLimiter` is sans-IO (time passed in); `ProbeResponder` is the thin trio
driver. May import trio and `gcks.proto`; never imports `gcks.member`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from typing import Final, NoReturn

import trio

from gcks.proto.errors import DecodeError
from gcks.proto.messages import ProbeRequest, ProbeResponse, decode_message

__all__ = ["ProbeCounters", "ProbeResponder", "RateLimiter", "ResponderConfig"]

log = logging.getLogger(__name__)

# A ProbeRequest is under 32 bytes; anything near this size is garbage anyway,
# and a larger datagram is truncated by the kernel and then fails to decode.
_RECEIVE_SIZE: Final = 512


@dataclasses.dataclass(frozen=True, slots=True)
class ResponderConfig:
    """Rate limits (probes per second, burst in probes) and logging of drops.

    Defaults allow a member's probe round (a few probes at once) many times over
    while one forged source gets at most `per_source_rate` answers a second."""

    per_source_rate: float = 20.0
    per_source_burst: float = 20.0
    total_rate: float = 2_000.0
    total_burst: float = 500.0
    max_sources: int = 4_096  # entries in the per-source table (LRU)
    log_interval_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("per_source_rate", "per_source_burst", "total_rate", "total_burst"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0")
        if self.max_sources < 1:
            raise ValueError("max_sources must be at least 1")
        if not (math.isfinite(self.log_interval_s) and self.log_interval_s >= 0):
            raise ValueError("log_interval_s must be finite and >= 0")


@dataclasses.dataclass(slots=True)
class ProbeCounters:
    """Monotonic counters for `/metrics`."""

    received: int = 0  # datagrams read from the socket
    answered: int = 0  # responses sent
    malformed: int = 0  # did not decode as a gcks message
    unexpected: int = 0  # decoded, but not a ProbeRequest
    rate_limited: int = 0  # over the per-source or the total bucket
    send_errors: int = 0  # the kernel refused the response (e.g. unreachable source)


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now

    def take(self, rate: float, burst: float, now: float) -> bool:
        # A clock that steps back (it should not) only stops refilling.
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(burst, self.tokens + elapsed * rate)
        self.updated = max(self.updated, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    """Per-source and total token buckets, sans-IO. The per-source table keeps
    the `max_sources` most recently seen sources; a forgotten source starts
    again with a full bucket, which the total bucket still bounds."""

    __slots__ = ("_config", "_sources", "_total")

    def __init__(self, config: ResponderConfig) -> None:
        self._config = config
        self._sources: OrderedDict[str, _Bucket] = OrderedDict()
        self._total: _Bucket | None = None  # created full at the first call

    def __len__(self) -> int:
        return len(self._sources)

    def allow(self, source: str, now: float) -> bool:
        """May one more response go to `source` (an IP address) at `now` (seconds)?"""
        config = self._config
        bucket = self._sources.get(source)
        if bucket is None:
            if len(self._sources) >= config.max_sources:
                self._sources.popitem(last=False)
            bucket = self._sources[source] = _Bucket(config.per_source_burst, now)
        else:
            self._sources.move_to_end(source)
        if not bucket.take(config.per_source_rate, config.per_source_burst, now):
            return False
        if self._total is None:
            self._total = _Bucket(config.total_burst, now)
        if not self._total.take(config.total_rate, config.total_burst, now):
            bucket.tokens += 1.0  # not this source's fault: give its token back
            return False
        return True


class ProbeResponder:
    """Answers probes for `node_id` on one UDP socket; `counters` for metrics."""

    def __init__(self, node_id: str, config: ResponderConfig | None = None) -> None:
        # Encoding validates the id now rather than on the first probe.
        ProbeResponse(bytes(16), node_id).encode()
        self.node_id = node_id
        self.config = config or ResponderConfig()
        self.counters = ProbeCounters()
        self._limiter = RateLimiter(self.config)
        self._logged = ProbeCounters()  # counter values at the last drop log line
        self._next_log = -math.inf

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Bind a UDP socket on (host, port) - port 0 picks one - report the bound
        address through `task_status` (`await nursery.start(...)`) and serve."""
        family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
        with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind((host, port))
            bound = sock.getsockname()
            task_status.started((str(bound[0]), int(bound[1])))
            await self.serve_socket(sock)

    async def serve_socket(self, sock: trio.socket.SocketType) -> NoReturn:
        """Serve on an already bound UDP socket until cancelled. The caller owns it."""
        while True:
            data, source = await sock.recvfrom(_RECEIVE_SIZE)
            response = self.handle(data, str(source[0]), trio.current_time())
            if response is None:
                continue
            try:
                await sock.sendto(response, source)
            except OSError as exc:
                # A forged or vanished source; nothing to do but count it.
                self.counters.send_errors += 1
                self._log_drops(trio.current_time(), f"send failed: {exc.strerror}")
            else:
                self.counters.answered += 1

    def handle(self, data: bytes, source_ip: str, now: float) -> bytes | None:
        """The response datagram for one received datagram, or `None` to drop it."""
        self.counters.received += 1
        try:
            message = decode_message(data, max_size=_RECEIVE_SIZE)
        except DecodeError:
            self.counters.malformed += 1
            self._log_drops(now, "malformed datagram")
            return None
        if not isinstance(message, ProbeRequest):
            self.counters.unexpected += 1
            self._log_drops(now, f"unexpected {type(message).__name__}")
            return None
        if not self._limiter.allow(source_ip, now):
            self.counters.rate_limited += 1
            self._log_drops(now, "rate limited")
            return None
        return ProbeResponse(message.nonce, self.node_id).encode()

    def _log_drops(self, now: float, last: str) -> None:
        if now < self._next_log or not log.isEnabledFor(logging.DEBUG):
            return
        self._next_log = now + self.config.log_interval_s
        counters, logged = self.counters, self._logged
        log.debug(
            "probe responder dropped datagrams since last report: malformed=%d unexpected=%d "
            "rate_limited=%d send_errors=%d (last: %s)",
            counters.malformed - logged.malformed,
            counters.unexpected - logged.unexpected,
            counters.rate_limited - logged.rate_limited,
            counters.send_errors - logged.send_errors,
            last,
        )
        self._logged = dataclasses.replace(counters)
