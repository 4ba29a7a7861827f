"""A node swaps in renewed certificate files without a restart, and refuses bad ones.

Handshakes run over in-memory streams: what a member sees is the certificate
the node's member context presents after each reload.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gcks.cluster import pki
from gcks.cluster.config import TlsConfig
from gcks.cluster.tls import TlsSetupError
from gcks.cluster.tlsreload import NodeTls, watch
from gcks.member.tls import member_client_context
from gcks.proto.identity import Role
from tests.tlspipe import handshake, peer_certificate


class _Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = pki.pki_init(root / "main", nodes=["n1", "n2"], members=["m1"])
        live = root / "live"
        live.mkdir()
        self.files = TlsConfig(
            cluster_ca=live / "cluster-ca.crt",
            member_ca=live / "member-ca.crt",
            cert=live / "node.crt",
            key=live / "node.key",
        )
        shutil.copy(self.layout.cluster_ca.cert_path, self.files.cluster_ca)
        shutil.copy(self.layout.member_ca.cert_path, self.files.member_ca)
        self.install(self.layout.nodes["n1"])

    def install(self, issued: pki.IssuedCertificate) -> None:
        """Replace the live files the way a secret update does: new inodes."""
        for source, target in (
            (issued.cert_path, self.files.cert),
            (issued.key_path, self.files.key),
        ):
            staged = target.with_suffix(".new")
            shutil.copy(source, staged)
            staged.replace(target)

    def renewed(self, name: str, *, node: str = "n1", **kwargs: object) -> pki.IssuedCertificate:
        return pki.issue(self.layout.cluster_ca, Role.NODE, node, self.root / name, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def certs(tmp_path: Path) -> _Pki:
    return _Pki(tmp_path)


async def _presented(node_tls: NodeTls, certs: _Pki) -> bytes:
    """DER of the certificate a member sees when it connects now."""
    ca, crt, key = (
        certs.layout.cluster_ca.cert_path,
        *pki.cert_paths(certs.root / "main", Role.MEMBER, "m1"),
    )
    client_context = member_client_context(cluster_ca=ca, cert=crt, key=key)
    _, client = await handshake(node_tls.member_server, client_context)
    return peer_certificate(client)


def _der(issued: pki.IssuedCertificate) -> bytes:
    return issued.certificate.public_bytes(Encoding.DER)


async def test_a_renewed_certificate_is_presented_after_a_reload(certs: _Pki) -> None:
    node_tls = NodeTls(certs.files, "n1", scratch=certs.root)
    assert await _presented(node_tls, certs) == _der(certs.layout.nodes["n1"])
    assert not node_tls.changed()
    renewed = certs.renewed("renewed", days=400)
    certs.install(renewed)
    assert node_tls.changed()
    node_tls.reload()
    assert await _presented(node_tls, certs) == _der(renewed)
    assert node_tls.expiry == renewed.certificate.not_valid_after_utc
    assert (node_tls.reloads, node_tls.changed()) == (1, False)


@pytest.mark.parametrize("case", ["other node", "expired", "foreign CA", "wrong key", "garbage"])
async def test_an_unusable_certificate_is_refused_and_the_old_one_stays(
    certs: _Pki, case: str
) -> None:
    node_tls = NodeTls(certs.files, "n1", scratch=certs.root)
    original = _der(certs.layout.nodes["n1"])
    if case == "other node":
        certs.install(certs.layout.nodes["n2"])
        reason = "of node:n2, not of node:n1"
    elif case == "expired":
        long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
        certs.install(certs.renewed("old", days=1, now=long_ago))
        reason = "not now"
    elif case == "foreign CA":
        foreign = pki.pki_init(certs.root / "foreign", nodes=["n1"])
        certs.install(foreign.nodes["n1"])
        reason = "not issued by a CA in cluster_ca"
    elif case == "wrong key":
        other = certs.renewed("other")
        shutil.copy(other.key_path, certs.files.key)
        reason = "not the private key"
    else:
        certs.files.cert.write_text("not a certificate")
        reason = "not a PEM certificate"
    with pytest.raises(TlsSetupError, match=reason):
        node_tls.reload()
    assert await _presented(node_tls, certs) == original
    assert node_tls.reloads == 0
    assert not node_tls.changed(), "refused files are not retried until they change again"


async def test_a_certificate_not_valid_yet_is_refused_and_tried_again_at_each_check(
    certs: _Pki,
) -> None:
    node_tls = NodeTls(certs.files, "n1", scratch=certs.root)
    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    early = certs.renewed("early", now=tomorrow)
    certs.install(early)
    with pytest.raises(TlsSetupError, match="retried"):
        node_tls.reload()
    assert node_tls.changed(), "tried again at the next check, not only when the files change"
    later = NodeTls(
        certs.files,
        "n1",
        scratch=certs.root,
        now=lambda: tomorrow + dt.timedelta(minutes=1),
    )
    later.reload()  # (a member's clock would refuse it until tomorrow, as it should)
    assert later.expiry == early.certificate.not_valid_after_utc
    assert not list(certs.root.glob(".tls-reload-*")), "the private copies are gone"


async def test_the_watcher_reloads_changed_files_and_on_sighup(
    certs: _Pki, autojump_clock: trio.testing.MockClock
) -> None:
    node_tls = NodeTls(certs.files, "n1", scratch=certs.root)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(watch, node_tls, 30.0)
            await trio.sleep(100)
            assert node_tls.reloads == 0, "nothing changed: nothing reloaded"
            certs.install(certs.renewed("first"))
            await trio.sleep(31)
            assert node_tls.reloads == 1
            # SIGHUP reloads at once, changed or not (e.g. after a CA-only fix).
            os.kill(os.getpid(), signal.SIGHUP)
            await trio.sleep(1)
            assert node_tls.reloads == 2
            certs.install(certs.layout.nodes["n2"])  # a wrong file is counted, not fatal
            await trio.sleep(31)
            assert (node_tls.reloads, node_tls.reload_failures) == (2, 1)
            nursery.cancel_scope.cancel()


def test_expiry_is_the_presented_certificates(certs: _Pki) -> None:
    node_tls = NodeTls(certs.files, "n1", scratch=certs.root)
    loaded = x509.load_pem_x509_certificate(certs.files.cert.read_bytes())
    assert node_tls.expiry == loaded.not_valid_after_utc
