"""TLS contexts of a GCKS node, and the identity check that follows every handshake.

Every node connection is TLS 1.3 only (minimum = maximum version) with a
certificate required from both sides. Which CA a listener trusts is fixed by
its purpose: the peer listener, the peer dialer and the admin listener trust
the cluster CA; the member listener trusts the member CA only. The chain alone
is not enough (node and admin certificates share the cluster CA), so
`verify_peer` must be called right after the handshake: it reads the peer's
`urn:gcks:ROLE:ID` and refuses any other role, or an id the caller does not
expect. Python's `ssl` offers no per-certificate callback during the
handshake, so this check runs immediately after it, before a single
application byte is read or written.

Host names are not checked (`check_hostname = False`), on purpose: nodes are
dialed by whatever address reaches them (loopback ports, Kubernetes headless
DNS names, NAT'd IPs), and a rename must not need a re-issued certificate.
The cluster CA is private to the cluster, so the question a host name check
answers - "is this the server I meant?" - is answered more precisely by the
role and id in the certificate compared with the configured peer id.

TLS session tickets are disabled: a resumed session would skip the
certificate exchange, and with it the chain, expiry and identity checks.

May import `ssl`, `trio` (types only), `cryptography` and `gcks.proto`; never
reads configuration files itself and never logs key material.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Collection
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gcks.proto.errors import IdentityError
from gcks.proto.identity import Identity, Role, require


class TlsSetupError(Exception):
    """A TLS file cannot be used. `what` names it: cluster_ca, member_ca, cert or key."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"{what}: {message}")
        self.what = what
        self.message = message


def peer_server_context(*, cluster_ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Context of the peer listener: other nodes dial in with cluster-CA node certificates."""
    return _context(ssl.Purpose.CLIENT_AUTH, ("cluster_ca", cluster_ca), cert, key)


def peer_client_context(*, cluster_ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Context for dialing another node (peer links), with this node's certificate."""
    return _context(ssl.Purpose.SERVER_AUTH, ("cluster_ca", cluster_ca), cert, key)


def member_server_context(*, member_ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Context of the member listener: members present member-CA certificates."""
    return _context(ssl.Purpose.CLIENT_AUTH, ("member_ca", member_ca), cert, key)


def admin_server_context(*, cluster_ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Context of the admin listener: operators present cluster-CA admin certificates."""
    return _context(ssl.Purpose.CLIENT_AUTH, ("cluster_ca", cluster_ca), cert, key)


def admin_client_context(*, cluster_ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Context of `gcks admin` dialing a node's admin listener with an admin certificate."""
    return _context(ssl.Purpose.SERVER_AUTH, ("cluster_ca", cluster_ca), cert, key)


def read_certificate(cert: Path) -> x509.Certificate:
    """The PEM certificate file `cert`; `TlsSetupError` if unreadable or not PEM."""
    try:
        return x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as exc:
        raise TlsSetupError("cert", f"cannot read {cert}: {exc.strerror or exc}") from None
    except ValueError:
        raise TlsSetupError("cert", f"{cert} is not a PEM certificate") from None


def certificate_identity(cert: Path) -> Identity:
    """The gcks identity in the PEM certificate file `cert` (to check a node's own
    certificate against its configured id before it starts)."""
    loaded = read_certificate(cert)
    try:
        return Identity.from_certificate(loaded)
    except IdentityError as exc:
        raise TlsSetupError("cert", f"{cert}: {exc}") from None


def verify_peer(
    stream: trio.SSLStream[Any],
    role: Role,
    expected_id: str | None = None,
    *,
    allowed_ids: Collection[str] | None = None,
) -> Identity:
    """The identity of the peer of a completed handshake, if it has `role` (and is
    `expected_id` / in `allowed_ids` when given). Raises `IdentityError` otherwise:
    the caller then logs and closes the connection."""
    der: bytes | None = stream.getpeercert(binary_form=True)
    return require(Identity.from_der(der), role, expected_id, allowed_ids=allowed_ids)


def peer_seconds_left(stream: trio.SSLStream[Any]) -> float:
    """Seconds until the peer's certificate expires (negative if it has), for a
    stream `verify_peer` accepted: its certificate parsed again, lazily (about
    2 µs), with the same typed errors."""
    certificate = Identity.load_der(stream.getpeercert(binary_form=True))
    return (certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).total_seconds()


def _context(
    purpose: ssl.Purpose, trust: tuple[str, Path], cert: Path, key: Path
) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # see module docstring: identity is the URI role + id
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Strict RFC 5280 checks of every certificate in the chain; gcks.cluster.pki complies.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if server:
        ctx.num_tickets = 0  # no resumption: every connection presents and checks a certificate
    what, ca_file = trust
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(what, f"cannot load CA certificates from {ca_file}: {exc}") from None
    _check_cert_and_key(cert, key)
    try:
        # password=b"": an encrypted key fails here instead of prompting on a terminal.
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key), password=b"")
    except ssl.SSLError:
        raise TlsSetupError("key", f"{key} is not the private key of {cert}") from None
    return ctx


def _check_cert_and_key(cert: Path, key: Path) -> None:
    """Say which of the two files is wrong; OpenSSL alone reports one error for both."""
    certificate_identity(cert)
    try:
        key_bytes = key.read_bytes()
    except OSError as exc:
        raise TlsSetupError("key", f"cannot read {key}: {exc.strerror or exc}") from None
    try:
        serialization.load_pem_private_key(key_bytes, password=None)
    except TypeError:
        raise TlsSetupError(
            "key", f"{key} is encrypted; a node key must be readable unattended"
        ) from None
    except ValueError:
        raise TlsSetupError("key", f"{key} is not a PEM private key") from None
