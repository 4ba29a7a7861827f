"""DATA SA packet protection: what a member sender emits and a member receiver accepts.

Packet layout (all integers big-endian)::

    version u8 | flags u8 | SPI u32 | sender id u32 | sequence u64
    | AEAD ciphertext+tag | [Ed25519 signature, 64 bytes, iff flags & SIGNED]

The 18-byte header is the AEAD associated data. The 12-byte nonce is
`sender id || sequence`, i.e. header bytes 6..18: sender ids are allocated
uniquely per group by consensus and a sender never repeats a sequence number
under one TEK, so no two packets under one TEK share a nonce.

Source authentication: group authentication alone only proves "some member
sent this" (RFC 3740 §5.3), so a sender may sign header||ciphertext with its
own Ed25519 key. The SIGNED flag sits in the authenticated header, so it
cannot be stripped without failing the AEAD. A signed packet is always
verified (no key for its sender: rejected); an unsigned packet is rejected
when the group policy requires source authentication.

Receiving order, chosen for cost under attack: cheap decode, SPI and lifetime
checks first; the replay check BEFORE decryption; AEAD (cheap, stops
outsiders) before the signature (expensive, stops members impersonating
other senders); the replay window moves only AFTER everything authenticated.

This module is the data-plane hot path, so it deliberately avoids per-packet
objects: a precompiled `struct.Struct`, AEAD objects cached per SA, slotted
state, no dataclasses built per packet.

May import: the standard library, `cryptography`, `gcks.proto.errors`,
`gcks.proto.sa`, `gcks.proto.replay`. Must never: read a clock (callers pass
`now_ms`), do I/O, log or expose key material, or raise anything but a
`ProtocolError` subclass on untrusted packet bytes.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from gcks.proto.errors import (
    BadSignature,
    DecodeError,
    DecryptError,
    KeyExpired,
    SequenceExhausted,
    UnknownSPI,
    UnsupportedVersion,
)
from gcks.proto.replay import MAX_SEQUENCE, ReplayWindow
from gcks.proto.sa import MAX_SPI, CipherSuite, KeySA

__all__ = [
    "DATA_VERSION",
    "FLAG_SIGNED",
    "HEADER",
    "HEADER_SIZE",
    "MAX_DATA_PACKET",
    "MAX_SENDER_ID",
    "SIGNATURE_SIZE",
    "TAG_SIZE",
    "DataReceiver",
    "DataSender",
]

DATA_VERSION = 1
FLAG_SIGNED = 0x01
HEADER = struct.Struct(">BBIIQ")
HEADER_SIZE = HEADER.size
TAG_SIZE = 16
SIGNATURE_SIZE = 64
KEY_SIZE = 32
MAX_SENDER_ID = 0xFFFF_FFFF
# Largest UDP payload over IPv4; a data packet is one datagram.
MAX_DATA_PACKET = 65_507

_MIN_PACKET = HEADER_SIZE + TAG_SIZE
# The nonce is header[6:18]: sender id || sequence.
_NONCE_START = 6

_PREFIX = struct.Struct(">BBI")  # version, flags, SPI
_unpack_header = HEADER.unpack_from
_pack_nonce = struct.Struct(">IQ").pack  # sender id, sequence

_Aead = AESGCM | ChaCha20Poly1305


def _aead_for(sa: KeySA) -> _Aead:
    """The AEAD object of `sa` (callers keep it per SA). `ValueError` on a malformed SA."""
    if len(sa.key) != KEY_SIZE:
        raise ValueError(f"SA {sa.spi} ({sa.fingerprint}): key must be {KEY_SIZE} bytes")
    if sa.suite is CipherSuite.AES_256_GCM:
        return AESGCM(sa.key)
    if sa.suite is CipherSuite.CHACHA20_POLY1305:
        return ChaCha20Poly1305(sa.key)
    raise ValueError(f"SA {sa.spi}: unsupported cipher suite {sa.suite!r}")


def _check_sa(sa: KeySA) -> None:
    if not 0 <= sa.spi <= MAX_SPI:
        raise ValueError(f"SPI {sa.spi} outside 0..2^32-1")
    if sa.activation_ms >= sa.expiry_ms:
        raise ValueError(f"SA {sa.spi} ({sa.fingerprint}): activation not before expiry")


class DataSender:
    """One sender's protection state: current TEK, sender id, sequence counter.

    Sequence numbers start at `first_sequence` under each TEK and never wrap:
    when they run out `protect` raises `SequenceExhausted`. The caller must
    never build two senders for the same (TEK, sender id), e.g. after a
    restart, unless it resumes `first_sequence` past every number already
    used: that would repeat nonces.
    """

    __slots__ = (
        "_encrypt",
        "_flags",
        "_max_payload",
        "_next_seq",
        "_prefix",
        "_sender_id",
        "_signer",
        "_spi",
        "_used",
    )

    def __init__(
        self,
        tek: KeySA,
        *,
        sender_id: int,
        signer: Ed25519PrivateKey | None = None,
        first_sequence: int = 0,
    ) -> None:
        if not 0 <= sender_id <= MAX_SENDER_ID:
            raise ValueError(f"sender id {sender_id} outside 0..2^32-1")
        if not 0 <= first_sequence <= MAX_SEQUENCE + 1:
            raise ValueError(f"first sequence {first_sequence} outside 0..2^64")
        self._sender_id = sender_id
        self._signer = signer
        self._flags = FLAG_SIGNED if signer is not None else 0
        overhead = HEADER_SIZE + TAG_SIZE + (SIGNATURE_SIZE if signer is not None else 0)
        self._max_payload = MAX_DATA_PACKET - overhead
        # SHA-256 of every key this sender used: switching back to one would
        # restart its sequence numbers and repeat nonces.
        self._used: set[bytes] = set()
        self._install(tek)
        self._next_seq = first_sequence

    def _install(self, tek: KeySA) -> None:
        _check_sa(tek)
        digest = hashlib.sha256(tek.key).digest()
        if digest in self._used:
            raise ValueError(f"TEK {tek.spi} ({tek.fingerprint}) was already used by this sender")
        self._encrypt = _aead_for(tek).encrypt
        self._used.add(digest)
        self._spi = tek.spi
        # The header is this constant prefix followed by the nonce.
        self._prefix = _PREFIX.pack(DATA_VERSION, self._flags, tek.spi)

    @property
    def spi(self) -> int:
        return self._spi

    @property
    def sender_id(self) -> int:
        return self._sender_id

    @property
    def next_sequence(self) -> int:
        return self._next_seq

    @property
    def signs(self) -> bool:
        return self._signer is not None

    def use_tek(self, tek: KeySA) -> None:
        """Switch to a new TEK (after a rekey); sequence numbers restart at 0."""
        self._install(tek)
        self._next_seq = 0

    def protect(self, payload: bytes) -> bytes:
        """Return the protected packet for `payload` and consume one sequence number."""
        if len(payload) > self._max_payload:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {self._max_payload}")
        seq = self._next_seq
        try:
            nonce = _pack_nonce(self._sender_id, seq)
        except struct.error:
            # struct refuses a sequence number beyond u64: that is the exhaustion check.
            raise SequenceExhausted(
                f"sender {self._sender_id} used every sequence number under TEK {self._spi}"
            ) from None
        self._next_seq = seq + 1
        header = self._prefix + nonce
        packet = header + self._encrypt(nonce, payload, header)
        signer = self._signer
        if signer is None:
            return packet
        return packet + signer.sign(packet)

    def __repr__(self) -> str:
        return f"DataSender(spi={self._spi}, sender_id={self._sender_id}, next={self._next_seq})"


class _ReceiveSA:
    """Receiver state of one TEK: its AEAD, acceptance interval, replay windows by sender."""

    __slots__ = ("decrypt", "end_ms", "start_ms", "tek", "windows")

    def __init__(self, tek: KeySA) -> None:
        self.tek = tek
        self.decrypt = _aead_for(tek).decrypt
        self.start_ms = tek.activation_ms
        self.end_ms = tek.expiry_ms
        self.windows: dict[int, ReplayWindow] = {}


class DataReceiver:
    """A member's receive side: TEKs by SPI, per-(SPI, sender) replay windows.

    A TEK is accepted from its activation until the earlier of its expiry and
    the deactivation time given to `retire`, so packets in flight across a
    rekey still decrypt under the previous TEK. Signed packets are verified
    with the key registered for their sender id (`set_sender_key`); with
    `require_source_auth`, unsigned packets are rejected too.
    """

    __slots__ = ("_require_auth", "_sas", "_sender_keys", "_window_size")

    def __init__(self, *, window_size: int, require_source_auth: bool = False) -> None:
        ReplayWindow(window_size)  # validates the size once, at configuration time
        self._window_size = window_size
        self._require_auth = require_source_auth
        self._sas: dict[int, _ReceiveSA] = {}
        self._sender_keys: dict[int, Ed25519PublicKey] = {}

    @property
    def spis(self) -> frozenset[int]:
        return frozenset(self._sas)

    @property
    def requires_source_auth(self) -> bool:
        return self._require_auth

    def install(self, tek: KeySA) -> None:
        """Add a TEK. Installing the same TEK again is a no-op (replay state is kept)."""
        _check_sa(tek)
        current = self._sas.get(tek.spi)
        if current is not None:
            if current.tek == tek:
                return
            raise ValueError(f"SPI {tek.spi} already names another TEK ({current.tek.fingerprint})")
        self._sas[tek.spi] = _ReceiveSA(tek)

    def adopt_replay_state(self, previous: DataReceiver) -> None:
        """Take over `previous`'s replay windows for every TEK both hold (same
        SPI, same key). A member that registers again gets a fresh receiver
        from its new GSA; without this, packets it accepted before under a TEK
        that is still valid would be accepted once more."""
        for spi, sa in self._sas.items():
            old = previous._sas.get(spi)
            if old is not None and old.tek.key == sa.tek.key:
                sa.windows = old.windows

    def retire(self, spi: int, *, deactivate_at_ms: int) -> None:
        """Accept packets under `spi` only until `deactivate_at_ms` (never past expiry)."""
        sa = self._sas.get(spi)
        if sa is None:
            raise ValueError(f"no TEK with SPI {spi} to retire")
        sa.end_ms = min(sa.end_ms, deactivate_at_ms)

    def remove(self, spi: int) -> None:
        """Forget a TEK and its replay windows at once."""
        self._sas.pop(spi, None)

    def prune(self, now_ms: int) -> tuple[int, ...]:
        """Forget every TEK no longer accepted at `now_ms`; return their SPIs."""
        gone = tuple(spi for spi, sa in self._sas.items() if now_ms >= sa.end_ms)
        for spi in gone:
            del self._sas[spi]
        return gone

    def set_sender_key(self, sender_id: int, public_key: Ed25519PublicKey) -> None:
        """Register the source-authentication key of `sender_id` (from the GSA)."""
        if not 0 <= sender_id <= MAX_SENDER_ID:
            raise ValueError(f"sender id {sender_id} outside 0..2^32-1")
        self._sender_keys[sender_id] = public_key

    def forget_sender(self, sender_id: int) -> None:
        """Drop a departed sender's key: its signed packets are rejected from now on.

        Its replay windows stay until their TEK goes (`remove`, `prune`):
        dropping them earlier would let its old packets be replayed while the
        TEK is still accepted.
        """
        self._sender_keys.pop(sender_id, None)

    def unprotect(self, packet: bytes, now_ms: int) -> tuple[int, bytes]:
        """Verify and decrypt one packet; return (sender id, payload).

        Raises `DecodeError`, `UnsupportedVersion`, `UnknownSPI`, `KeyExpired`,
        `ReplayError`, `DecryptError` or `BadSignature`; the replay state only
        changes when the packet is accepted.
        """
        size = len(packet)
        if size < _MIN_PACKET or size > MAX_DATA_PACKET:
            raise DecodeError(f"data packet of {size} bytes")
        version, flags, spi, sender_id, seq = _unpack_header(packet)
        if version != DATA_VERSION:
            raise UnsupportedVersion(f"data packet version {version}")
        # Subscripts rather than .get(): CPython specialises them, and this
        # is the per-packet path; misses are the rare case.
        try:
            sa = self._sas[spi]
        except KeyError:
            raise UnknownSPI(f"no TEK with SPI {spi}") from None
        if not sa.start_ms <= now_ms < sa.end_ms:
            raise KeyExpired(f"TEK {spi} not accepted at {now_ms}")
        window: ReplayWindow | None
        try:
            window = sa.windows[sender_id]
        except KeyError:
            window = None  # first packet from this sender under this TEK
        else:
            # Above the highest accepted is always new: the in-order case
            # needs no call.
            if seq <= window.highest:
                window.check(seq)
        if flags:
            payload = self._open_signed(sa, packet, flags, sender_id)
        elif self._require_auth:
            raise BadSignature(f"unsigned packet from sender {sender_id}; source auth required")
        else:
            try:
                payload = sa.decrypt(
                    packet[_NONCE_START:HEADER_SIZE], packet[HEADER_SIZE:], packet[:HEADER_SIZE]
                )
            except InvalidTag:
                raise DecryptError(f"data packet under TEK {spi} failed to authenticate") from None
        if window is None:
            window = sa.windows[sender_id] = ReplayWindow(self._window_size)
        window.commit(seq)
        return sender_id, payload

    def _open_signed(self, sa: _ReceiveSA, packet: bytes, flags: int, sender_id: int) -> bytes:
        if flags != FLAG_SIGNED:
            raise DecodeError(f"data packet flags {flags:#04x}")
        signed_end = len(packet) - SIGNATURE_SIZE
        if signed_end < _MIN_PACKET:
            raise DecodeError(f"signed data packet of {len(packet)} bytes")
        # AEAD first: it is cheap and stops non-members; the signature then
        # stops members that pose as another sender.
        try:
            payload = sa.decrypt(
                packet[_NONCE_START:HEADER_SIZE],
                packet[HEADER_SIZE:signed_end],
                packet[:HEADER_SIZE],
            )
        except InvalidTag:
            raise DecryptError(
                f"data packet under TEK {sa.tek.spi} failed to authenticate"
            ) from None
        public_key = self._sender_keys.get(sender_id)
        if public_key is None:
            raise BadSignature(f"no source authentication key for sender {sender_id}")
        try:
            public_key.verify(packet[signed_end:], packet[:signed_end])
        except InvalidSignature:
            raise BadSignature(f"bad source signature for sender {sender_id}") from None
        return payload

    def __repr__(self) -> str:
        return f"DataReceiver(spis={sorted(self._sas)}, source_auth={self._require_auth})"
