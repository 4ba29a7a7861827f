"""Specification of `GroupPolicy`: TOML loading, validation, defaults, roles."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcks.proto.errors import PolicyError
from gcks.proto.policy import Authorization, GroupPolicy, MulticastEndpoint, Role
from gcks.proto.sa import CipherSuite

FULL_TOML = """
group_id = "video-1"
multicast_address = "ff15::1234"
multicast_port = 5000
tek_lifetime_s = 1800
kek_lifetime_s = 43200
rekey_on_join = false
rekey_on_leave = true
rekey_on_rejoin = true
batch_interval_ms = 500
retransmit_count = 3
retransmit_interval_ms = 250
cipher_suite = "chacha20-poly1305"
source_auth = true
activation_delay_ms = 2000
deactivation_delay_ms = 4000
replay_window = 2048

[[authorize]]
identity = "mallory*"
roles = []

[[authorize]]
identity = "cam-*"
roles = ["sender", "receiver"]

[[authorize]]
identity = "*"
roles = ["receiver"]
"""


def _minimal(**extra: object) -> dict[str, Any]:
    return {"group_id": "g1", "multicast_address": "239.1.2.3", "multicast_port": 5000, **extra}


def test_full_toml_loads_every_key() -> None:
    policy = GroupPolicy.from_toml(FULL_TOML)
    assert policy.group_id == "video-1"
    assert policy.multicast == MulticastEndpoint(ipaddress.IPv6Address("ff15::1234"), 5000)
    assert str(policy.multicast) == "[ff15::1234]:5000"
    assert policy.tek_lifetime_s == 1800
    assert policy.kek_lifetime_s == 43200
    assert (policy.rekey_on_join, policy.rekey_on_leave, policy.rekey_on_rejoin) == (
        False,
        True,
        True,
    )
    assert policy.batch_interval_ms == 500
    assert (policy.retransmit_count, policy.retransmit_interval_ms) == (3, 250)
    assert policy.cipher_suite is CipherSuite.CHACHA20_POLY1305
    assert policy.source_auth is True
    assert (policy.activation_delay_ms, policy.deactivation_delay_ms) == (2000, 4000)
    assert policy.replay_window == 2048
    assert len(policy.authorize) == 3


def test_defaults_are_production_settings() -> None:
    policy = GroupPolicy.from_mapping(_minimal())
    assert str(policy.multicast) == "239.1.2.3:5000"
    assert policy.authorize == ()
    assert policy.tek_lifetime_s == 3600
    assert policy.kek_lifetime_s == 86400
    assert (policy.rekey_on_join, policy.rekey_on_leave, policy.rekey_on_rejoin) == (
        True,
        True,
        False,
    )
    assert policy.cipher_suite is CipherSuite.AES_256_GCM
    assert policy.source_auth is False
    assert policy.replay_window == 1024


def test_to_mapping_round_trips_and_is_deterministic() -> None:
    policy = GroupPolicy.from_toml(FULL_TOML)
    mapping = policy.to_mapping()
    assert GroupPolicy.from_mapping(mapping) == policy
    assert mapping["authorize"][1]["roles"] == ["receiver", "sender"]  # type: ignore[index]
    assert list(mapping) == list(GroupPolicy.from_mapping(mapping).to_mapping())


def test_roles_for_first_matching_pattern_wins_and_empty_roles_deny() -> None:
    policy = GroupPolicy.from_toml(FULL_TOML)
    assert policy.roles_for("mallory1") == frozenset()
    assert policy.roles_for("cam-7") == {Role.SENDER, Role.RECEIVER}
    assert policy.roles_for("m1") == {Role.RECEIVER}


def test_roles_for_unmatched_identity_is_empty_and_match_is_case_sensitive() -> None:
    policy = GroupPolicy.from_mapping(_minimal(authorize=[{"identity": "m*", "roles": ["sender"]}]))
    assert policy.roles_for("m1") == {Role.SENDER}
    assert policy.roles_for("M1") == frozenset()
    assert policy.roles_for("x") == frozenset()


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        (_minimal(tek_lifetim_s=60), "tek_lifetim_s"),
        (_minimal(tek_lifetime_s=59), "tek_lifetime_s"),
        (_minimal(tek_lifetime_s=True), "tek_lifetime_s"),
        (_minimal(tek_lifetime_s=3600.0), "tek_lifetime_s"),
        (_minimal(kek_lifetime_s=10**9), "kek_lifetime_s"),
        (_minimal(rekey_on_join=1), "rekey_on_join"),
        (_minimal(source_auth="yes"), "source_auth"),
        (_minimal(cipher_suite="aes-128-cbc"), "cipher_suite"),
        (_minimal(replay_window=32), "replay_window"),
        (_minimal(replay_window=8192), "replay_window"),
        (_minimal(retransmit_count=11), "retransmit_count"),
        (_minimal(group_id="bad group"), "group_id"),
        (_minimal(group_id=""), "group_id"),
        (_minimal(group_id="x" * 65), "group_id"),
        (_minimal(multicast_address="10.0.0.1"), "multicast_address"),
        (_minimal(multicast_address="ff02::1%eth0"), "multicast_address"),
        (_minimal(multicast_address="not-an-ip"), "multicast_address"),
        (_minimal(multicast_port=0), "multicast_port"),
        (_minimal(multicast_port=65536), "multicast_port"),
        (_minimal(authorize="m*"), "authorize"),
        (_minimal(authorize=["m*"]), "authorize[0]"),
        (_minimal(authorize=[{"roles": ["sender"]}]), "authorize[0].identity"),
        (_minimal(authorize=[{"identity": "m*"}]), "authorize[0].roles"),
        (_minimal(authorize=[{"identity": "m*", "roles": [], "x": 1}]), "authorize[0].x"),
        (
            _minimal(
                authorize=[
                    {"identity": "a", "roles": []},
                    {"identity": "b", "roles": []},
                    {"identity": "c", "roles": ["sender", "boss"]},
                ]
            ),
            "authorize[2].roles[1]",
        ),
        (
            _minimal(authorize=[{"identity": "a", "roles": ["sender", "sender"]}]),
            "authorize[0].roles[1]",
        ),
        (_minimal(authorize=[{"identity": "a", "roles": "sender"}]), "authorize[0].roles"),
        (_minimal(authorize=[{"identity": "a b", "roles": []}]), "authorize[0].identity"),
        (
            _minimal(authorize=[{"identity": "a*", "roles": []}, {"identity": "a*", "roles": []}]),
            "authorize[1].identity",
        ),
        (
            _minimal(tek_lifetime_s=60, batch_interval_ms=60_000),
            "batch_interval_ms",
        ),
        (
            _minimal(tek_lifetime_s=60, retransmit_count=10, retransmit_interval_ms=6000),
            "retransmit_interval_ms",
        ),
        (_minimal(tek_lifetime_s=60, activation_delay_ms=60_000), "activation_delay_ms"),
        (_minimal(tek_lifetime_s=60, deactivation_delay_ms=70_000), "deactivation_delay_ms"),
        ({"multicast_address": "239.1.2.3", "multicast_port": 1}, "group_id"),
        ({"group_id": "g", "multicast_port": 1}, "multicast_address"),
        ({"group_id": "g", "multicast_address": "239.1.2.3"}, "multicast_port"),
        ([("group_id", "g")], "<policy>"),
        ({1: "g"}, "<policy>"),
    ],
)
def test_policy_error_names_the_bad_key(mapping: object, key: str) -> None:
    with pytest.raises(PolicyError) as info:
        GroupPolicy.from_mapping(mapping)
    assert info.value.key == key
    assert repr(key) in str(info.value)


def test_toml_syntax_error_is_a_policy_error_with_position() -> None:
    with pytest.raises(PolicyError, match="line 2") as info:
        GroupPolicy.from_toml('group_id = "g"\nmulticast_port = = 1\n')
    assert info.value.key == "<toml>"


def test_toml_nested_table_key_is_unknown() -> None:
    with pytest.raises(PolicyError) as info:
        GroupPolicy.from_toml('group_id = "g"\n[extra]\nx = 1\n')
    assert info.value.key == "extra"


def test_direct_construction_is_validated_too() -> None:
    endpoint = MulticastEndpoint(ipaddress.IPv4Address("239.0.0.1"), 1)
    with pytest.raises(PolicyError) as info:
        GroupPolicy("g", endpoint, tek_lifetime_s=True)
    assert info.value.key == "tek_lifetime_s"
    with pytest.raises(PolicyError) as info:
        GroupPolicy("g", endpoint, authorize=(Authorization("a", frozenset({"sender"})),))  # type: ignore[arg-type]
    assert info.value.key == "authorize[0].roles"
    policy = GroupPolicy("g", endpoint)
    with pytest.raises(PolicyError):
        dataclasses.replace(policy, replay_window=1)


_settings = st.fixed_dictionaries(
    {},
    optional={
        "tek_lifetime_s": st.integers(60, 7 * 86400),
        "kek_lifetime_s": st.integers(300, 30 * 86400),
        "rekey_on_join": st.booleans(),
        "rekey_on_leave": st.booleans(),
        "rekey_on_rejoin": st.booleans(),
        "batch_interval_ms": st.integers(0, 59_000),
        "retransmit_count": st.integers(0, 5),
        "retransmit_interval_ms": st.integers(10, 10_000),
        "cipher_suite": st.sampled_from([s.value for s in CipherSuite]),
        "source_auth": st.booleans(),
        "activation_delay_ms": st.integers(0, 59_000),
        "deactivation_delay_ms": st.integers(0, 59_000),
        "replay_window": st.integers(64, 4096),
        "authorize": st.lists(
            st.fixed_dictionaries(
                {
                    "identity": st.from_regex(r"[a-z0-9*?-]{1,12}", fullmatch=True),
                    "roles": st.lists(st.sampled_from(["sender", "receiver"]), unique=True),
                }
            ),
            max_size=4,
            unique_by=lambda entry: entry["identity"],
        ),
    },
)


@given(_settings)
@settings(max_examples=200)
def test_valid_mappings_round_trip_through_to_mapping(extra: dict[str, Any]) -> None:
    policy = GroupPolicy.from_mapping(_minimal(**extra))
    assert GroupPolicy.from_mapping(policy.to_mapping()) == policy


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "group_id",
        "multicast_address",
        "multicast_port",
        "authorize",
        "tek_lifetime_s",
        "cipher_suite",
        "replay_window",
        "identity",
        "roles",
        "junk",
    ]
)


@given(_settings, st.dictionaries(_keys, _values, max_size=3))
@settings(max_examples=500)
def test_mutated_mappings_raise_only_policy_error(
    extra: dict[str, Any], mutation: dict[str, object]
) -> None:
    mapping = {**_minimal(**extra), **mutation}
    with contextlib.suppress(PolicyError):
        GroupPolicy.from_mapping(mapping)


@given(st.text(max_size=200))
@settings(max_examples=500)
def test_random_toml_text_raises_only_policy_error(text: str) -> None:
    with contextlib.suppress(PolicyError):
        GroupPolicy.from_toml(text)


@given(st.data())
@settings(max_examples=300)
def test_mutated_valid_toml_raises_only_policy_error(data: st.DataObject) -> None:
    text = FULL_TOML
    position = data.draw(st.integers(0, len(text)))
    cut = data.draw(st.integers(0, 10))
    insert = data.draw(st.text(alphabet='"[]=,.{}\n 0123456789abcdefgrs_-*#\\', max_size=6))
    mutated = text[:position] + insert + text[position + cut :]
    with contextlib.suppress(PolicyError):
        GroupPolicy.from_toml(mutated)


def test_deeply_nested_toml_is_a_policy_error() -> None:
    with pytest.raises(PolicyError) as info:
        GroupPolicy.from_toml("x = " + "[" * 100_000)
    assert info.value.key == "<toml>"
