"""The dev/ops PKI: two CAs, role URIs, SANs, key file modes, no overwrites."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from gcks.cluster import pki
from gcks.proto.identity import Identity, Role


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiLayout:
    return pki.pki_init(
        tmp_path_factory.mktemp("pki"), nodes=["n1", "n2"], members=["m1"], admins=["alice"]
    )


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, InvalidSignature):
        return False
    return True


def test_pki_init_lays_out_both_cas_and_one_certificate_per_identity(
    layout: pki.PkiLayout,
) -> None:
    d = layout.directory
    expected = [
        "ca/cluster.crt",
        "ca/cluster.key",
        "ca/member.crt",
        "ca/member.key",
        "node/n1.crt",
        "node/n1.key",
        "node/n2.crt",
        "member/m1.crt",
        "member/m1.key",
        "admin/alice.crt",
        "admin/alice.key",
    ]
    for name in expected:
        assert (d / name).is_file(), name
    assert layout.nodes["n1"].cert_path == d / "node/n1.crt"


def test_every_private_key_is_created_mode_0600(layout: pki.PkiLayout) -> None:
    keys = list(layout.directory.rglob("*.key"))
    assert len(keys) == 2 + 2 + 1 + 1
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_each_certificate_carries_exactly_its_role_uri(layout: pki.PkiLayout) -> None:
    for issued in [*layout.nodes.values(), *layout.members.values(), *layout.admins.values()]:
        assert Identity.from_certificate(issued.certificate) == issued.identity
    assert layout.members["m1"].identity == Identity(Role.MEMBER, "m1")
    assert layout.admins["alice"].identity == Identity(Role.ADMIN, "alice")


def test_node_certificate_has_loopback_sans_and_serves_and_dials(layout: pki.PkiLayout) -> None:
    cert = layout.nodes["n1"].certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_member_and_admin_certificates_are_client_only(layout: pki.PkiLayout) -> None:
    for issued in (layout.members["m1"], layout.admins["alice"]):
        usage = issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert list(usage.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_members_are_signed_by_the_member_ca_nodes_and_admins_by_the_cluster_ca(
    layout: pki.PkiLayout,
) -> None:
    cluster, member = layout.cluster_ca.certificate, layout.member_ca.certificate
    assert _signed_by(layout.nodes["n1"].certificate, cluster)
    assert _signed_by(layout.admins["alice"].certificate, cluster)
    assert _signed_by(layout.members["m1"].certificate, member)
    assert not _signed_by(layout.members["m1"].certificate, cluster)
    assert not _signed_by(layout.nodes["n1"].certificate, member)


def test_issue_refuses_a_member_certificate_from_the_cluster_ca(
    layout: pki.PkiLayout, tmp_path: Path
) -> None:
    with pytest.raises(pki.PkiError, match="member CA"):
        pki.issue(layout.cluster_ca, Role.MEMBER, "m9", tmp_path)
    with pytest.raises(pki.PkiError, match="cluster CA"):
        pki.issue(layout.member_ca, Role.NODE, "n9", tmp_path)


def test_existing_files_are_never_overwritten(layout: pki.PkiLayout) -> None:
    before = layout.nodes["n1"].cert_path.read_bytes()
    with pytest.raises(pki.PkiError, match="exists"):
        pki.issue(layout.cluster_ca, Role.NODE, "n1", layout.directory)
    assert layout.nodes["n1"].cert_path.read_bytes() == before


def test_pki_init_again_reuses_the_cas_to_add_identities(tmp_path: Path) -> None:
    first = pki.pki_init(tmp_path, nodes=["n1"])
    second = pki.pki_init(tmp_path, members=["m2"])
    assert second.cluster_ca.certificate == first.cluster_ca.certificate
    assert _signed_by(second.members["m2"].certificate, first.member_ca.certificate)


def test_an_invalid_id_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="invalid id"):
        pki.pki_init(tmp_path, nodes=["n1", "bad/id"])
    assert not any(tmp_path.iterdir())
    with pytest.raises(pki.PkiError, match="duplicate"):
        pki.pki_init(tmp_path, members=["m1", "m1"])
    with pytest.raises(pki.PkiError, match="DNS"):
        pki.pki_init(tmp_path, nodes=["n1"], dns=["bad name"])


def test_an_encrypted_ca_key_loads_only_with_its_passphrase(tmp_path: Path) -> None:
    pki.pki_init(tmp_path, nodes=["n1"], passphrase=b"correct horse")
    cert, key = pki.ca_paths(tmp_path, pki.CaKind.CLUSTER)
    assert b"ENCRYPTED" in key.read_bytes()
    with pytest.raises(pki.PkiError, match="passphrase"):
        pki.CertificateAuthority.load(pki.CaKind.CLUSTER, cert, key)
    with pytest.raises(pki.PkiError, match="passphrase"):
        pki.CertificateAuthority.load(pki.CaKind.CLUSTER, cert, key, b"wrong")
    ca = pki.CertificateAuthority.load(pki.CaKind.CLUSTER, cert, key, b"correct horse")
    # Leaf keys stay unencrypted: a node must start unattended.
    assert b"ENCRYPTED" not in (tmp_path / "node/n1.key").read_bytes()
    assert "key=" not in repr(ca)


def test_a_leaf_never_outlives_its_ca(tmp_path: Path) -> None:
    ca = pki.init_ca(tmp_path, pki.CaKind.CLUSTER, days=10)
    issued = pki.issue(ca, Role.NODE, "n1", tmp_path, days=365)
    assert issued.certificate.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_now_sets_the_validity_window(tmp_path: Path) -> None:
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    ca = pki.init_ca(tmp_path, pki.CaKind.CLUSTER, now=past)
    issued = pki.issue(ca, Role.NODE, "old", tmp_path, days=2, now=past)
    assert issued.certificate.not_valid_after_utc < dt.datetime(2020, 1, 3, tzinfo=dt.UTC)
