"""Security association records shared by nodes and members.

A `KeySA` is one key with its SPI, cipher suite and lifetime: a TEK (DATA SA)
or a KEK (REKEY SA). Times are integer milliseconds since the Unix epoch,
chosen by the leader and carried in commands and messages, so that every node
and member computes the same thing without reading a clock here.

Keys never appear in `repr()` (and so never in logs or tracebacks); use
`fingerprint()` to name a key.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

MAX_SPI = 0xFFFF_FFFF


def fingerprint(key: bytes) -> str:
    """First 16 hex digits of SHA-256 of `key`: how keys are named in logs and events."""
    return hashlib.sha256(key).hexdigest()[:16]


class CipherSuite(enum.StrEnum):
    """AEAD used by a DATA SA (and by the rekey body under the KEK)."""

    AES_256_GCM = "aes-256-gcm"
    CHACHA20_POLY1305 = "chacha20-poly1305"


@dataclass(frozen=True, slots=True)
class KeySA:
    """One TEK or KEK: SPI, suite, 32-byte key, activation and expiry (ms since epoch)."""

    spi: int
    suite: CipherSuite
    key: bytes = field(repr=False)
    activation_ms: int
    expiry_ms: int

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def active_at(self, now_ms: int) -> bool:
        return self.activation_ms <= now_ms < self.expiry_ms


@dataclass(frozen=True, slots=True)
class PathKey:
    """One LKH key a member holds: tree node, key version, key."""

    node: int
    version: int
    key: bytes = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """The new key of LKH tree node `node` (at `version`), wrapped (RFC 5649) under
    the key of node `under` at `under_version`. Only holders of that key unwrap it."""

    node: int
    version: int
    under: int
    under_version: int
    wrapped: bytes
