"""Role enforcement: which certificate passes which TLS endpoint, and identity parsing."""

from __future__ import annotations

import ast
import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import gcks.member.tls as member_tls
from gcks.cluster import pki, tls
from gcks.proto.errors import IdentityError, ProtocolError
from gcks.proto.identity import Identity, Role, require
from tests.tlspipe import handshake


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiLayout:
    return pki.pki_init(
        tmp_path_factory.mktemp("pki"), nodes=["n1", "n2"], members=["m1"], admins=["alice"]
    )


def _files(layout: pki.PkiLayout, role: Role, ident: str) -> dict[str, Path]:
    cert, key = pki.cert_paths(layout.directory, role, ident)
    return {"cert": cert, "key": key}


def _cluster_ca(layout: pki.PkiLayout) -> Path:
    return layout.cluster_ca.cert_path


def _node_client(layout: pki.PkiLayout, ident: str = "n2") -> ssl.SSLContext:
    return tls.peer_client_context(
        cluster_ca=_cluster_ca(layout), **_files(layout, Role.NODE, ident)
    )


def _peer_server(layout: pki.PkiLayout) -> ssl.SSLContext:
    return tls.peer_server_context(
        cluster_ca=_cluster_ca(layout), **_files(layout, Role.NODE, "n1")
    )


def _member_server(layout: pki.PkiLayout) -> ssl.SSLContext:
    return tls.member_server_context(
        member_ca=layout.member_ca.cert_path, **_files(layout, Role.NODE, "n1")
    )


def _admin_server(layout: pki.PkiLayout) -> ssl.SSLContext:
    return tls.admin_server_context(
        cluster_ca=_cluster_ca(layout), **_files(layout, Role.NODE, "n1")
    )


def _member_client(layout: pki.PkiLayout) -> ssl.SSLContext:
    return member_tls.member_client_context(
        cluster_ca=_cluster_ca(layout), **_files(layout, Role.MEMBER, "m1")
    )


def _admin_client(layout: pki.PkiLayout) -> ssl.SSLContext:
    return tls.admin_client_context(
        cluster_ca=_cluster_ca(layout), **_files(layout, Role.ADMIN, "alice")
    )


def _member_cert_as_node_client(layout: pki.PkiLayout) -> ssl.SSLContext:
    """A member that tries to dial the peer listener with its member certificate."""
    return tls.peer_client_context(
        cluster_ca=_cluster_ca(layout), **_files(layout, Role.MEMBER, "m1")
    )


def test_every_context_is_tls13_only_with_certificates_required(layout: pki.PkiLayout) -> None:
    contexts = [
        _peer_server(layout),
        _node_client(layout),
        _member_server(layout),
        _admin_server(layout),
        _admin_client(layout),
        _member_client(layout),
    ]
    for ctx in contexts:
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode is ssl.CERT_REQUIRED
        assert not ctx.check_hostname


async def test_a_tls12_client_is_refused(layout: pki.PkiLayout) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.check_hostname = False
    old.load_verify_locations(cafile=str(_cluster_ca(layout)))
    files = _files(layout, Role.NODE, "n2")
    old.load_cert_chain(certfile=str(files["cert"]), keyfile=str(files["key"]))
    server, client = await handshake(_peer_server(layout), old)
    assert server is None
    assert client is None


async def test_node_to_node_handshake_yields_both_node_identities(layout: pki.PkiLayout) -> None:
    server, client = await handshake(_peer_server(layout), _node_client(layout))
    assert server is not None
    assert client is not None
    assert server.version() == "TLSv1.3"
    assert tls.verify_peer(server, Role.NODE, allowed_ids={"n2", "n3"}) == Identity(Role.NODE, "n2")
    assert tls.verify_peer(client, Role.NODE, expected_id="n1") == Identity(Role.NODE, "n1")


async def test_a_member_certificate_does_not_even_chain_at_the_peer_listener(
    layout: pki.PkiLayout,
) -> None:
    server, _ = await handshake(_peer_server(layout), _member_cert_as_node_client(layout))
    assert server is None


async def test_an_admin_certificate_chains_but_never_passes_as_a_node(
    layout: pki.PkiLayout,
) -> None:
    server, _ = await handshake(_peer_server(layout), _admin_client(layout))
    assert server is not None
    with pytest.raises(IdentityError, match="requires role node"):
        tls.verify_peer(server, Role.NODE)


async def test_an_unknown_node_id_is_refused(layout: pki.PkiLayout) -> None:
    server, _ = await handshake(_peer_server(layout), _node_client(layout, "n2"))
    assert server is not None
    with pytest.raises(IdentityError, match="not a configured node"):
        tls.verify_peer(server, Role.NODE, allowed_ids={"n3"})


async def test_the_member_listener_accepts_members_and_no_one_else(
    layout: pki.PkiLayout,
) -> None:
    server, client = await handshake(_member_server(layout), _member_client(layout))
    assert server is not None
    assert client is not None
    assert tls.verify_peer(server, Role.MEMBER) == Identity(Role.MEMBER, "m1")
    assert member_tls.verify_node(client, expected_id="n1") == Identity(Role.NODE, "n1")
    # Node and admin certificates come from the cluster CA, which the member listener
    # does not trust at all.
    for other in (_node_client(layout), _admin_client(layout)):
        server, _ = await handshake(_member_server(layout), other)
        assert server is None


async def test_the_admin_listener_accepts_admins_and_refuses_nodes_and_members(
    layout: pki.PkiLayout,
) -> None:
    server, _ = await handshake(_admin_server(layout), _admin_client(layout))
    assert server is not None
    assert tls.verify_peer(server, Role.ADMIN) == Identity(Role.ADMIN, "alice")
    server, _ = await handshake(_admin_server(layout), _node_client(layout))
    assert server is not None
    with pytest.raises(IdentityError):
        tls.verify_peer(server, Role.ADMIN)
    server, _ = await handshake(_admin_server(layout), _member_cert_as_node_client(layout))
    assert server is None


async def test_a_member_refuses_a_server_that_is_not_the_expected_node(
    layout: pki.PkiLayout,
) -> None:
    _, client = await handshake(_member_server(layout), _member_client(layout))
    assert client is not None
    with pytest.raises(IdentityError, match="node:n2 was expected"):
        member_tls.verify_node(client, expected_id="n2")


def test_member_tls_never_imports_the_cluster_package() -> None:
    source = Path(member_tls.__file__).read_text()
    imported = [
        node.module or ""
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom)
    ] + [
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import)
        for alias in node.names
    ]
    assert not [name for name in imported if name.startswith("gcks.cluster")]


def test_member_context_refuses_a_node_certificate_as_its_own(layout: pki.PkiLayout) -> None:
    with pytest.raises(member_tls.MemberTlsError, match="not of a member"):
        member_tls.member_client_context(
            cluster_ca=_cluster_ca(layout), **_files(layout, Role.NODE, "n1")
        )


def test_context_errors_name_the_bad_file(layout: pki.PkiLayout, tmp_path: Path) -> None:
    files = _files(layout, Role.NODE, "n1")
    with pytest.raises(tls.TlsSetupError) as caught:
        tls.peer_server_context(cluster_ca=tmp_path / "missing.crt", **files)
    assert caught.value.what == "cluster_ca"
    with pytest.raises(tls.TlsSetupError) as caught:
        tls.peer_server_context(
            cluster_ca=_cluster_ca(layout),
            cert=files["cert"],
            key=_files(layout, Role.NODE, "n2")["key"],
        )
    assert caught.value.what == "key"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(tls.TlsSetupError) as caught:
        tls.peer_server_context(cluster_ca=_cluster_ca(layout), cert=garbage, key=files["key"])
    assert caught.value.what == "cert"


# -- identity parsing ---------------------------------------------------------------


def _cert_with_uris(*uris: str, san: bool = True) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ((), "0 gcks identity URIs"),
        (("urn:gcks:node:n1", "urn:gcks:admin:n1"), "2 gcks identity URIs"),
        (("urn:gcks:node:n1", "URN:GCKS:admin:n1"), "2 gcks identity URIs"),
        (("urn:gcks:root:n1",), "unknown role"),
        (("urn:gcks:node:",), "invalid id"),
        (("urn:gcks:node:a/b",), "invalid id"),
        (("urn:gcks:node:" + "x" * 65,), "invalid id"),
        (("urn:gcks:node",), "without an id"),
        (("URN:GCKS:node:n1",), "not a gcks identity"),
    ],
)
def test_a_certificate_needs_exactly_one_well_formed_gcks_uri(
    uris: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(IdentityError, match=reason):
        Identity.from_certificate(_cert_with_uris(*uris))


def test_other_uris_beside_the_gcks_one_are_ignored() -> None:
    cert = _cert_with_uris("https://example.org/x", "urn:gcks:member:cam-1.lab")
    assert Identity.from_certificate(cert) == Identity(Role.MEMBER, "cam-1.lab")
    der = cert.public_bytes(serialization.Encoding.DER)
    assert Identity.from_der(der) == Identity(Role.MEMBER, "cam-1.lab")


def test_a_certificate_without_subject_alt_name_has_no_identity() -> None:
    with pytest.raises(IdentityError, match="no subjectAltName"):
        Identity.from_certificate(_cert_with_uris(san=False))


def _der(tag: int, body: bytes) -> bytes:
    """One DER element (short or long length form)."""
    if len(body) < 128:
        return bytes([tag, len(body)]) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


# A subjectAltName with the member's URI and one name cryptography cannot
# represent: parsing it raises UnsupportedGeneralNameType, not ValueError.
_X400_ADDRESS = _der(0xA3, _der(0x30, b""))
_EDI_PARTY_NAME = _der(0xA5, _der(0xA1, _der(0x0C, b"x")))


def _member_cert_with_odd_name(
    layout: pki.PkiLayout, directory: Path, odd_name: bytes
) -> ssl.SSLContext:
    """A member client context whose certificate the member CA signed, OpenSSL
    accepts, and whose subjectAltName also holds `odd_name`."""
    ca = layout.member_ca
    san = _der(0x30, _der(0x86, b"urn:gcks:member:m1") + odd_name)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "member:m1")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.UnrecognizedExtension(x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, san),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = directory / "odd.crt", directory / "odd.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    # Built by hand: the member library refuses such a certificate as its own.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=str(_cluster_ca(layout)))
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


@pytest.mark.parametrize(
    "odd_name", [_X400_ADDRESS, _EDI_PARTY_NAME], ids=["x400Address", "ediPartyName"]
)
async def test_a_name_the_parser_cannot_represent_is_an_identity_error_not_a_crash(
    layout: pki.PkiLayout, tmp_path: Path, odd_name: bytes
) -> None:
    # OpenSSL verifies the chain, so this reaches the role check of every
    # listener; an exception other than IdentityError there ended the node.
    server, _ = await handshake(
        _member_server(layout), _member_cert_with_odd_name(layout, tmp_path, odd_name)
    )
    assert server is not None
    with pytest.raises(IdentityError, match="extensions cannot be read"):
        tls.verify_peer(server, Role.MEMBER)


@pytest.mark.parametrize("der", [None, b"", b"\x30\x03\x02\x01\x00", b"garbage"])
def test_bad_der_is_one_typed_error(der: bytes | None) -> None:
    with pytest.raises(IdentityError):
        Identity.from_der(der)
    assert issubclass(IdentityError, ProtocolError)


def test_require_checks_role_then_id() -> None:
    node = Identity(Role.NODE, "n1")
    assert require(node, Role.NODE, "n1", allowed_ids={"n1"}) is node
    with pytest.raises(IdentityError):
        require(node, Role.MEMBER)
    with pytest.raises(IdentityError):
        require(node, Role.NODE, "n2")
    with pytest.raises(IdentityError):
        require(node, Role.NODE, allowed_ids=())
    assert Identity.from_uri(node.uri) == node
