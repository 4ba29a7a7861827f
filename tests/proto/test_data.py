"""Specification of DATA SA packet protection (gcks.proto.data)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from gcks.proto.data import (
    FLAG_SIGNED,
    HEADER,
    HEADER_SIZE,
    MAX_DATA_PACKET,
    DataReceiver,
    DataSender,
)
from gcks.proto.errors import (
    BadSignature,
    DecodeError,
    DecryptError,
    KeyExpired,
    ProtocolError,
    ReplayError,
    SequenceExhausted,
    UnknownSPI,
    UnsupportedVersion,
)
from gcks.proto.replay import MAX_SEQUENCE
from gcks.proto.sa import CipherSuite, KeySA


def examples(floor: int) -> int:
    """`floor` examples, or more when a deeper hypothesis profile is loaded."""
    return max(floor, settings().max_examples)


NOW = 1_000_000
SENDER = 7
# Fixed keys keep hypothesis examples reproducible; they protect nothing real.
TEK = KeySA(0x1001, CipherSuite.AES_256_GCM, bytes(range(32)), 0, 10 * NOW)
TEK_CHACHA = KeySA(0x1002, CipherSuite.CHACHA20_POLY1305, bytes(range(32, 64)), 0, 10 * NOW)
SIGNING_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
OTHER_SIGNING_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(200, 232)))


def receiver(*teks: KeySA, source_auth: bool = False, window: int = 64) -> DataReceiver:
    rx = DataReceiver(window_size=window, require_source_auth=source_auth)
    for tek in teks or (TEK,):
        rx.install(tek)
    rx.set_sender_key(SENDER, SIGNING_KEY.public_key())
    return rx


def sender_at(seq: int, *, tek: KeySA = TEK, signed: bool = False) -> DataSender:
    return DataSender(
        tek, sender_id=SENDER, signer=SIGNING_KEY if signed else None, first_sequence=seq
    )


def packet(seq: int, payload: bytes = b"data", *, tek: KeySA = TEK, signed: bool = False) -> bytes:
    return sender_at(seq, tek=tek, signed=signed).protect(payload)


@pytest.mark.parametrize("tek", [TEK, TEK_CHACHA], ids=["aes-256-gcm", "chacha20-poly1305"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_round_trip_with_each_suite(tek: KeySA, signed: bool) -> None:
    tx = sender_at(0, tek=tek, signed=signed)
    rx = receiver(tek, source_auth=signed)
    for payload in (b"", b"x", os.urandom(1200)):
        assert rx.unprotect(tx.protect(payload), NOW) == (SENDER, payload)


@pytest.mark.parametrize(
    ("tek", "aead"), [(TEK, AESGCM), (TEK_CHACHA, ChaCha20Poly1305)], ids=["aes", "chacha"]
)
def test_nonce_is_sender_id_then_sequence_and_header_is_associated_data(
    tek: KeySA, aead: type[AESGCM] | type[ChaCha20Poly1305]
) -> None:
    seq = 0x0102_0304_0506_0708
    pkt = packet(seq, b"hello", tek=tek)
    assert HEADER.unpack_from(pkt) == (1, 0, tek.spi, SENDER, seq)
    nonce = SENDER.to_bytes(4, "big") + seq.to_bytes(8, "big")
    assert aead(tek.key).decrypt(nonce, pkt[HEADER_SIZE:], pkt[:HEADER_SIZE]) == b"hello"


def test_distinct_senders_never_share_a_nonce() -> None:
    a = DataSender(TEK, sender_id=1).protect(b"same")
    b = DataSender(TEK, sender_id=2).protect(b"same")
    assert a[6:18] != b[6:18]
    assert a[HEADER_SIZE:] != b[HEADER_SIZE:]


def test_sequence_numbers_increase_by_one_per_packet() -> None:
    tx = sender_at(41)
    assert [HEADER.unpack_from(tx.protect(b""))[4] for _ in range(3)] == [41, 42, 43]


def test_sequence_exhaustion_refuses_to_wrap() -> None:
    tx = sender_at(MAX_SEQUENCE)
    last = tx.protect(b"last")
    assert HEADER.unpack_from(last)[4] == MAX_SEQUENCE
    with pytest.raises(SequenceExhausted):
        tx.protect(b"one too many")
    with pytest.raises(SequenceExhausted):
        tx.protect(b"still refused")


def test_new_tek_restarts_sequence_and_old_tek_cannot_be_reused() -> None:
    tx = sender_at(MAX_SEQUENCE)
    tx.protect(b"")
    tx.use_tek(TEK_CHACHA)
    assert tx.next_sequence == 0
    assert receiver(TEK_CHACHA).unprotect(tx.protect(b"on"), NOW) == (SENDER, b"on")
    with pytest.raises(ValueError, match="already used"):
        tx.use_tek(TEK)


def test_oversized_payload_refused_by_sender() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        sender_at(0).protect(bytes(MAX_DATA_PACKET))


def test_in_window_duplicate_rejected() -> None:
    rx = receiver()
    pkt = packet(5)
    rx.unprotect(pkt, NOW)
    with pytest.raises(ReplayError):
        rx.unprotect(pkt, NOW)


def test_out_of_order_within_window_accepted() -> None:
    rx = receiver()
    for seq in (10, 3, 9, 4):
        assert rx.unprotect(packet(seq), NOW) == (SENDER, b"data")


def test_too_old_rejected() -> None:
    rx = receiver(window=64)
    rx.unprotect(packet(1000), NOW)
    with pytest.raises(ReplayError):
        rx.unprotect(packet(1000 - 64), NOW)


def test_replay_windows_are_per_sender() -> None:
    rx = receiver()
    rx.unprotect(DataSender(TEK, sender_id=1).protect(b"a"), NOW)
    assert rx.unprotect(DataSender(TEK, sender_id=2).protect(b"b"), NOW) == (2, b"b")


def test_forged_packet_with_high_sequence_does_not_advance_window() -> None:
    rx = receiver()
    rx.unprotect(packet(1), NOW)
    forger_tek = KeySA(TEK.spi, TEK.suite, bytes(32), TEK.activation_ms, TEK.expiry_ms)
    with pytest.raises(DecryptError):
        rx.unprotect(packet(1_000_000, tek=forger_tek), NOW)
    # Had the forgery moved the window, sequence 2 would now be far too old.
    assert rx.unprotect(packet(2), NOW) == (SENDER, b"data")


def test_member_posing_as_another_sender_does_not_advance_its_window() -> None:
    rx = receiver(source_auth=True)
    rx.unprotect(packet(1, signed=True), NOW)
    impostor = DataSender(TEK, sender_id=SENDER, signer=OTHER_SIGNING_KEY, first_sequence=10**9)
    with pytest.raises(BadSignature):
        rx.unprotect(impostor.protect(b"forged"), NOW)
    assert rx.unprotect(packet(2, signed=True), NOW) == (SENDER, b"data")


def test_unknown_spi_rejected() -> None:
    other = KeySA(0x2002, CipherSuite.AES_256_GCM, bytes(32), 0, 10 * NOW)
    with pytest.raises(UnknownSPI):
        receiver().unprotect(packet(0, tek=other), NOW)


def test_tek_rejected_before_activation_and_at_expiry() -> None:
    tek = KeySA(0x3003, CipherSuite.AES_256_GCM, bytes(range(32)), NOW, 2 * NOW)
    rx = receiver(tek)
    with pytest.raises(KeyExpired):
        rx.unprotect(packet(0, tek=tek), NOW - 1)
    assert rx.unprotect(packet(1, tek=tek), NOW) == (SENDER, b"data")
    with pytest.raises(KeyExpired):
        rx.unprotect(packet(2, tek=tek), 2 * NOW)


def test_previous_tek_accepted_until_deactivation_then_rejected() -> None:
    new_tek = KeySA(0x4004, CipherSuite.AES_256_GCM, bytes(range(1, 33)), NOW, 10 * NOW)
    rx = receiver(TEK, new_tek)
    deactivation = NOW + 5_000
    rx.retire(TEK.spi, deactivate_at_ms=deactivation)
    # In flight across the rekey: still accepted under the previous TEK.
    assert rx.unprotect(packet(1), deactivation - 1) == (SENDER, b"data")
    assert rx.unprotect(packet(0, tek=new_tek), deactivation - 1) == (SENDER, b"data")
    with pytest.raises(KeyExpired):
        rx.unprotect(packet(2), deactivation)
    assert rx.unprotect(packet(1, tek=new_tek), deactivation) == (SENDER, b"data")
    assert rx.prune(deactivation) == (TEK.spi,)
    with pytest.raises(UnknownSPI):
        rx.unprotect(packet(3), deactivation)


def test_retire_never_extends_a_tek_past_expiry() -> None:
    rx = receiver()
    rx.retire(TEK.spi, deactivate_at_ms=100 * NOW)
    with pytest.raises(KeyExpired):
        rx.unprotect(packet(0), TEK.expiry_ms)


def test_reinstalling_same_tek_keeps_replay_state_and_another_key_is_refused() -> None:
    rx = receiver()
    pkt = packet(0)
    rx.unprotect(pkt, NOW)
    rx.install(TEK)
    with pytest.raises(ReplayError):
        rx.unprotect(pkt, NOW)
    with pytest.raises(ValueError, match="another TEK"):
        rx.install(KeySA(TEK.spi, TEK.suite, bytes(32), 0, 10 * NOW))


def test_a_fresh_receiver_adopts_the_replay_windows_of_the_teks_it_shares() -> None:
    # A member that registers again builds a new receiver from its new GSA:
    # what it accepted before under a TEK it still holds stays unreplayable.
    old = receiver(TEK, TEK_CHACHA)
    seen = packet(3)
    old.unprotect(seen, NOW)
    old.unprotect(packet(4, tek=TEK_CHACHA), NOW)
    renamed = KeySA(TEK_CHACHA.spi, TEK_CHACHA.suite, bytes(32), 0, 10 * NOW)  # same SPI, new key
    fresh = receiver(TEK, renamed)
    fresh.adopt_replay_state(old)
    with pytest.raises(ReplayError):
        fresh.unprotect(seen, NOW)
    assert fresh.unprotect(packet(2), NOW) == (SENDER, b"data")  # still inside the window
    rx_seq4 = sender_at(4, tek=renamed).protect(b"new key")
    assert fresh.unprotect(rx_seq4, NOW) == (SENDER, b"new key")  # another key: fresh windows


def test_source_auth_required_rejects_unsigned_packet() -> None:
    with pytest.raises(BadSignature, match="unsigned"):
        receiver(source_auth=True).unprotect(packet(0), NOW)


def test_source_auth_rejects_packet_signed_by_wrong_key() -> None:
    forged = DataSender(TEK, sender_id=SENDER, signer=OTHER_SIGNING_KEY).protect(b"x")
    with pytest.raises(BadSignature):
        receiver(source_auth=True).unprotect(forged, NOW)


def test_signed_packet_from_sender_without_known_key_rejected() -> None:
    pkt = DataSender(TEK, sender_id=99, signer=SIGNING_KEY).protect(b"x")
    with pytest.raises(BadSignature, match="no source"):
        receiver(source_auth=True).unprotect(pkt, NOW)


def test_signed_packet_is_verified_even_when_policy_does_not_require_it() -> None:
    forged = DataSender(TEK, sender_id=SENDER, signer=OTHER_SIGNING_KEY).protect(b"x")
    with pytest.raises(BadSignature):
        receiver(source_auth=False).unprotect(forged, NOW)


def test_stripping_the_signature_is_rejected() -> None:
    signed = packet(0, signed=True)
    assert signed[1] == FLAG_SIGNED
    for rx in (receiver(source_auth=True), receiver(source_auth=False)):
        with pytest.raises(ProtocolError):
            rx.unprotect(signed[:-64], NOW)
        with pytest.raises(ProtocolError):
            rx.unprotect(signed[:1] + b"\x00" + signed[2:-64], NOW)


def test_removed_sender_key_can_no_longer_authenticate() -> None:
    rx = receiver(source_auth=True)
    rx.unprotect(packet(0, signed=True), NOW)
    rx.forget_sender(SENDER)
    with pytest.raises(BadSignature):
        rx.unprotect(packet(1, signed=True), NOW)


def test_departed_sender_packets_stay_unreplayable_while_tek_lives() -> None:
    rx = receiver()
    old = packet(0)
    rx.unprotect(old, NOW)
    rx.forget_sender(SENDER)
    with pytest.raises(ReplayError):
        rx.unprotect(old, NOW)


def test_unsupported_version_and_unknown_flags_rejected() -> None:
    pkt = packet(0, signed=True)
    with pytest.raises(UnsupportedVersion):
        receiver().unprotect(b"\x02" + pkt[1:], NOW)
    with pytest.raises(DecodeError):
        receiver().unprotect(pkt[:1] + b"\x03" + pkt[2:], NOW)


@pytest.mark.parametrize("size", [0, 1, HEADER_SIZE, HEADER_SIZE + 15, MAX_DATA_PACKET + 1])
def test_packet_of_impossible_size_is_a_decode_error(size: int) -> None:
    with pytest.raises(DecodeError):
        receiver().unprotect(bytes(size), NOW)


def test_keys_never_appear_in_reprs() -> None:
    tx = sender_at(0, signed=True)
    rx = receiver()
    for text in (repr(tx), repr(rx), repr(TEK)):
        assert TEK.key.hex() not in text
        assert repr(TEK.key) not in text


@settings(max_examples=examples(300))
@given(
    signed=st.booleans(),
    payload=st.binary(max_size=64),
    data=st.data(),
)
def test_any_single_flipped_bit_is_rejected_without_state_change(
    signed: bool, payload: bytes, data: st.DataObject
) -> None:
    pkt = packet(5, payload, signed=signed)
    bit = data.draw(st.integers(min_value=0, max_value=len(pkt) * 8 - 1), label="bit")
    mutated = bytearray(pkt)
    mutated[bit // 8] ^= 1 << (bit % 8)
    rx = receiver(source_auth=signed)
    with pytest.raises(ProtocolError):
        rx.unprotect(bytes(mutated), NOW)
    assert rx.unprotect(pkt, NOW) == (SENDER, payload)


@settings(max_examples=examples(300))
@given(signed=st.booleans(), payload=st.binary(max_size=64), data=st.data())
def test_any_truncation_or_extension_is_rejected(
    signed: bool, payload: bytes, data: st.DataObject
) -> None:
    pkt = packet(5, payload, signed=signed)
    cut = data.draw(st.integers(min_value=0, max_value=len(pkt) - 1), label="cut")
    extra = data.draw(st.binary(min_size=1, max_size=80), label="extra")
    rx = receiver(source_auth=signed)
    with pytest.raises(ProtocolError):
        rx.unprotect(pkt[:cut], NOW)
    with pytest.raises(ProtocolError):
        rx.unprotect(pkt + extra, NOW)
    assert rx.unprotect(pkt, NOW) == (SENDER, payload)


@settings(max_examples=examples(500))
@given(blob=st.binary(max_size=200), source_auth=st.booleans())
def test_random_bytes_raise_only_protocol_errors(blob: bytes, source_auth: bool) -> None:
    try:
        receiver(source_auth=source_auth).unprotect(blob, NOW)
    except ProtocolError:
        pass
    else:
        pytest.fail("random bytes were accepted")
