"""A member's copy of one group's GSA, kept current by REKEY datagrams (sans-IO).

`GroupKeys` starts from the registration answer and takes in every rekey
datagram that arrives, from any node, by multicast or unicast push. Each
message id is accepted once: copies from other nodes and retransmissions are
dropped by their clear header alone, before any cryptography. A message that
cannot be followed exactly (an unknown KEK SPI, LKH keys that do not unwrap, a
KEK whose root version does not match) is never guessed at: the outcome is
RESYNC and the caller re-registers. An authentic message past a gap in message
ids is AHEAD: the caller may hold it until the messages in between arrive (the
multicast and push paths race) and hand it in again, or re-register. Nothing
changes unless the whole message applies.

It also owns the DATA SA: the receive keyring (TEKs by SPI with activation and
deactivation, per-sender replay windows, sender verify keys) and, for a
sender, the send state, switching to a new TEK only once it is active.

May import `gcks.proto`. No trio, no sockets, no clock: time is an argument.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from gcks.proto.data import DataReceiver, DataSender
from gcks.proto.errors import DecodeError, DecryptError, UnknownSPI
from gcks.proto.keytree import MemberKeys
from gcks.proto.messages import GsaAnswer, RekeyBody
from gcks.proto.policy import GroupPolicy
from gcks.proto.rekey import open_rekey, parse_rekey_header
from gcks.proto.sa import KeySA


class Outcome(enum.StrEnum):
    ACCEPTED = "rekey"
    DUPLICATE = "duplicate"
    RESYNC = "resync"
    AHEAD = "ahead"  # authentic, but messages before it are still missing
    TERMINATED = "left"


@dataclass(frozen=True, slots=True)
class RekeyResult:
    outcome: Outcome
    msg_id: int
    reason: str = ""


class GroupKeys:
    """Keys and policy of one group as a member holds them (see module doc)."""

    def __init__(
        self,
        gsa: GsaAnswer,
        *,
        signer: Ed25519PrivateKey | None = None,
        now_ms: int,
        previous: GroupKeys | None = None,
    ) -> None:
        """`previous`: this member's keys for the group before this GSA (a
        re-registration); its replay windows carry over for the TEKs kept."""
        self.group = gsa.group
        self.policy: GroupPolicy = gsa.policy
        self.msg_id = gsa.msg_id
        self.kek: KeySA = gsa.kek
        self.sender_id = gsa.sender_id
        self.terminated = False
        self._verify = Ed25519PublicKey.from_public_bytes(gsa.rekey_verify_key)
        self._tree = MemberKeys(gsa.path_keys)
        if self._tree.group_key.key != gsa.kek.key:
            raise DecodeError("GSA: the KEK is not the LKH group key")
        self._teks: dict[int, KeySA] = {}
        self._receiver = DataReceiver(
            window_size=gsa.policy.replay_window, require_source_auth=gsa.policy.source_auth
        )
        for sender_id, key in gsa.sender_verify_keys:
            self._receiver.set_sender_key(sender_id, Ed25519PublicKey.from_public_bytes(key))
        for tek in gsa.teks:
            self._install(tek)
        if previous is not None and previous.group == self.group:
            self._receiver.adopt_replay_state(previous._receiver)
        self._signer = signer
        self._sender: DataSender | None = None
        self._refresh_sender(now_ms)

    # ------------------------------------------------------------------ keys

    @property
    def teks(self) -> tuple[KeySA, ...]:
        return tuple(sorted(self._teks.values(), key=_order))

    def sending_tek(self, now_ms: int) -> KeySA | None:
        """The TEK a sender uses at `now_ms`: the newest one already active."""
        active = [t for t in self._teks.values() if t.active_at(now_ms)]
        return max(active, key=_order, default=None)

    def needs_resync(self, now_ms: int, margin_ms: int) -> str | None:
        """Why the member should re-register now, if it should: its only TEKs run
        out within `margin_ms` and no successor arrived (a missed rekey)."""
        if self.terminated:
            return None
        horizon = now_ms + margin_ms
        if not any(t.expiry_ms > horizon for t in self._teks.values()):
            return "TEK about to expire without a successor"
        if self.kek.expiry_ms <= horizon:
            return "KEK about to expire without a successor"
        return None

    # ----------------------------------------------------------------- rekey

    def handle_rekey(self, datagram: bytes, now_ms: int) -> RekeyResult:
        """Take in one rekey datagram. Raises `ProtocolError` for bytes that are
        not an authentic rekey of this group (count and drop them)."""
        header = parse_rekey_header(datagram)  # cheap: no cryptography yet
        if self.terminated or header.msg_id <= self.msg_id:
            return RekeyResult(Outcome.DUPLICATE, header.msg_id)
        if header.group != self.group:
            raise DecodeError(f"rekey for group {header.group!r}, not {self.group!r}")
        try:
            opened = open_rekey(
                datagram,
                group=self.group,
                keks={self.kek.spi: self.kek},
                verify_key=self._verify,
                last_msg_id=self.msg_id,
            )
        except UnknownSPI:
            # Authentic (the signature verified first) but under a KEK we lack:
            # past a gap, most likely the KEK a missing message brings (joins
            # and leaves all change it); else one we cannot follow.
            if header.msg_id != self.msg_id + 1:
                return self._ahead(header.msg_id)
            return RekeyResult(Outcome.RESYNC, header.msg_id, "unknown KEK SPI")
        if header.msg_id != self.msg_id + 1:
            return self._ahead(header.msg_id)
        body = RekeyBody.decode(opened.body)
        if body.terminate:
            self._terminate()
            self.msg_id = header.msg_id
            return RekeyResult(Outcome.TERMINATED, header.msg_id, body.reason or "terminated")
        reason = self._apply(body)
        if reason is not None:
            return RekeyResult(Outcome.RESYNC, header.msg_id, reason)
        self.msg_id = header.msg_id
        self._refresh_sender(now_ms)
        for spi in self._receiver.prune(now_ms):
            self._teks.pop(spi, None)  # kept, the keyring would grow with every rekey
        return RekeyResult(Outcome.ACCEPTED, header.msg_id, body.reason)

    def _ahead(self, msg_id: int) -> RekeyResult:
        # Authentic, but messages in between are missing (late or lost): never
        # guess, and never apply out of order.
        return RekeyResult(Outcome.AHEAD, msg_id, f"gap: {self.msg_id} -> {msg_id}")

    def _apply(self, body: RekeyBody) -> str | None:
        """Apply a verified body all or nothing; a reason to resync if it cannot be."""
        kek, tree = self.kek, self._tree
        if body.kek is not None:
            tree = MemberKeys(self._tree.path)
            try:
                tree.apply(body.lkh)
            except (DecryptError, DecodeError) as exc:
                return f"LKH update does not apply: {exc}"
            root = tree.group_key
            if root.version != body.kek.root_version:
                return f"LKH root version {root.version}, KEK names {body.kek.root_version}"
            kek = KeySA(
                body.kek.spi,
                body.kek.suite,
                root.key,
                body.kek.activation_ms,
                body.kek.expiry_ms,
            )
        self.kek, self._tree = kek, tree
        for spi, at_ms in body.deactivate:
            if spi not in self._teks:
                # One we were never given (a GSA holds only TEKs made since the
                # member joined): there is nothing to retire, and no key missing
                # that a resync would bring.
                continue
            self._receiver.retire(spi, deactivate_at_ms=at_ms)
            old = self._teks[spi]
            self._teks[spi] = KeySA(
                old.spi, old.suite, old.key, old.activation_ms, max(old.activation_ms + 1, at_ms)
            )
        for tek in body.teks:
            self._install(tek)
        for sender_id in body.sender_keys_removed:
            self._receiver.forget_sender(sender_id)
        for sender_id, key in body.sender_keys_added:
            self._receiver.set_sender_key(sender_id, Ed25519PublicKey.from_public_bytes(key))
        if body.policy is not None:
            self.policy = body.policy
        return None

    def _install(self, tek: KeySA) -> None:
        self._teks[tek.spi] = tek
        self._receiver.install(tek)

    def _terminate(self) -> None:
        """Secure group termination: drop every key of the group."""
        self.terminated = True
        for spi in list(self._teks):
            self._receiver.remove(spi)
        self._teks.clear()
        self._sender = None

    # ------------------------------------------------------------------ data

    def _refresh_sender(self, now_ms: int) -> None:
        if self.sender_id is None or self.terminated:
            return
        tek = self.sending_tek(now_ms)
        if tek is None:
            return
        if self._sender is None:
            self._sender = DataSender(tek, sender_id=self.sender_id, signer=self._signer)
            return
        current = self._teks.get(self._sender.spi)
        # Forward only: after the wall clock steps back (NTP), the TEK active
        # "now" can be the one used before, and a sender never takes a TEK up
        # again (its sequence numbers, so its nonces, would start over).
        if current is None or _order(tek) > _order(current):
            self._sender.use_tek(tek)

    def protect(self, payload: bytes, now_ms: int) -> bytes:
        """Protect `payload` under the TEK active at `now_ms` (senders only)."""
        if self.sender_id is None:
            raise PermissionError(f"not a sender in group {self.group!r}")
        self._refresh_sender(now_ms)
        if self._sender is None:
            raise LookupError(f"no active TEK in group {self.group!r}")
        return self._sender.protect(payload)

    def unprotect(self, packet: bytes, now_ms: int) -> tuple[int, bytes]:
        """Verify and decrypt a data packet: (sender id, payload); `ProtocolError` if bad."""
        return self._receiver.unprotect(packet, now_ms)


def _order(tek: KeySA) -> tuple[int, int]:
    """Older TEKs first: by activation, then by SPI (allocated in order)."""
    return tek.activation_ms, tek.spi
