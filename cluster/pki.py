"""Development and operations PKI: the two gcks CAs and the certificates they sign.

A gcks deployment has two certificate authorities. The *cluster CA* signs node
certificates (used both to serve and to dial, on peer links and to members)
and admin certificates; the *member CA* signs member certificates. Keeping
members under their own CA means a member certificate does not even chain on
the peer and admin listeners; the role URI (`gcks.proto.identity`) is the
second, independent check. Keys are ECDSA P-256 (accepted by every OpenSSL
that speaks TLS 1.3, for server and client authentication alike), signatures
SHA-256. Private keys are PEM PKCS#8 files created with mode 0600, never
overwritten; CA keys may be encrypted with a passphrase. This module backs
`gcks pki init DIR` and `gcks dev init`; it may import `cryptography` and
`gcks.proto`, and must never log or put key material in an error.

Layout made by `pki_init(DIR)`::

    DIR/ca/cluster.crt  DIR/ca/cluster.key     cluster CA
    DIR/ca/member.crt   DIR/ca/member.key      member CA
    DIR/node/ID.crt     DIR/node/ID.key        one per node
    DIR/member/ID.crt   DIR/member/ID.key      one per member
    DIR/admin/ID.crt    DIR/admin/ID.key       one per admin
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gcks.proto.errors import IdentityError
from gcks.proto.identity import Identity, Role

DEFAULT_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 365
DEFAULT_NODE_DNS: tuple[str, ...] = ("localhost",)
DEFAULT_NODE_IPS: tuple[str, ...] = ("127.0.0.1", "::1")
# Certificates start a little in the past so that a peer whose clock is slightly
# behind does not reject a freshly issued certificate as "not yet valid".
_BACKDATE = dt.timedelta(minutes=5)
_KEY_MODE = 0o600
_CERT_MODE = 0o644


class PkiError(Exception):
    """The PKI cannot be made or loaded as asked (bad id, file exists, wrong passphrase...)."""


class CaKind(enum.StrEnum):
    """Which of the two gcks certificate authorities."""

    CLUSTER = "cluster"
    MEMBER = "member"


# Nodes and admins are trusted by the cluster; members are a separate population.
ISSUER_OF: dict[Role, CaKind] = {
    Role.NODE: CaKind.CLUSTER,
    Role.ADMIN: CaKind.CLUSTER,
    Role.MEMBER: CaKind.MEMBER,
}

# A node serves (to members, peers and admins) and dials (peers); members and admins only dial.
_USAGES: dict[Role, tuple[x509.ObjectIdentifier, ...]] = {
    Role.NODE: (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    Role.ADMIN: (ExtendedKeyUsageOID.CLIENT_AUTH,),
    Role.MEMBER: (ExtendedKeyUsageOID.CLIENT_AUTH,),
}


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded CA: its certificate, its private key (never in repr) and where it lives."""

    kind: CaKind
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert_path: Path

    @classmethod
    def load(
        cls, kind: CaKind, cert_path: Path, key_path: Path, passphrase: bytes | None = None
    ) -> CertificateAuthority:
        """Load a CA from PEM files; `passphrase` if its key is encrypted."""
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), passphrase)
        except OSError as exc:
            raise PkiError(f"cannot read {kind.value} CA: {exc}") from None
        except (ValueError, TypeError):
            # TypeError: encrypted key without passphrase (or the reverse).
            raise PkiError(
                f"cannot load {kind.value} CA from {cert_path} / {key_path}: "
                "not PEM, or wrong or missing passphrase"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{key_path}: the CA key must be an ECDSA key")
        if key.public_key() != certificate.public_key():
            raise PkiError(f"{key_path} is not the key of {cert_path}")
        return cls(kind, certificate, key, cert_path)


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate written to disk, with the identity it carries."""

    identity: Identity
    certificate: x509.Certificate
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class PkiLayout:
    """Everything `pki_init` made or reused."""

    directory: Path
    cluster_ca: CertificateAuthority
    member_ca: CertificateAuthority
    nodes: dict[str, IssuedCertificate]
    members: dict[str, IssuedCertificate]
    admins: dict[str, IssuedCertificate]


def ca_paths(directory: Path, kind: CaKind) -> tuple[Path, Path]:
    """Certificate and key path of the `kind` CA in a `pki_init` directory."""
    return directory / "ca" / f"{kind.value}.crt", directory / "ca" / f"{kind.value}.key"


def cert_paths(directory: Path, role: Role, ident: str) -> tuple[Path, Path]:
    """Certificate and key path of identity `role:ident` in a `pki_init` directory."""
    _identity(role, ident)  # an id never contains '/', so it cannot escape the directory
    return directory / role.value / f"{ident}.crt", directory / role.value / f"{ident}.key"


def init_ca(
    directory: Path,
    kind: CaKind,
    *,
    days: int = DEFAULT_CA_DAYS,
    passphrase: bytes | None = None,
    now: dt.datetime | None = None,
) -> CertificateAuthority:
    """Create the `kind` CA under `directory/ca/` (refusing to overwrite an existing one)."""
    _check_days(days)
    cert_path, key_path = ca_paths(directory, kind)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gcks"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"gcks {kind.value} CA"),
        ]
    )
    start = (now or dt.datetime.now(dt.UTC)) - _BACKDATE
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        # path_length=0: the CA signs leaf certificates only, never a sub-CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    _write_new(key_path, _key_pem(key, encryption), _KEY_MODE)
    _write_new(cert_path, certificate.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
    return CertificateAuthority(kind, certificate, key, cert_path)


def issue(
    ca: CertificateAuthority,
    role: Role,
    ident: str,
    directory: Path,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = DEFAULT_CERT_DAYS,
    now: dt.datetime | None = None,
) -> IssuedCertificate:
    """Issue a certificate for `role:ident` signed by `ca`, written under
    `directory/ROLE/ID.{crt,key}`. Its SANs are the identity URI plus `dns` and `ips`."""
    identity = _identity(role, ident)
    if ISSUER_OF[role] is not ca.kind:
        raise PkiError(
            f"a {role.value} certificate must be signed by the {ISSUER_OF[role].value} CA, "
            f"not the {ca.kind.value} CA"
        )
    _check_days(days)
    cert_path, key_path = cert_paths(directory, role, ident)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    names += [x509.DNSName(_dns_name(name)) for name in dns]
    names += [x509.IPAddress(_ip(address)) for address in ips]
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    ca_public = ca.key.public_key()
    start = (now or dt.datetime.now(dt.UTC)) - _BACKDATE
    not_after = min(
        start + dt.timedelta(days=days), ca.certificate.not_valid_after_utc
    )  # a leaf never outlives the CA that vouches for it
    certificate = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gcks"),
                    x509.NameAttribute(NameOID.COMMON_NAME, str(identity)),
                ]
            )
        )
        .issuer_name(ca.certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(_USAGES[role])), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    _write_new(key_path, _key_pem(key, serialization.NoEncryption()), _KEY_MODE)
    _write_new(cert_path, certificate.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
    return IssuedCertificate(identity, certificate, cert_path, key_path)


def pki_init(
    directory: Path,
    *,
    nodes: Iterable[str] = (),
    members: Iterable[str] = (),
    admins: Iterable[str] = (),
    dns: Sequence[str] = DEFAULT_NODE_DNS,
    ips: Sequence[str] = DEFAULT_NODE_IPS,
    passphrase: bytes | None = None,
    days: int = DEFAULT_CERT_DAYS,
) -> PkiLayout:
    """Lay out a PKI directory: both CAs (created, or loaded if already there) and one
    certificate per node, member and admin id. Node certificates carry `dns` and `ips`
    as SANs (loopback by default); existing certificate files are never overwritten."""
    node_ids, member_ids, admin_ids = list(nodes), list(members), list(admins)
    # Validate every id before writing anything, so a typo leaves no half-made directory.
    for role, ids in ((Role.NODE, node_ids), (Role.MEMBER, member_ids), (Role.ADMIN, admin_ids)):
        for ident in ids:
            _identity(role, ident)
        if len(set(ids)) != len(ids):
            raise PkiError(f"duplicate {role.value} id in {ids}")
    for name in dns:
        _dns_name(name)
    for address in ips:
        _ip(address)
    cluster_ca = _load_or_init_ca(directory, CaKind.CLUSTER, passphrase)
    member_ca = _load_or_init_ca(directory, CaKind.MEMBER, passphrase)
    return PkiLayout(
        directory=directory,
        cluster_ca=cluster_ca,
        member_ca=member_ca,
        nodes={
            i: issue(cluster_ca, Role.NODE, i, directory, dns=dns, ips=ips, days=days)
            for i in node_ids
        },
        members={i: issue(member_ca, Role.MEMBER, i, directory, days=days) for i in member_ids},
        admins={i: issue(cluster_ca, Role.ADMIN, i, directory, days=days) for i in admin_ids},
    )


def _load_or_init_ca(
    directory: Path, kind: CaKind, passphrase: bytes | None
) -> CertificateAuthority:
    cert_path, key_path = ca_paths(directory, kind)
    if cert_path.exists() or key_path.exists():
        return CertificateAuthority.load(kind, cert_path, key_path, passphrase)
    return init_ca(directory, kind, passphrase=passphrase)


def _identity(role: Role, ident: str) -> Identity:
    try:
        return Identity(role, ident)
    except IdentityError as exc:
        raise PkiError(str(exc)) from None


def _check_days(days: int) -> None:
    if not 1 <= days <= 36500:
        raise PkiError(f"validity must be 1..36500 days, not {days}")


def _dns_name(name: str) -> str:
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or not all(
            0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            for label in labels
        )
    ):
        raise PkiError(f"invalid DNS name {name!r}")
    return name


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        raise PkiError(f"invalid IP address {address!r}") from None


def _key_pem(
    key: ec.EllipticCurvePrivateKey, encryption: serialization.KeySerializationEncryption
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (no window where a key is world-readable);
    refuse to replace an existing file, which may be a CA key still in use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PkiError(f"{path} exists; remove it first to replace it") from None
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)  # the umask may have narrowed the mode
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
