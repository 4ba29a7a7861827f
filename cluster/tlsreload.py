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
keeps the old one and says why (an error line, `gcks_tls_reload_failures_total`);
refused files are tried again when they change, except a certificate that is
not valid yet, which is tried at every check. A reload reads each file once
into a private copy and checks and loads that copy, so a file rewritten
meanwhile cannot leave a context holding a key that fits no certificate.
Changed CA files are added to what the contexts trust (a CA rollover needs the
old and the new for a while); a CA stays trusted until the node restarts.

May import trio, `gcks.cluster` (config, tls) and `gcks.proto`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import tempfile
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
        scratch: Path,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        """`scratch`: a private writable directory (the node's data directory)
        for the moment a reload copies the files it checks and loads."""
        self._files = files
        self._scratch = scratch
        self._identity = Identity(Role.NODE, node_id)
        self._now = now
        ca, cert, key = files.cluster_ca, files.cert, files.key
        self.peer_server = tls.peer_server_context(cluster_ca=ca, cert=cert, key=key)
        self.peer_client = tls.peer_client_context(cluster_ca=ca, cert=cert, key=key)
        self.admin_server = tls.admin_server_context(cluster_ca=ca, cert=cert, key=key)
        self.member_server = tls.member_server_context(
            member_ca=files.member_ca, cert=cert, key=key
        )
        self.expiry = tls.read_certificate(cert).not_valid_after_utc
        self.reloads = 0
        self.reload_failures = 0
        self._stamps = self._stat()

    def changed(self) -> bool:
        """Whether a TLS file changed since it was last loaded (or refused)."""
        return self._stat() != self._stamps

    def reload(self) -> None:
        """Load the current files into every context. Raises `TlsSetupError`
        and changes nothing when the new certificate cannot be used."""
        stamps = self._stat()
        # Refused files are not retried until they change again (or SIGHUP),
        # except a certificate that is not valid yet: this clock may lag.
        self._stamps = stamps
        with tempfile.TemporaryDirectory(prefix=".tls-reload-", dir=self._scratch) as tmp:
            # Checked and loaded from one private copy, so a file rewritten
            # meanwhile cannot leave a context with a key that fits no certificate.
            files = _copy(self._files, Path(tmp))
            try:
                certificate = self._check(files)
            except _NotYetValid:
                self._stamps = ()
                raise
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
        self.expiry = certificate.not_valid_after_utc
        self.reloads += 1

    def _check(self, files: TlsConfig) -> x509.Certificate:
        # Every load a context will do, first into throwaway contexts: a
        # refusal must leave the live ones as they were.
        tls.peer_server_context(cluster_ca=files.cluster_ca, cert=files.cert, key=files.key)
        tls.member_server_context(member_ca=files.member_ca, cert=files.cert, key=files.key)
        certificate = tls.read_certificate(files.cert)
        # The throwaway loads above already refused a certificate without one.
        identity = Identity.from_certificate(certificate)
        if identity != self._identity:
            raise tls.TlsSetupError(
                "cert", f"the new certificate is of {identity}, not of {self._identity}"
            )
        now = self._now()
        window = (
            f"valid from {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} "
            f"to {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now"
        )
        if now < certificate.not_valid_before_utc:
            raise _NotYetValid("cert", f"the new certificate is {window} (retried)")
        if now >= certificate.not_valid_after_utc:
            raise tls.TlsSetupError("cert", f"the new certificate is {window}")
        if not _issued_by_one_of(certificate, files.cluster_ca):
            raise tls.TlsSetupError(
                "cert", "the new certificate is not issued by a CA in cluster_ca"
            )
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


class _NotYetValid(tls.TlsSetupError):
    """The new certificate's validity starts later (or this clock lags)."""


def _copy(files: TlsConfig, directory: Path) -> TlsConfig:
    """The four files copied into `directory` (0600), read once each."""
    copies = []
    for name, source in (
        ("cluster_ca", files.cluster_ca),
        ("member_ca", files.member_ca),
        ("cert", files.cert),
        ("key", files.key),
    ):
        target = directory / name
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise tls.TlsSetupError(name, f"cannot read {source}: {exc.strerror or exc}") from None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        copies.append(target)
    return TlsConfig(*copies)


def _stamp(path: Path) -> _Stamp:
    try:
        st = os.stat(path)  # follows symlinks: Kubernetes swaps a link to new files
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


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
