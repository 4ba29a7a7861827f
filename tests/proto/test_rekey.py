"""Specification of REKEY datagrams (gcks.proto.rekey)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gcks.proto.errors import (
    BadSignature,
    DecodeError,
    DecryptError,
    ProtocolError,
    ReplayError,
    UnknownSPI,
    UnsupportedVersion,
    WrongGroup,
)
from gcks.proto.rekey import (
    MAX_GROUP_ID_BYTES,
    MAX_MULTICAST_REKEY,
    MAX_REKEY_DATAGRAM,
    OpenedRekey,
    RekeyHeader,
    open_rekey,
    parse_rekey_header,
    seal_rekey,
)
from gcks.proto.sa import CipherSuite, KeySA


def examples(floor: int) -> int:
    """`floor` examples, or more when a deeper hypothesis profile is loaded."""
    return max(floor, settings().max_examples)


GROUP = "video-eu"
KEK = KeySA(0xA1, CipherSuite.AES_256_GCM, bytes(range(32)), 0, 10**12)
KEK_CHACHA = KeySA(0xA2, CipherSuite.CHACHA20_POLY1305, bytes(range(32, 64)), 0, 10**12)
# Fixed keys keep hypothesis examples reproducible; they protect nothing real.
GCKS_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96)))
MEMBER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(96, 128)))
BODY = b"opaque rekey body: new TEKs, wrapped LKH keys"


def seal(
    msg_id: int = 8,
    body: bytes = BODY,
    *,
    kek: KeySA = KEK,
    group: str = GROUP,
    signer: Ed25519PrivateKey = GCKS_KEY,
) -> bytes:
    return seal_rekey(group=group, kek=kek, msg_id=msg_id, body=body, signer=signer)


def open_(datagram: bytes, *, last: int = 7, group: str = GROUP) -> OpenedRekey:
    return open_rekey(
        datagram,
        group=group,
        keks={KEK.spi: KEK, KEK_CHACHA.spi: KEK_CHACHA},
        verify_key=GCKS_KEY.public_key(),
        last_msg_id=last,
    )


@pytest.mark.parametrize("kek", [KEK, KEK_CHACHA], ids=["aes-256-gcm", "chacha20-poly1305"])
def test_round_trip_with_each_suite(kek: KeySA) -> None:
    opened = open_(seal(body=b"", kek=kek))
    assert opened.header == RekeyHeader(group=GROUP, kek_spi=kek.spi, msg_id=8)
    assert opened.body == b""
    assert open_(seal(kek=kek)).body == BODY


def test_sealing_same_inputs_twice_gives_identical_bytes() -> None:
    assert seal() == seal()


def test_each_message_id_gets_its_own_nonce() -> None:
    a, b = seal(8), seal(9)
    header_len = len(a) - len(BODY) - 16 - 64
    assert a[header_len:-64] != b[header_len:-64]


def test_header_parses_without_keys_for_duplicate_dropping() -> None:
    assert parse_rekey_header(seal(42)) == RekeyHeader(group=GROUP, kek_spi=KEK.spi, msg_id=42)


def test_non_ascii_group_id_round_trips() -> None:
    group = "gruppe-ü-日本"
    assert open_(seal(group=group), group=group).header.group == group


@pytest.mark.parametrize("last", [8, 9, 2**64 - 1])
def test_message_id_not_above_last_accepted_is_a_replay(last: int) -> None:
    with pytest.raises(ReplayError):
        open_(seal(8), last=last)


def test_replayed_copy_is_rejected_before_signature_check() -> None:
    # Broken signature, old id: the cheap replay verdict comes first.
    datagram = seal(3)[:-1] + b"\x00"
    with pytest.raises(ReplayError):
        open_(datagram, last=7)


def test_unknown_kek_spi_rejected() -> None:
    stranger = KeySA(0xBEEF, CipherSuite.AES_256_GCM, bytes(32), 0, 10**12)
    with pytest.raises(UnknownSPI):
        open_(seal(kek=stranger))


def test_message_for_another_group_rejected() -> None:
    with pytest.raises(WrongGroup):
        open_(seal(group="audio-us"))


def test_member_holding_kek_cannot_forge_a_rekey() -> None:
    """RFC 9838: members know the KEK but not the group's signing key."""
    forged = seal(signer=MEMBER_KEY)
    with pytest.raises(BadSignature):
        open_(forged)


def test_signature_is_checked_before_decryption() -> None:
    wrong_key = KeySA(KEK.spi, KEK.suite, bytes(32), 0, 10**12)
    with pytest.raises(BadSignature):
        open_(seal(kek=wrong_key, signer=MEMBER_KEY))


def test_authentic_rekey_under_a_different_key_for_the_spi_is_a_decrypt_error() -> None:
    wrong_key = KeySA(KEK.spi, KEK.suite, bytes(32), 0, 10**12)
    with pytest.raises(DecryptError):
        open_(seal(kek=wrong_key))


def test_trailing_bytes_are_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        open_(seal() + b"\x00")


def test_unsupported_version_rejected() -> None:
    with pytest.raises(UnsupportedVersion):
        open_(b"\x02" + seal()[1:])


def test_other_message_type_rejected() -> None:
    with pytest.raises(DecodeError, match="type"):
        parse_rekey_header(seal()[:1] + b"\x01" + seal()[2:])


def test_invalid_utf8_group_id_is_a_decode_error() -> None:
    datagram = bytearray(seal(group="ab"))
    datagram[3:5] = b"\xff\xfe"
    with pytest.raises(DecodeError, match="UTF-8"):
        parse_rekey_header(bytes(datagram))


def test_rekey_too_big_for_multicast_still_seals_for_unicast_push() -> None:
    body = bytes(MAX_MULTICAST_REKEY)
    datagram = seal(body=body)
    assert len(datagram) > MAX_MULTICAST_REKEY
    assert open_(datagram).body == body


def test_oversized_datagram_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        parse_rekey_header(bytes(MAX_REKEY_DATAGRAM + 1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"group": ""},
        {"group": "x" * (MAX_GROUP_ID_BYTES + 1)},
        {"msg_id": -1},
        {"msg_id": 2**64},
        {"kek": KeySA(2**32, CipherSuite.AES_256_GCM, bytes(32), 0, 1)},
        {"kek": KeySA(1, CipherSuite.AES_256_GCM, bytes(16), 0, 1)},
        {"body": bytes(MAX_REKEY_DATAGRAM)},
    ],
    ids=[
        "empty-group",
        "long-group",
        "negative-id",
        "id-too-big",
        "spi-too-big",
        "short-key",
        "huge",
    ],
)
def test_seal_refuses_invalid_local_inputs(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"group": GROUP, "kek": KEK, "msg_id": 1, "body": BODY}
    args.update(kwargs)
    with pytest.raises(ValueError, match=r"must be|outside|exceeds"):
        seal_rekey(signer=GCKS_KEY, **args)  # type: ignore[arg-type]


def test_body_never_appears_in_repr() -> None:
    assert "opaque" not in repr(open_(seal()))


@settings(max_examples=examples(300))
@given(body=st.binary(max_size=48), data=st.data())
def test_any_single_flipped_bit_is_rejected(body: bytes, data: st.DataObject) -> None:
    datagram = seal(body=body)
    bit = data.draw(st.integers(min_value=0, max_value=len(datagram) * 8 - 1), label="bit")
    mutated = bytearray(datagram)
    mutated[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProtocolError):
        open_(bytes(mutated))


@settings(max_examples=examples(300))
@given(body=st.binary(max_size=48), data=st.data())
def test_any_truncation_is_a_decode_error(body: bytes, data: st.DataObject) -> None:
    datagram = seal(body=body)
    cut = data.draw(st.integers(min_value=0, max_value=len(datagram) - 1), label="cut")
    with pytest.raises(DecodeError):
        open_(datagram[:cut])


@settings(max_examples=examples(2000))
@given(prefix=st.sampled_from([b"", b"\x01\x52", b"\x01\x52\x08video-eu"]), blob=st.binary())
def test_random_bytes_raise_only_protocol_errors(prefix: bytes, blob: bytes) -> None:
    with pytest.raises(ProtocolError):
        open_(prefix + blob)
