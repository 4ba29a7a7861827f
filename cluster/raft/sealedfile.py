"""Sealed files: the encrypted on-disk format shared by Raft log segments and snapshots.

A sealed file is a 52-byte header followed by records::

    header: magic "GCKSSEAL" | version u16 | kind u8 | 0 u8 | file id (16) |
            sync word (4) | key check (16) | crc32 u32 of all before it
    record: length u32 | crc32 u32 | sync word (4) | AES-256-GCM ciphertext+tag

The key check is an HMAC of the header under a key derived from the node
storage key: a header with a good CRC and a bad key check was written under
another key (or altered), which is reported as "wrong storage key", never as
corruption. Each file has its own AES key, derived by HKDF from the storage key
with the random file id as salt, so nonces only need to be unique within a
file: the nonce is the sync word and the record's byte offset, and files are
append-only and never appended to again once recovered (a torn tail is cut and
writing continues in a new file), so no offset is ever sealed twice. The
associated data binds the file id, the kind and the offset: a record copied to
another file or another offset does not open. The CRC catches torn writes
cheaply; the sync word lets recovery find valid records after a damaged one.

May import the standard library, `cryptography` and the storage errors. Must
never put key bytes in a repr, a log line or an error (fingerprints only), and
never reuse a (file, offset) pair for two different records.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gcks.proto.sa import fingerprint

from .storage_errors import StorageError, StorageKeyError, WrongStorageKeyError

STORAGE_KEY_SIZE: Final = 32
FORMAT_VERSION: Final = 1
MAGIC: Final = b"GCKSSEAL"

_HEADER = struct.Struct(">8sHBB16s4s16sI")
HEADER_SIZE: Final = _HEADER.size  # 52
_MAC_INPUT_SIZE: Final = 8 + 2 + 1 + 1 + 16 + 4  # everything before the key check
_KEY_CHECK_SIZE: Final = 16

_RECORD_PREFIX = struct.Struct(">II")  # length of the body, crc32 of length and body
_SYNC_SIZE: Final = 4
_TAG_SIZE: Final = 16
RECORD_OVERHEAD: Final = _RECORD_PREFIX.size + _SYNC_SIZE + _TAG_SIZE
# Bounds a record a (possibly corrupt) length field may announce, so recovery
# never tries to read gigabytes on the word of one damaged length.
MAX_RECORD_PLAINTEXT: Final = 64 * 1024 * 1024
_MIN_BODY: Final = _SYNC_SIZE + _TAG_SIZE
_MAX_BODY: Final = _MIN_BODY + MAX_RECORD_PLAINTEXT

_RECORD_KEY_INFO: Final = b"gcks raft storage v1: record key"
_CHECK_KEY_INFO: Final = b"gcks raft storage v1: header key check"


class FileKind(enum.IntEnum):
    """What a sealed file holds; part of the header and of every record's associated data."""

    SEGMENT = 1
    SNAPSHOT = 2


def _hkdf(key: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


class StorageKey:
    """The node storage key, and what is derived from it. Its repr is a fingerprint."""

    __slots__ = ("_check_key", "_key", "fingerprint")

    def __init__(self, key: bytes) -> None:
        if len(key) != STORAGE_KEY_SIZE:
            raise StorageKeyError(
                f"the node storage key must be {STORAGE_KEY_SIZE} bytes, got {len(key)}"
            )
        self._key = bytes(key)
        self._check_key = _hkdf(self._key, None, _CHECK_KEY_INFO)
        self.fingerprint = fingerprint(self._key)

    def __repr__(self) -> str:
        return f"StorageKey(fingerprint={self.fingerprint})"

    def key_check(self, header_fields: bytes) -> bytes:
        return hmac.new(self._check_key, header_fields, hashlib.sha256).digest()[:_KEY_CHECK_SIZE]

    def record_aead(self, file_id: bytes) -> AESGCM:
        return AESGCM(_hkdf(self._key, file_id, _RECORD_KEY_INFO))


@dataclass(frozen=True, slots=True)
class FileHeader:
    kind: FileKind
    file_id: bytes
    sync: bytes

    @classmethod
    def new(cls, kind: FileKind) -> FileHeader:
        # A sync word without 0x00/0xFF bytes is never found all over a zero-
        # or one-filled block, so scanning a damaged tail stays linear.
        while True:
            sync = secrets.token_bytes(_SYNC_SIZE)
            if 0 not in sync and 0xFF not in sync:
                return cls(kind, secrets.token_bytes(16), sync)

    def encode(self, key: StorageKey) -> bytes:
        fields = struct.pack(
            ">8sHBB16s4s", MAGIC, FORMAT_VERSION, self.kind, 0, self.file_id, self.sync
        )
        checked = fields + key.key_check(fields)
        return checked + struct.pack(">I", zlib.crc32(checked))


def decode_header(data: bytes, key: StorageKey, path: Path, kind: FileKind) -> FileHeader | None:
    """The header at the start of `data`, or None if it is torn or damaged.

    Raises `WrongStorageKeyError` when the header is intact but was sealed under
    another key, and `StorageError` when it is intact but of another format
    version or kind (nothing here can read such a file)."""
    if len(data) < HEADER_SIZE:
        return None
    magic, version, file_kind, _zero, file_id, sync, check, crc = _HEADER.unpack_from(data)
    if zlib.crc32(data[: HEADER_SIZE - 4]) != crc or magic != MAGIC:
        return None
    if version != FORMAT_VERSION:
        raise StorageError(
            f"{path}: storage format version {version}; this build reads only version "
            f"{FORMAT_VERSION}"
        )
    if not hmac.compare_digest(check, key.key_check(data[:_MAC_INPUT_SIZE])):
        raise WrongStorageKeyError(
            f"wrong storage key: {path} was not written under the given key (fingerprint "
            f"{key.fingerprint}), or its header was altered; give the node's own storage key"
        )
    if file_kind != kind:
        raise StorageError(
            f"{path}: sealed file of kind {file_kind}, expected a {kind.name.lower()} "
            f"(kind {kind.value}); the file was renamed or copied here by mistake"
        )
    return FileHeader(FileKind(file_kind), file_id, sync)


@dataclass(frozen=True, slots=True)
class RecordScan:
    """What a scan of a sealed file found after its header.

    `records` are the valid records from the header on, each `(offset,
    plaintext)`, up to the first unreadable byte `damage` (None: the file ends
    cleanly after the last record). `later` are the valid records found beyond
    `damage`; recovery uses them to tell a torn tail from real corruption."""

    records: list[tuple[int, bytes]]
    damage: int | None
    later: list[tuple[int, bytes]] = field(default_factory=list)


class RecordCipher:
    """Seals and opens the records of one sealed file."""

    __slots__ = ("_aead", "_header")

    def __init__(self, key: StorageKey, header: FileHeader) -> None:
        self._header = header
        self._aead = key.record_aead(header.file_id)

    def __repr__(self) -> str:
        return f"RecordCipher(file_id={self._header.file_id.hex()})"

    def _nonce_and_ad(self, offset: int) -> tuple[bytes, bytes]:
        where = offset.to_bytes(8, "big")
        return self._header.sync + where, self._header.file_id + bytes([self._header.kind]) + where

    def seal(self, offset: int, plaintext: bytes) -> bytes:
        """The framed record to write at byte `offset` of the file."""
        if len(plaintext) > MAX_RECORD_PLAINTEXT:
            raise StorageError(
                f"a record of {len(plaintext)} bytes exceeds the limit of {MAX_RECORD_PLAINTEXT}"
            )
        nonce, ad = self._nonce_and_ad(offset)
        body = self._header.sync + self._aead.encrypt(nonce, plaintext, ad)
        length = struct.pack(">I", len(body))
        return length + struct.pack(">I", zlib.crc32(body, zlib.crc32(length))) + body

    def _open_at(self, data: bytes, offset: int) -> tuple[bytes, int] | None:
        """(plaintext, end offset) of a valid record starting at `offset`, else None."""
        end_of_prefix = offset + _RECORD_PREFIX.size
        if end_of_prefix > len(data):
            return None
        length, crc = _RECORD_PREFIX.unpack_from(data, offset)
        end = end_of_prefix + length
        if not _MIN_BODY <= length <= _MAX_BODY or end > len(data):
            return None
        body = data[end_of_prefix:end]
        if zlib.crc32(body, zlib.crc32(data[offset : offset + 4])) != crc:
            return None
        if body[:_SYNC_SIZE] != self._header.sync:
            return None
        nonce, ad = self._nonce_and_ad(offset)
        try:
            return self._aead.decrypt(nonce, body[_SYNC_SIZE:], ad), end
        except InvalidTag:
            return None

    def scan(self, data: bytes) -> RecordScan:
        """All valid records of a whole file's bytes `data` (header included)."""
        records: list[tuple[int, bytes]] = []
        offset = HEADER_SIZE
        while offset < len(data) and (opened := self._open_at(data, offset)) is not None:
            records.append((offset, opened[0]))
            offset = opened[1]
        if offset >= len(data):
            return RecordScan(records, None)
        damage = offset
        later: list[tuple[int, bytes]] = []
        # Resynchronise on the sync word: a candidate record starts 8 bytes before
        # it, and only CRC plus AEAD decide whether it is one.
        search_from = damage + 1 + _RECORD_PREFIX.size
        while (found := data.find(self._header.sync, search_from)) != -1:
            offset = found - _RECORD_PREFIX.size
            opened = self._open_at(data, offset)
            if opened is None:
                search_from = found + 1
                continue
            while opened is not None:
                later.append((offset, opened[0]))
                offset = opened[1]
                opened = self._open_at(data, offset)
            search_from = offset + 1 + _RECORD_PREFIX.size
        return RecordScan(records, damage, later)


def create_private_file(path: Path) -> int:
    """A new file opened for writing, mode 0600; fails if `path` exists."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_directory(directory: Path) -> None:
    """Make creations, renames and deletions in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
