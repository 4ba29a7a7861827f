"""A member's TLS files are picked up again when they change (certificate renewal)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gcks.cluster import pki
from gcks.cluster.tls import member_server_context
from gcks.member.tls import MemberTls
from gcks.proto.identity import Role
from tests.tlspipe import handshake, peer_certificate


class _Files:
    """A PKI, and live member files replaced the way a secret update does."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = pki.pki_init(root / "pki", nodes=["n1"], members=["m1", "m2"], admins=[])
        self.live = root / "live"
        self.live.mkdir()
        self.cert, self.key = self.live / "member.crt", self.live / "member.key"
        self.install(self.layout.members["m1"])

    def install(self, issued: pki.IssuedCertificate, *, key: Path | None = None) -> None:
        for source, target in ((issued.cert_path, self.cert), (key or issued.key_path, self.key)):
            staged = target.with_suffix(".new")
            shutil.copy(source, staged)
            staged.replace(target)  # a new inode, as a Kubernetes secret update makes

    def renewed(self, name: str, **kwargs: object) -> pki.IssuedCertificate:
        return pki.issue(self.layout.member_ca, Role.MEMBER, "m1", self.root / name, **kwargs)  # type: ignore[arg-type]

    def member_tls(self, **kwargs: object) -> MemberTls:
        ca = self.layout.cluster_ca.cert_path
        return MemberTls(cluster_ca=ca, cert=self.cert, key=self.key, **kwargs)  # type: ignore[arg-type]

    async def presented(self, tls: MemberTls) -> bytes:
        """DER of the certificate a node sees from this member now."""
        crt, key = pki.cert_paths(self.layout.directory, Role.NODE, "n1")
        server_context = member_server_context(
            member_ca=self.layout.member_ca.cert_path, cert=crt, key=key
        )
        server, _ = await handshake(server_context, tls.context())
        return peer_certificate(server)


def _der(issued: pki.IssuedCertificate) -> bytes:
    return issued.certificate.public_bytes(Encoding.DER)


@pytest.fixture
def files(tmp_path: Path) -> _Files:
    return _Files(tmp_path)


async def test_a_renewed_certificate_is_used_from_the_next_connection(files: _Files) -> None:
    tls = files.member_tls()
    first = tls.context()
    assert tls.context() is first, "unchanged files: the same context"
    assert await files.presented(tls) == _der(files.layout.members["m1"])
    renewed = files.renewed("renewed", days=400)
    files.install(renewed)
    assert await files.presented(tls) == _der(renewed)
    assert (tls.reloads, tls.reload_failures) == (1, 0)


@pytest.mark.parametrize("case", ["another member", "key of another certificate", "expired"])
async def test_unusable_new_files_keep_the_current_certificate_until_fixed(
    files: _Files, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    tls = files.member_tls()
    original = _der(files.layout.members["m1"])
    if case == "another member":
        files.install(files.layout.members["m2"])
    elif case == "key of another certificate":
        files.install(files.renewed("renewed"), key=files.layout.members["m2"].key_path)
    else:
        files.install(files.renewed("old", days=1, now=dt.datetime(2020, 1, 1, tzinfo=dt.UTC)))
    for _ in range(3):
        assert await files.presented(tls) == original
    assert (tls.reloads, tls.reload_failures) == (0, 1)
    assert len([r for r in caplog.records if "not used yet" in r.getMessage()]) == 1
    fixed = files.renewed("fixed")
    files.install(fixed)
    assert await files.presented(tls) == _der(fixed)
    assert tls.reloads == 1


async def test_a_certificate_not_valid_yet_is_taken_once_it_is(files: _Files) -> None:
    now = dt.datetime.now(dt.UTC)
    clock = [now]
    tls = files.member_tls(now=lambda: clock[0])
    early = files.renewed("early", now=now + dt.timedelta(hours=1))
    files.install(early)
    current = tls.context()
    assert await files.presented(tls) == _der(files.layout.members["m1"])
    assert tls.reloads == 0
    # The same files, later. (No handshake here: the node checks the real clock.)
    clock[0] = now + dt.timedelta(hours=2)
    assert tls.context() is not current
    assert (tls.reloads, tls.reload_failures) == (1, 1)
