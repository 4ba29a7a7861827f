"""REKEY SA datagrams: seal (GCKS side) and open (member side) over an opaque body.

Wire layout (integers big-endian)::

    header:    version u8 | type u8 | group length u8 | group UTF-8 (1..64 bytes)
               | KEK SPI u32 | message id u64 | ciphertext length u32
    ciphertext: AEAD(KEK, nonce = KEK SPI u32 || message id u64, aad = header, body)
    signature: Ed25519 (64 bytes) by the group's rekey signing key over header || ciphertext

Why this shape (RFC 9838 rules): every member holds the KEK, so the AEAD alone
would let any member forge a rekey; the signature by a key only the GCKS
cluster holds stops that. The nonce is derived, not random, so every GCKS
node seals byte-identical copies of a committed rekey (Ed25519 is
deterministic too) and retransmissions are identical. It never repeats for
different plaintexts because message ids strictly increase per group and a
(KEK, message id) pair is sealed from one committed body only. The explicit
ciphertext length makes truncation and trailing bytes a decode error found
before any cryptography.

Opening checks, cheapest and least trusting first: size and header decode,
group, message id (so replayed copies cost no signature check), signature
BEFORE decryption (so a forged datagram can neither make a member try its
keys nor, through an unknown SPI, push it into re-registration), KEK lookup,
AEAD.

The body schema lives in `gcks.proto.messages`; this module treats it as
bytes. May import: the standard library, `cryptography`, `gcks.proto.errors`,
`gcks.proto.sa`, `gcks.proto.codec` (for the frame size limit). Must never:
read a clock, do I/O, put key material in errors or reprs, or raise anything
but a `ProtocolError` subclass on untrusted bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from gcks.proto.codec import DEFAULT_MAX_FRAME
from gcks.proto.errors import (
    BadSignature,
    DecodeError,
    DecryptError,
    ReplayError,
    UnknownSPI,
    UnsupportedVersion,
    WrongGroup,
)
from gcks.proto.sa import MAX_SPI, CipherSuite, KeySA

__all__ = [
    "MAX_GROUP_ID_BYTES",
    "MAX_MESSAGE_ID",
    "MAX_MULTICAST_REKEY",
    "MAX_REKEY_DATAGRAM",
    "REKEY_VERSION",
    "OpenedRekey",
    "RekeyHeader",
    "open_rekey",
    "parse_rekey_header",
    "seal_rekey",
]

REKEY_VERSION = 1
REKEY_TYPE = 0x52  # "R": a datagram of another kind on the same port fails early
MAX_GROUP_ID_BYTES = 64
MAX_MESSAGE_ID = (1 << 64) - 1
# A rekey travels as one UDP multicast datagram when it fits, else only by
# unicast push inside one stream frame (with room for the frame's envelope).
MAX_MULTICAST_REKEY = 65_507
MAX_REKEY_DATAGRAM = DEFAULT_MAX_FRAME - 64
SIGNATURE_SIZE = 64
TAG_SIZE = 16
KEY_SIZE = 32

_PREFIX = struct.Struct(">BBB")  # version, type, group length
_TRAILER = struct.Struct(">IQI")  # KEK SPI, message id, ciphertext length
_NONCE = struct.Struct(">IQ")  # KEK SPI, message id
_MIN_DATAGRAM = _PREFIX.size + 1 + _TRAILER.size + TAG_SIZE + SIGNATURE_SIZE


@dataclass(frozen=True, slots=True)
class RekeyHeader:
    """The clear header of a rekey datagram. Unauthenticated until `open_rekey` succeeds."""

    group: str
    kek_spi: int
    msg_id: int


@dataclass(frozen=True, slots=True)
class OpenedRekey:
    """A rekey that passed every check: its header and decrypted body (opaque bytes)."""

    header: RekeyHeader
    body: bytes = field(repr=False)


def _aead(kek: KeySA) -> AESGCM | ChaCha20Poly1305:
    if len(kek.key) != KEY_SIZE:
        raise ValueError(f"KEK {kek.spi} ({kek.fingerprint}): key must be {KEY_SIZE} bytes")
    if kek.suite is CipherSuite.AES_256_GCM:
        return AESGCM(kek.key)
    if kek.suite is CipherSuite.CHACHA20_POLY1305:
        return ChaCha20Poly1305(kek.key)
    raise ValueError(f"KEK {kek.spi}: unsupported cipher suite {kek.suite!r}")


def _encode_group(group: str) -> bytes:
    raw = group.encode("utf-8")
    if not 1 <= len(raw) <= MAX_GROUP_ID_BYTES:
        raise ValueError(f"group id must be 1..{MAX_GROUP_ID_BYTES} UTF-8 bytes")
    return raw


def seal_rekey(
    *, group: str, kek: KeySA, msg_id: int, body: bytes, signer: Ed25519PrivateKey
) -> bytes:
    """Seal `body` as the rekey datagram `msg_id` of `group` under `kek`, signed by `signer`.

    Deterministic: the same inputs always give the same bytes. Raises `ValueError`
    on local misuse (bad group id, SPI, message id, key size, or a datagram that
    would exceed `MAX_REKEY_DATAGRAM`).
    """
    raw_group = _encode_group(group)
    if not 0 <= kek.spi <= MAX_SPI:
        raise ValueError(f"KEK SPI {kek.spi} outside 0..2^32-1")
    if not 0 <= msg_id <= MAX_MESSAGE_ID:
        raise ValueError(f"message id {msg_id} outside 0..2^64-1")
    aead = _aead(kek)
    ct_len = len(body) + TAG_SIZE
    header = b"".join(
        (
            _PREFIX.pack(REKEY_VERSION, REKEY_TYPE, len(raw_group)),
            raw_group,
            _TRAILER.pack(kek.spi, msg_id, ct_len),
        )
    )
    total = len(header) + ct_len + SIGNATURE_SIZE
    if total > MAX_REKEY_DATAGRAM:
        raise ValueError(f"rekey datagram of {total} bytes exceeds {MAX_REKEY_DATAGRAM}")
    signed = header + aead.encrypt(_NONCE.pack(kek.spi, msg_id), body, header)
    return signed + signer.sign(signed)


def _parse(datagram: bytes) -> tuple[RekeyHeader, int]:
    """Decode and size-check the header; return it with its length in bytes."""
    size = len(datagram)
    if size > MAX_REKEY_DATAGRAM:
        raise DecodeError(f"rekey datagram of {size} bytes exceeds {MAX_REKEY_DATAGRAM}")
    if size < _MIN_DATAGRAM:
        raise DecodeError(f"rekey datagram of {size} bytes is too short")
    version, kind, group_len = _PREFIX.unpack_from(datagram)
    if version != REKEY_VERSION:
        raise UnsupportedVersion(f"rekey version {version}")
    if kind != REKEY_TYPE:
        raise DecodeError(f"message type {kind:#04x} is not a rekey")
    if not 1 <= group_len <= MAX_GROUP_ID_BYTES:
        raise DecodeError(f"group id length {group_len} outside 1..{MAX_GROUP_ID_BYTES}")
    group_end = _PREFIX.size + group_len
    header_len = group_end + _TRAILER.size
    if size < header_len + TAG_SIZE + SIGNATURE_SIZE:
        raise DecodeError(f"rekey datagram of {size} bytes is too short")
    try:
        group = bytes(datagram[_PREFIX.size : group_end]).decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("group id is not valid UTF-8") from None
    kek_spi, msg_id, ct_len = _TRAILER.unpack_from(datagram, group_end)
    if ct_len < TAG_SIZE or header_len + ct_len + SIGNATURE_SIZE != size:
        raise DecodeError(
            f"rekey ciphertext length {ct_len} does not match a datagram of {size} bytes"
        )
    return RekeyHeader(group=group, kek_spi=kek_spi, msg_id=msg_id), header_len


def parse_rekey_header(datagram: bytes) -> RekeyHeader:
    """Decode the header only, no cryptography: enough to drop duplicate copies of a
    message already accepted (from other GCKS nodes or retransmissions) by message id.
    Raises `DecodeError` (or `UnsupportedVersion`). The result is NOT authenticated."""
    header, _ = _parse(datagram)
    return header


def open_rekey(
    datagram: bytes,
    *,
    group: str,
    keks: Mapping[int, KeySA],
    verify_key: Ed25519PublicKey,
    last_msg_id: int,
) -> OpenedRekey:
    """Authenticate and decrypt a rekey datagram of `group` newer than `last_msg_id`.

    Raises `DecodeError`/`UnsupportedVersion` (malformed, truncated, trailing
    bytes), `WrongGroup`, `ReplayError` (message id <= `last_msg_id`),
    `BadSignature`, `UnknownSPI` (authentic, but under a KEK this member does not
    hold: resynchronise), `DecryptError`. A member advances its `last_msg_id`
    only after this returns, and re-registers on a gap.
    """
    header, header_len = _parse(datagram)
    if header.group != group:
        raise WrongGroup(f"rekey for group {header.group!r}, expected {group!r}")
    if header.msg_id <= last_msg_id:
        raise ReplayError(f"rekey message id {header.msg_id} <= last accepted {last_msg_id}")
    signed_end = len(datagram) - SIGNATURE_SIZE
    try:
        verify_key.verify(datagram[signed_end:], datagram[:signed_end])
    except InvalidSignature:
        raise BadSignature(f"rekey {header.msg_id} of group {group!r}: bad signature") from None
    kek = keks.get(header.kek_spi)
    if kek is None:
        raise UnknownSPI(f"rekey {header.msg_id} is under unknown KEK SPI {header.kek_spi}")
    try:
        body = _aead(kek).decrypt(
            _NONCE.pack(header.kek_spi, header.msg_id),
            datagram[header_len:signed_end],
            datagram[:header_len],
        )
    except (InvalidTag, ValueError):
        # ValueError: a malformed KEK record (wrong key size) must not escape
        # as anything but the typed error of a failed decryption.
        raise DecryptError(
            f"rekey {header.msg_id} failed to decrypt under KEK {header.kek_spi} "
            f"({kek.fingerprint})"
        ) from None
    return OpenedRekey(header=header, body=body)
