"""The mTLS peer transport over real loopback sockets: delivery, refusals, bounds, redial."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gcks.cluster import pki, tls
from gcks.cluster.config import Address, PeerLinkConfig
from gcks.cluster.peer import PeerTransport, backoff_delay
from gcks.proto.codec import encode_frame
from gcks.proto.identity import Role

FAST = PeerLinkConfig(
    connect_timeout_ms=2000,
    handshake_timeout_ms=2000,
    write_timeout_ms=2000,
    backoff_min_ms=10,
    backoff_max_ms=100,
    keepalive_ms=50,
    idle_timeout_ms=5000,
    send_queue_frames=64,
    send_queue_bytes=1 << 20,
    receive_queue_frames=64,
    max_frame_bytes=64 * 1024,
)


@dataclass(frozen=True)
class Creds:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    layout: pki.PkiLayout
    expired_n2: Creds
    self_signed_n2: Creds
    foreign_ca_n2: Creds

    def node(self, ident: str) -> Creds:
        cert, key = pki.cert_paths(self.layout.directory, Role.NODE, ident)
        return Creds(cert, key)

    def of(self, role: Role, ident: str) -> Creds:
        cert, key = pki.cert_paths(self.layout.directory, role, ident)
        return Creds(cert, key)

    def client(self, creds: Creds) -> ssl.SSLContext:
        return tls.peer_client_context(
            cluster_ca=self.layout.cluster_ca.cert_path, cert=creds.cert, key=creds.key
        )

    def server(self, creds: Creds) -> ssl.SSLContext:
        return tls.peer_server_context(
            cluster_ca=self.layout.cluster_ca.cert_path, cert=creds.cert, key=creds.key
        )


def _self_signed(directory: Path, uri: str) -> Creds:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "node:n2")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir()
    creds = Creds(directory / "n2.crt", directory / "n2.key")
    creds.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    creds.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return creds


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    layout = pki.pki_init(
        root / "main", nodes=["n1", "n2", "n3", "n9"], members=["m1"], admins=["alice"]
    )
    long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    expired = pki.issue(layout.cluster_ca, Role.NODE, "n2", root / "expired", days=1, now=long_ago)
    foreign = pki.pki_init(root / "foreign", nodes=["n2"]).nodes["n2"]
    return Pki(
        layout=layout,
        expired_n2=Creds(expired.cert_path, expired.key_path),
        self_signed_n2=_self_signed(root / "self", "urn:gcks:node:n2"),
        foreign_ca_n2=Creds(foreign.cert_path, foreign.key_path),
    )


def _transport(
    certs: Pki,
    node_id: str,
    peers: dict[str, Address] | None = None,
    settings: PeerLinkConfig = FAST,
    listen: Address = Address("127.0.0.1", 0),
) -> PeerTransport:
    creds = certs.node(node_id)
    return PeerTransport(
        node_id,
        listen,
        peers or {},
        server_context=certs.server(creds),
        client_context=certs.client(creds),
        settings=settings,
        rng=random.Random(7),
    )


async def _start(nursery: trio.Nursery, transport: PeerTransport) -> Address:
    bound: list[Address] = await nursery.start(transport.run)
    return bound[0]


async def _wait_until(condition: Callable[[], bool]) -> None:
    """Wait for a condition the transport reaches on its own (bounded by the caller)."""
    # The transport exposes counters, not events: polling them is the test's only view.
    while not condition():
        await trio.sleep(0.005)


async def _read_to_end(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


@pytest.fixture
def dead_address() -> Iterator[Address]:
    """A loopback port that is bound but not listening: every connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield Address("127.0.0.1", sock.getsockname()[1])


@pytest.fixture
async def three(certs: Pki) -> AsyncIterator[dict[str, PeerTransport]]:
    async with trio.open_nursery() as nursery:
        transports = {i: _transport(certs, i) for i in ("n1", "n2", "n3")}
        book = {i: await _start(nursery, t) for i, t in transports.items()}
        for transport in transports.values():
            transport.set_peers(book)
        yield transports
        nursery.cancel_scope.cancel()


async def test_three_nodes_exchange_frames_in_order_with_authenticated_senders(
    three: dict[str, PeerTransport],
) -> None:
    for src, transport in three.items():
        assert transport.peer_ids == set(three) - {src}
        for dst in three:
            if dst != src:
                for k in range(5):
                    assert transport.send(dst, f"{src}>{dst}#{k}".encode())
    with trio.fail_after(10):
        for dst, transport in three.items():
            got = [await transport.incoming.receive() for _ in range(10)]
            for src in set(three) - {dst}:
                assert [p for f, p in got if f == src] == [
                    f"{src}>{dst}#{k}".encode() for k in range(5)
                ]
    stats = three["n1"].stats
    await _wait_until(lambda: stats.peers["n2"].frames_sent == 5)
    assert stats.peers["n2"].connects == 1
    assert stats.listener.frames_received == 10
    assert stats.listener.refused == stats.listener.handshake_failures == 0


async def test_send_to_an_unknown_peer_is_refused_and_empty_payloads_are_reserved(
    three: dict[str, PeerTransport],
) -> None:
    assert not three["n1"].send("n7", b"x")
    assert not three["n1"].send("n1", b"x")  # never to itself
    with pytest.raises(ValueError, match="keepalive"):
        three["n1"].send("n2", b"")
    with pytest.raises(ValueError, match="exceeds"):
        three["n1"].send("n2", b"x" * (FAST.max_frame_bytes + 1))


async def _knock(address: Address, context: ssl.SSLContext, first: bytes) -> None:
    """Dial, handshake (which may fail), send `first`, and read until the listener hangs
    up: it never sends application data, so the read ends only when it closes."""
    tcp = await trio.open_tcp_stream(address.host, address.port)
    stream = trio.SSLStream(tcp, context, server_hostname=None)
    try:
        await stream.do_handshake()
        await stream.send_all(first)
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)


@pytest.mark.parametrize(
    ("who", "counter", "logged"),
    [
        (lambda c: c.of(Role.MEMBER, "m1"), "handshake_failures", "TLS handshake"),
        (lambda c: c.of(Role.ADMIN, "alice"), "refused", "requires role node"),
        (lambda c: c.self_signed_n2, "handshake_failures", "TLS handshake"),
        (lambda c: c.foreign_ca_n2, "handshake_failures", "TLS handshake"),
        (lambda c: c.expired_n2, "handshake_failures", "expired"),
        (lambda c: c.node("n9"), "refused", "not a configured node"),
    ],
    ids=["member", "admin", "self-signed", "foreign-ca", "expired", "unknown-node-id"],
)
async def test_the_peer_listener_refuses_every_certificate_but_a_configured_nodes(
    certs: Pki,
    caplog: pytest.LogCaptureFixture,
    who: Callable[[Pki], Creds],
    counter: str,
    logged: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="gcks.cluster.peer")
    listener = _transport(certs, "n1", {"n2": Address("127.0.0.1", 1), "n3": Address("::1", 1)})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await _start(nursery, listener)
            await _knock(address, certs.client(who(certs)), encode_frame(b"forged vote"))
            assert getattr(listener.stats.listener, counter) == 1
            assert listener.stats.listener.frames_received == 0
            with pytest.raises(trio.WouldBlock):
                listener.incoming.receive_nowait()
            refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            assert len(refusals) == 1
            assert logged in refusals[0]
            assert "127.0.0.1" in refusals[0]
            # The listener goes on serving: a configured node still gets through.
            tcp = await trio.open_tcp_stream(address.host, address.port)
            async with trio.SSLStream(tcp, certs.client(certs.node("n2"))) as node:
                await node.send_all(encode_frame(b"real vote"))
                assert await listener.incoming.receive() == ("n2", b"real vote")
            nursery.cancel_scope.cancel()


async def test_random_bytes_at_the_listener_are_a_logged_handshake_failure(
    certs: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gcks.cluster.peer")
    listener = _transport(certs, "n1", {"n2": Address("127.0.0.1", 1)})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await _start(nursery, listener)
            async with await trio.open_tcp_stream(address.host, address.port) as raw:
                await raw.send_all(random.Random(1).randbytes(3000))
                while await raw.receive_some():  # until the listener hangs up
                    pass
            assert listener.stats.listener.handshake_failures == 1
            assert any("TLS handshake" in r.getMessage() for r in caplog.records)
            nursery.cancel_scope.cancel()


async def test_a_silent_client_is_cut_off_at_the_handshake_deadline(
    certs: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    listener = _transport(certs, "n1", {"n2": Address("127.0.0.1", 1)})
    async with trio.open_nursery() as nursery:
        address = await _start(nursery, listener)
        start = trio.current_time()
        async with await trio.open_tcp_stream(address.host, address.port) as raw:
            assert await raw.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(FAST.handshake_timeout_ms / 1000)
        assert listener.stats.listener.handshake_failures == 1
        nursery.cancel_scope.cancel()


async def test_an_oversize_frame_from_a_node_drops_its_link(
    certs: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gcks.cluster.peer")
    listener = _transport(certs, "n1", {"n2": Address("127.0.0.1", 1)})
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await _start(nursery, listener)
            header = (FAST.max_frame_bytes + 1).to_bytes(4, "big")
            await _knock(address, certs.client(certs.node("n2")), header)
            assert listener.stats.listener.decode_errors == 1
            assert any("dropped" in r.getMessage() for r in caplog.records)
            nursery.cancel_scope.cancel()


async def test_a_dead_peers_send_queue_stays_bounded_in_frames_and_bytes(
    certs: Pki, dead_address: Address, autojump_clock: trio.testing.MockClock
) -> None:
    transport = _transport(certs, "n1", {"n2": dead_address})
    async with trio.open_nursery() as nursery:
        await _start(nursery, transport)
        await trio.sleep(5)
        stats = transport.stats.peers["n2"]
        assert stats.connect_failures > 0
        assert stats.connects == 0
        for _ in range(1000):
            transport.send("n2", b"x" * 100)
        assert stats.queued_frames == FAST.send_queue_frames
        assert stats.frames_dropped == 1000 - FAST.send_queue_frames
        for _ in range(40):
            transport.send("n2", b"y" * 60_000)
        assert stats.queued_bytes <= FAST.send_queue_bytes
        assert stats.queued_frames <= FAST.send_queue_frames
        await trio.sleep(5)
        assert stats.queued_bytes <= FAST.send_queue_bytes
        nursery.cancel_scope.cancel()


async def test_a_dead_peer_is_redialed_with_capped_exponential_backoff(
    certs: Pki, dead_address: Address, autojump_clock: trio.testing.MockClock
) -> None:
    settings = PeerLinkConfig(backoff_min_ms=100, backoff_max_ms=5000)
    transport = _transport(certs, "n1", {"n2": dead_address}, settings)
    failures: list[float] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "cannot connect" in record.getMessage():
                failures.append(trio.current_time())

    recorder = Recorder(logging.DEBUG)
    logger = logging.getLogger("gcks.cluster.peer")
    logger.addHandler(recorder)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        async with trio.open_nursery() as nursery:
            await _start(nursery, transport)
            await trio.sleep(120)
            nursery.cancel_scope.cancel()
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(old_level)
    gaps = [b - a for a, b in itertools.pairwise(failures)]
    assert len(failures) == transport.stats.peers["n2"].connect_failures
    # Exponential from 100 ms (each gap within [d/2, d]), then capped at 5 s.
    for attempt, gap in enumerate(gaps):
        bound = min(5.0, 0.1 * 2**attempt)
        assert bound / 2 <= gap <= bound + 1e-6
    assert len(gaps) > 20
    assert all(gap >= 2.5 for gap in gaps[6:])


def test_backoff_delay_is_jittered_within_half_to_full_and_capped() -> None:
    settings = PeerLinkConfig(backoff_min_ms=100, backoff_max_ms=5000)
    rng = random.Random(3)
    for attempt in range(80):
        bound = min(5.0, 0.1 * 2 ** min(attempt, 40))
        delays = {backoff_delay(attempt, settings, rng) for _ in range(20)}
        assert all(bound / 2 <= d <= bound for d in delays)
        assert len(delays) > 1  # jittered: nodes do not redial in lockstep


async def test_a_restarted_peer_is_redialed_and_gets_the_frames_queued_meanwhile(
    certs: Pki,
) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            n1 = _transport(certs, "n1")
            a1 = await _start(nursery, n1)
            first = _transport(certs, "n2", {"n1": a1})
            async with trio.open_nursery() as n2_life:
                a2 = await _start(n2_life, first)
                n1.set_peers({"n2": a2})
                assert n1.send("n2", b"before")
                assert await first.incoming.receive() == ("n1", b"before")
                n2_life.cancel_scope.cancel()  # n2 dies: its sockets close
            link = n1.stats.peers["n2"]
            await _wait_until(lambda: not link.connected)
            assert n1.send("n2", b"while down")
            await _wait_until(lambda: link.connect_failures > 0)
            second = _transport(certs, "n2", {"n1": a1}, listen=a2)
            async with trio.open_nursery() as n2_life:
                await _start(n2_life, second)
                assert await second.incoming.receive() == ("n1", b"while down")
                assert n1.send("n2", b"after")
                assert await second.incoming.receive() == ("n1", b"after")
                assert link.connects == 2
                n2_life.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


async def test_a_reconnecting_peer_replaces_its_older_inbound_link(certs: Pki) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            n1 = _transport(certs, "n1", {"n2": Address("127.0.0.1", 1)})
            address = await _start(nursery, n1)
            context = certs.client(certs.node("n2"))
            streams = []
            for k in range(3):
                tcp = await trio.open_tcp_stream(address.host, address.port)
                stream = trio.SSLStream(tcp, context, server_hostname=None)
                await stream.do_handshake()
                await stream.send_all(encode_frame(f"link {k}".encode()))
                assert await n1.incoming.receive() == ("n2", f"link {k}".encode())
                streams.append(stream)
            # Only the newest stays open: the two older ones were hung up on.
            for stream in streams[:2]:
                with pytest.raises(trio.BrokenResourceError):
                    await _read_to_end(stream)
            for stream in streams:
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


async def test_an_idle_inbound_link_is_closed_but_keepalives_hold_a_quiet_one_open(
    certs: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    settings = PeerLinkConfig(keepalive_ms=1000, idle_timeout_ms=5000)
    async with trio.open_nursery() as nursery:
        n1 = _transport(certs, "n1", settings=settings)
        a1 = await _start(nursery, n1)
        n2 = _transport(certs, "n2", {"n1": a1}, settings=settings)
        await _start(nursery, n2)
        n1.set_peers({"n2": Address("127.0.0.1", 1), "n3": Address("127.0.0.1", 2)})
        await trio.sleep(60)  # a quiet minute: only keepalives flow n2 -> n1
        assert n1.stats.listener.idle_timeouts == 0
        assert n2.stats.peers["n1"].connects == 1
        # A node that connects and then says nothing at all is cut off.
        context = certs.client(certs.node("n3"))
        tcp = await trio.open_tcp_stream(a1.host, a1.port)
        silent = trio.SSLStream(tcp, context, server_hostname=None)
        await silent.do_handshake()
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):
            await silent.receive_some()
        assert trio.current_time() - start == pytest.approx(5.0)
        assert n1.stats.listener.idle_timeouts == 1
        await trio.aclose_forcefully(silent)
        nursery.cancel_scope.cancel()


async def test_incoming_ends_when_the_transport_stops(certs: Pki) -> None:
    transport = _transport(certs, "n1")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await _start(nursery, transport)
            nursery.cancel_scope.cancel()
        assert [item async for item in transport.incoming] == []
        with pytest.raises(RuntimeError, match="only once"):
            await transport.run()


async def test_handshakes_beyond_the_cap_are_refused_at_once(
    certs: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gcks.cluster.peer")
    settings = PeerLinkConfig(max_pending_handshakes=1, handshake_timeout_ms=60_000)
    listener = _transport(certs, "n1", {"n2": Address("127.0.0.1", 1)}, settings)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await _start(nursery, listener)
            async with await trio.open_tcp_stream(address.host, address.port) as slow:
                await _wait_until(lambda: listener.stats.listener.accepted == 1)
                async with await trio.open_tcp_stream(address.host, address.port) as extra:
                    assert await extra.receive_some() == b""
                assert listener.stats.listener.handshake_failures == 1
                assert any("too many handshakes" in r.getMessage() for r in caplog.records)
                await slow.send_all(b"\x16")  # the first one still holds its slot
            nursery.cancel_scope.cancel()


async def test_a_peer_that_connects_to_us_is_redialed_at_once_not_after_the_backoff(
    certs: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    # n1 dials n2 while nothing listens there and backs off for a minute; n2
    # then starts on that address and dials n1: n1 redials now.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        n2_address = Address("127.0.0.1", sock.getsockname()[1])
    settings = PeerLinkConfig(backoff_min_ms=60_000, backoff_max_ms=60_000)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            n1 = _transport(certs, "n1", {"n2": n2_address}, settings)
            a1 = await _start(nursery, n1)
            link = n1.stats.peers["n2"]
            await _wait_until(lambda: link.connect_failures == 1)
            n2 = _transport(certs, "n2", {"n1": a1}, settings, listen=n2_address)
            await _start(nursery, n2)
            start = trio.current_time()
            assert n2.send("n1", b"hello")  # n2's dial reaches n1's listener
            assert await n1.incoming.receive() == ("n2", b"hello")
            await _wait_until(lambda: link.connected)
            assert trio.current_time() - start < 1.0, "not after the 30-60 s backoff"
            assert link.connect_failures == 1
            nursery.cancel_scope.cancel()


async def test_an_idle_link_sends_keepalives_and_a_stalled_write_ends_it_at_the_deadline(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    transport = PeerTransport(
        "n1",
        Address("127.0.0.1", 1),
        {"n2": Address("127.0.0.1", 2)},
        server_context=ssl.create_default_context(),
        client_context=ssl.create_default_context(),
        settings=FAST,
    )
    link = transport._links["n2"]
    ours, theirs = trio.testing.lockstep_stream_pair()  # a write waits for the reader
    received: list[bytes] = []
    stalled_at = 0.0

    async def peer_reads_twice_then_stalls() -> None:
        nonlocal stalled_at
        for _ in range(2):
            received.append(bytes(await theirs.receive_some(1 << 16)))
        stalled_at = trio.current_time()
        transport.send("n2", b"second")  # its write never finishes

    transport.send("n2", b"first")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer_reads_twice_then_stalls)
        with trio.fail_after(60):
            await transport._write_frames(link, ours)  # type: ignore[arg-type]
    assert received == [encode_frame(b"first"), encode_frame(b"")]  # the frame, a keepalive
    assert trio.current_time() - stalled_at == pytest.approx(FAST.write_timeout_ms / 1000)
    assert link.stats.frames_sent == 1
    assert link.stats.frames_dropped == 1
    assert "lost while writing: write timed out" in caplog.text
