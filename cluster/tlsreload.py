"""This node's TLS contexts, reloaded in place when its certificate files change.

cert-manager (see `deploy/`) renews certificates well before they expire and
rewrites the mounted files. A node that read them only at start would present
the old certificate until it expired, and then lose every peer and member. So
a node keeps one `ssl.SSLContext` per listener and dial direction for its
whole life, and when the files change (checked every `CHECK_INTERVAL_S`, or at
once on SIGHUP) loads the new certificate and key into each: new connections
present the new certificate, open ones keep theirs.

A new certificate must pass what the node checks at start (readable, its key
matching, role node and this node's id) and more: issued by a CA in the
configured cluster CA file, and inside its validity period. Otherwise the node
keeps the old one and says why (an error line, `gcks_tls_reload_failures_total`).
Changed CA files are added to what the contexts trust (a CA rollover needs the
old and the new for a while); a CA stays trusted until the node restarts.

May import trio, `gcks.cluster` (config, tls) and `gcks.proto`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Final

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from gcks.cluster import tls
from gcks.cluster.config import TlsConfig
from gcks.proto.identity import Identity, Role

log = logging.getLogger(__name__)

CHECK_INTERVAL_S: Final = 30.0

_Stamp = tuple[int, int, int] | None  # (inode, size, mtime ns) of a file; None: missing


class NodeTls:
    """The TLS contexts of one node, and their reload (see the module docstring)."""

    def __init__(
        self,
        files: TlsConfig,
        node_id: str,
        *,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._files = files
        self._identity = Identity(Role.NODE, node_id)
        self._now = now
        ca, cert, key = files.cluster_ca, files.cert, files.key
        self.peer_server = tls.peer_server_context(cluster_ca=ca, cert=cert, key=key)
        self.peer_client = tls.peer_client_context(cluster_ca=ca, cert=cert, key=key)
        self.admin_server = tls.admin_server_context(cluster_ca=ca, cert=cert, key=key)
        self.member_server = tls.member_server_context(
            member_ca=files.member_ca, cert=cert, key=key
        )
        self.expiry = _read_certificate(cert).not_valid_after_utc
        self.reloads = 0
        self.reload_failures = 0
        self._stamps = self._stat()

    def changed(self) -> bool:
        """Whether a TLS file changed since it was last loaded (or refused)."""
        return self._stat() != self._stamps

    def reload(self) -> None:
        """Load the current files into every context. Raises `TlsSetupError`
        and changes nothing when the new certificate cannot be used."""
        files, stamps = self._files, self._stat()
        # Refused files are not retried until they change again (or SIGHUP).
        self._stamps = stamps
        certificate = self._check(files)
        try:
            for context in (self.peer_server, self.peer_client, self.admin_server):
                context.load_verify_locations(cafile=str(files.cluster_ca))
            self.member_server.load_verify_locations(cafile=str(files.member_ca))
            for context in (
                self.peer_server,
                self.peer_client,
                self.admin_server,
                self.member_server,
            ):
                context.load_cert_chain(str(files.cert), str(files.key), password=b"")
        except (OSError, ssl.SSLError) as exc:
            # Rewritten between the check and the load: some contexts may hold
            # the new pair, some the old (both valid). Load again next check.
            self._stamps = ()
            raise tls.TlsSetupError("cert", f"files changed while loading: {exc}") from None
        self.expiry = certificate.not_valid_after_utc
        self.reloads += 1

    def _check(self, files: TlsConfig) -> x509.Certificate:
        # Every load a context will do, first into throwaway contexts: a
        # refusal must leave the live ones as they were.
        tls.peer_server_context(cluster_ca=files.cluster_ca, cert=files.cert, key=files.key)
        tls.member_server_context(member_ca=files.member_ca, cert=files.cert, key=files.key)
        identity = tls.certificate_identity(files.cert)
        if identity != self._identity:
            raise tls.TlsSetupError(
                "cert", f"{files.cert} is the certificate of {identity}, not of {self._identity}"
            )
        certificate = _read_certificate(files.cert)
        now = self._now()
        if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
            raise tls.TlsSetupError(
                "cert",
                f"{files.cert} is valid from {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} "
                f"to {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now",
            )
        if not _issued_by_one_of(certificate, files.cluster_ca):
            raise tls.TlsSetupError("cert", f"{files.cert} is not issued by a CA in cluster_ca")
        return certificate

    def _stat(self) -> tuple[_Stamp, ...]:
        files = self._files
        return tuple(_stamp(p) for p in (files.cluster_ca, files.member_ca, files.cert, files.key))


async def watch(
    node_tls: NodeTls,
    interval_s: float = CHECK_INTERVAL_S,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload `node_tls` when its files change (every `interval_s`) or on SIGHUP."""
    with trio.open_signal_receiver(signal.SIGHUP) as hangups:
        task_status.started()
        while True:
            asked = False
            with trio.move_on_after(interval_s):
                await hangups.__anext__()
                asked = True
            if not asked and not node_tls.changed():
                continue
            try:
                node_tls.reload()
            except tls.TlsSetupError as exc:
                node_tls.reload_failures += 1
                log.error(
                    "TLS files not reloaded; still presenting the certificate that expires "
                    "%s UTC: %s",
                    f"{node_tls.expiry:%Y-%m-%d %H:%M}",
                    exc,
                )
            else:
                log.info(
                    "TLS files reloaded; the certificate now presented expires %s UTC",
                    f"{node_tls.expiry:%Y-%m-%d %H:%M}",
                )


def _stamp(path: Path) -> _Stamp:
    try:
        st = os.stat(path)  # follows symlinks: Kubernetes swaps a link to new files
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise tls.TlsSetupError("cert", f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise tls.TlsSetupError("cert", f"{path} is not a PEM certificate") from None


def _issued_by_one_of(certificate: x509.Certificate, ca_file: Path) -> bool:
    try:
        authorities = x509.load_pem_x509_certificates(ca_file.read_bytes())
    except (OSError, ValueError):
        return False
    for authority in authorities:
        try:
            certificate.verify_directly_issued_by(authority)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False
