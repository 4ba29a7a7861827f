"""TLS of a member's registration connection (REG SA) to a GCKS node.

The member dials a node's member listener with TLS 1.3 only, presents its
member-CA certificate, and trusts only the cluster CA for the node's
certificate. After the handshake `verify_node` checks that the server carries
`urn:gcks:node:ID` (and the expected node id, when the member knows it from
its node list), so that an admin's or another member's certificate, even one
signed by a trusted CA, can never pose as a GCKS. Host names are not checked:
nodes are reached by loopback ports, Kubernetes DNS names or NAT'd addresses,
and the node id in the certificate is the name that matters. Session tickets
are ignored (no resumption), so every connection checks a certificate.

`MemberTls` rebuilds the context when the files change (a renewal by
cert-manager or a script), so a long-running member needs no restart.

May import `ssl`, `trio` (types only), `cryptography` and `gcks.proto`; never
`gcks.cluster` (members do not depend on the node). Never logs key material.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gcks.proto.errors import IdentityError
from gcks.proto.identity import Identity, Role, require

log = logging.getLogger(__name__)


class MemberTlsError(Exception):
    """A member TLS file cannot be used. `what` names it: cluster_ca, cert or key."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(f"{what}: {message}")
        self.what = what
        self.message = message


def member_client_context(*, cluster_ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Context for dialing nodes: TLS 1.3 only, node certificate required (cluster CA),
    this member's certificate presented. Raises `MemberTlsError` naming a bad file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # see module docstring: the identity is the URI role + id
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        ctx.load_verify_locations(cafile=str(cluster_ca))
    except (OSError, ssl.SSLError) as exc:
        raise MemberTlsError(
            "cluster_ca", f"cannot load CA certificates from {cluster_ca}: {exc}"
        ) from None
    own = certificate_identity(cert)
    if own.role is not Role.MEMBER:
        raise MemberTlsError("cert", f"{cert} is the certificate of {own}, not of a member")
    try:
        key_bytes = key.read_bytes()
        serialization.load_pem_private_key(key_bytes, password=None)
    except OSError as exc:
        raise MemberTlsError("key", f"cannot read {key}: {exc.strerror or exc}") from None
    except TypeError:
        raise MemberTlsError(
            "key", f"{key} is encrypted; member keys are read unattended"
        ) from None
    except ValueError:
        raise MemberTlsError("key", f"{key} is not a PEM private key") from None
    try:
        # password=b"": never prompt on a terminal.
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key), password=b"")
    except ssl.SSLError:
        raise MemberTlsError("key", f"{key} is not the private key of {cert}") from None
    return ctx


class MemberTls:
    """The member's client context, rebuilt when its files change.

    Checked at each new connection (three `stat` calls). A changed set that
    cannot be used (half written, a key that does not match, another
    identity, not valid yet) keeps the current context, is logged once, and
    is tried again at the next connection."""

    def __init__(
        self,
        *,
        cluster_ca: Path,
        cert: Path,
        key: Path,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        """Raises `MemberTlsError` if the files cannot be used at start."""
        self._paths = (cluster_ca, cert, key)
        self._now = now
        self._loaded = _signature(self._paths)
        self._context = member_client_context(cluster_ca=cluster_ca, cert=cert, key=key)
        self.identity = _identity(read_certificate(cert), cert)
        self._refused: tuple[object, ...] | None = None
        self.reloads = 0
        self.reload_failures = 0

    def context(self) -> ssl.SSLContext:
        """The context for the next connection: the files' pair if it changed and
        can be used, else the current one."""
        signature = _signature(self._paths)
        if signature == self._loaded:
            return self._context
        cluster_ca, cert, key = self._paths
        try:
            context = member_client_context(cluster_ca=cluster_ca, cert=cert, key=key)
            loaded = read_certificate(cert)
            identity = _identity(loaded, cert)
            if identity != self.identity:
                raise MemberTlsError("cert", f"{cert} is now of {identity}, not {self.identity}")
            now, start, end = self._now(), loaded.not_valid_before_utc, loaded.not_valid_after_utc
            if now < start:
                raise MemberTlsError("cert", f"{cert} is not valid before {start}")
            if now >= end:
                raise MemberTlsError("cert", f"{cert} expired at {end}")
        except MemberTlsError as exc:
            if signature != self._refused:
                self._refused = signature
                self.reload_failures += 1
                log.warning("new member TLS files not used yet, keeping the current ones: %s", exc)
            return self._context
        self._context, self._loaded, self._refused = context, signature, None
        self.reloads += 1
        log.info("member certificate of %s reloaded", self.identity)
        return context


def _signature(paths: tuple[Path, ...]) -> tuple[object, ...]:
    """What changes when a file is replaced or rewritten: inode, mtime, size."""
    marks: list[object] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            marks.append(None)  # missing for a moment, mid-update
        else:
            marks.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(marks)


def read_certificate(cert: Path) -> x509.Certificate:
    """The PEM certificate file `cert`; `MemberTlsError` if unreadable or not PEM."""
    try:
        return x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as exc:
        raise MemberTlsError("cert", f"cannot read {cert}: {exc.strerror or exc}") from None
    except ValueError:
        raise MemberTlsError("cert", f"{cert} is not a PEM certificate") from None


def certificate_identity(cert: Path) -> Identity:
    """The gcks identity carried by the PEM certificate file `cert`."""
    return _identity(read_certificate(cert), cert)


def _identity(loaded: x509.Certificate, cert: Path) -> Identity:
    try:
        return Identity.from_certificate(loaded)
    except IdentityError as exc:
        raise MemberTlsError("cert", f"{cert}: {exc}") from None


def verify_node(stream: trio.SSLStream[Any], expected_id: str | None = None) -> Identity:
    """The node identity of the server of a completed handshake; `IdentityError` if the
    server is not a node (or not `expected_id`). The caller closes the connection."""
    der: bytes | None = stream.getpeercert(binary_form=True)
    return require(Identity.from_der(der), Role.NODE, expected_id)
