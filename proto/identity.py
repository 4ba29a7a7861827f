"""Who is on the other end of a TLS connection: the gcks identity in a certificate.

Every gcks certificate names its holder by exactly one URI subject alternative
name `urn:gcks:ROLE:ID` (ROLE is node, member or admin; ID is 1..64 characters
of `[A-Za-z0-9._-]`). The TLS layer proves that the peer holds the key of a
certificate signed by a trusted CA; this module says which identity that
certificate carries and whether it is the one a connection requires, so that a
member certificate never passes as a node or an admin. Shared by node and
member. It may import `cryptography` and `gcks.proto.errors`; it is sans-IO:
no sockets, no `ssl`, no clock reads (chain and validity checks belong to the
TLS stack). Every failure is one `IdentityError`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection
from dataclasses import dataclass

from cryptography import x509

from gcks.proto.errors import IdentityError

URI_PREFIX = "urn:gcks:"
MAX_ID_LENGTH = 64
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Role(enum.StrEnum):
    """What a certificate holder may do: be a GCKS node, a group member, or an operator."""

    NODE = "node"
    MEMBER = "member"
    ADMIN = "admin"


def is_valid_id(value: str) -> bool:
    """True when `value` may name a node, member or admin (1..64 of `[A-Za-z0-9._-]`)."""
    return _ID_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Identity:
    """A role and an id, as carried by a certificate's `urn:gcks:ROLE:ID` URI."""

    role: Role
    id: str

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise IdentityError(f"unknown role {self.role!r}")
        if not isinstance(self.id, str) or not is_valid_id(self.id):
            raise IdentityError(
                f"invalid id {self.id!r}: 1..{MAX_ID_LENGTH} characters of [A-Za-z0-9._-]"
            )

    @property
    def uri(self) -> str:
        return f"{URI_PREFIX}{self.role.value}:{self.id}"

    def __str__(self) -> str:
        return f"{self.role.value}:{self.id}"

    @classmethod
    def from_uri(cls, uri: str) -> Identity:
        """Parse `urn:gcks:ROLE:ID` exactly (lower-case prefix and role, nothing after ID)."""
        if not uri.startswith(URI_PREFIX):
            raise IdentityError(f"not a gcks identity URI: {uri[:80]!r}")
        role_text, sep, id_text = uri[len(URI_PREFIX) :].partition(":")
        if not sep:
            raise IdentityError(f"gcks identity URI without an id: {uri[:80]!r}")
        try:
            role = Role(role_text)
        except ValueError:
            raise IdentityError(f"unknown role {role_text[:16]!r} in {uri[:80]!r}") from None
        return cls(role, id_text)

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> Identity:
        """The one gcks identity of `cert`; any certificate without exactly one is refused."""
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            raise IdentityError("certificate has no subjectAltName") from None
        except Exception as exc:
            # cryptography parses extensions lazily: malformed ones raise ValueError,
            # and names it cannot represent (x400Address, ediPartyName) raise
            # UnsupportedGeneralNameType, which is not one. A certificate OpenSSL
            # accepted must never take the listener down with it.
            raise IdentityError(
                f"certificate extensions cannot be read: {type(exc).__name__}"
            ) from None
        uris = [
            uri
            for uri in san.value.get_values_for_type(x509.UniformResourceIdentifier)
            # Case-insensitive here so that a second, differently-cased gcks URI counts as
            # a second identity (refused) instead of being silently ignored.
            if uri.lower().startswith(URI_PREFIX)
        ]
        if len(uris) != 1:
            raise IdentityError(f"certificate carries {len(uris)} gcks identity URIs, expected 1")
        return cls.from_uri(uris[0])

    @classmethod
    def from_der(cls, der: bytes | None) -> Identity:
        """From the DER bytes `ssl.SSLObject.getpeercert(binary_form=True)` returns."""
        return cls.from_certificate(cls.load_der(der))

    @staticmethod
    def load_der(der: bytes | None) -> x509.Certificate:
        """The peer certificate of those DER bytes; `IdentityError` if there is none."""
        if not der:
            raise IdentityError("peer presented no certificate")
        try:
            return x509.load_der_x509_certificate(der)
        except Exception:  # the peer's bytes: one typed error, whatever the parser raises
            raise IdentityError("peer certificate is not valid DER X.509") from None


def require(
    identity: Identity,
    role: Role,
    expected_id: str | None = None,
    *,
    allowed_ids: Collection[str] | None = None,
) -> Identity:
    """Return `identity` if it has `role` (and is `expected_id`, and is in `allowed_ids`,
    when given); raise `IdentityError` otherwise."""
    if identity.role != role:
        raise IdentityError(f"peer is {identity}, but this connection requires role {role.value}")
    if expected_id is not None and identity.id != expected_id:
        raise IdentityError(f"peer is {identity}, but {role.value}:{expected_id} was expected")
    if allowed_ids is not None and identity.id not in allowed_ids:
        raise IdentityError(f"peer is {identity}, which is not a configured {role.value}")
    return identity
