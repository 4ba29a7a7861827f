"""The one error hierarchy of `gcks.proto`.

Like h11, errors say whose fault it was. `ProtocolError` and its subclasses
mean the *remote* side sent something invalid: untrusted bytes that failed to
decode, verify or pass a protocol rule. Callers catch `ProtocolError`, log it,
drop the input (and the connection where needed) and go on. `PolicyError`
means a local configuration is wrong; `KeyTreeError` means local misuse of the
key tree. Messages never contain key material: fingerprints at most.
"""

from __future__ import annotations


class GcksProtoError(Exception):
    """Base of every error `gcks.proto` raises on purpose."""


class ProtocolError(GcksProtoError):
    """The remote side sent bytes that are invalid; drop them."""


class DecodeError(ProtocolError):
    """Bytes are not a well-formed message: bad msgpack, wrong types, sizes or ranges."""


class FrameTooLarge(DecodeError):
    """A stream frame announces more bytes than the configured maximum."""


class UnsupportedVersion(DecodeError):
    """The message carries a protocol version this implementation does not speak."""


class AuthenticationError(ProtocolError):
    """A signature or an AEAD tag did not verify: the bytes were altered or forged."""


class BadSignature(AuthenticationError):
    """An Ed25519 signature did not verify under the expected public key."""


class DecryptError(AuthenticationError):
    """AEAD decryption failed (wrong key, altered ciphertext, header or tag)."""


class UnknownSPI(ProtocolError):
    """The SPI names no key this receiver holds (a missed rekey: resynchronise)."""


class ReplayError(ProtocolError):
    """A message id or sequence number was already seen or is too old."""


class KeyExpired(ProtocolError):
    """The SA named by the SPI exists but is not active at the given time."""


class PolicyError(GcksProtoError):
    """A group policy is invalid. `key` names the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"policy key {key!r}: {message}")
        self.key = key


class KeyTreeError(GcksProtoError):
    """Local misuse of the LKH key tree (unknown member, duplicate member, ...)."""


class IdentityError(ProtocolError):
    """A peer certificate carries no valid gcks identity (`urn:gcks:ROLE:ID`), more than
    one, or one whose role or id is not the one this connection requires."""


class WrongGroup(ProtocolError):
    """A rekey datagram names another group than the one it was opened for (drop it:
    several groups may share a multicast address)."""


class SequenceExhausted(GcksProtoError):
    """A data sender used every sequence number under its TEK: nonces would repeat.
    Local condition: switch to a new TEK (rekey) before sending again."""
