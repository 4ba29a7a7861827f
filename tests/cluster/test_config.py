"""Node configuration: every key validated and named on error, env overrides, no unknown keys."""

from __future__ import annotations

import base64
import copy
import json
import logging
import stat
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from gcks.cluster import pki
from gcks.cluster.config import (
    KEYS,
    Address,
    ConfigError,
    MemberLinkConfig,
    MulticastConfig,
    NodeConfig,
    PeerLinkConfig,
    RaftTiming,
    TlsConfig,
    env_name,
    load_config,
    write_storage_key_file,
)
from gcks.proto.identity import Role

KEY_HEX = "11" * 32


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    pki.pki_init(directory, nodes=["n1", "n2"], members=["m1"])
    return directory


def _document(pki_dir: Path) -> dict[str, Any]:
    return {
        "node_id": "n1",
        "data_dir": "data/n1",
        "peer_listen": "127.0.0.1:7401",
        "member_listen": "127.0.0.1:7411",
        "probe_listen": "127.0.0.1:7421",
        "ops_listen": "127.0.0.1:7431",
        "admin_listen": "[::1]:7441",
        "storage_key_file": "n1.storagekey",
        "tls": {
            "cluster_ca": str(pki_dir / "ca/cluster.crt"),
            "member_ca": str(pki_dir / "ca/member.crt"),
            "cert": str(pki_dir / "node/n1.crt"),
            "key": str(pki_dir / "node/n1.key"),
        },
        "peers": {
            "n1": {"peer": "127.0.0.1:7401", "member": "127.0.0.1:7411", "probe": "127.0.0.1:7421"},
            "n2": {
                "peer": "gcks-1.gcks-headless.gcks.svc.cluster.local:7401",
                "member": "gcks-1.gcks-headless.gcks.svc.cluster.local:7411",
                "probe": "gcks-1.gcks-headless.gcks.svc.cluster.local:7421",
                "ops": "gcks-1.gcks-headless.gcks.svc.cluster.local:7431",
            },
        },
        "groups": [
            {
                "group_id": "demo",
                "multicast_address": "239.1.2.3",
                "multicast_port": 5000,
                "authorize": [{"identity": "m*", "roles": ["sender", "receiver"]}],
            }
        ],
    }


def _toml(document: dict[str, Any]) -> str:
    """A minimal TOML writer for the shapes above (JSON strings are valid TOML strings)."""
    lines: list[str] = []

    def scalar(value: object) -> str:
        return json.dumps(value)

    def table(prefix: str, mapping: dict[str, Any]) -> None:
        subtables = []
        for key, value in mapping.items():
            if isinstance(value, dict) or (
                isinstance(value, list) and value and isinstance(value[0], dict)
            ):
                subtables.append((key, value))
            else:
                lines.append(f"{json.dumps(key)} = {scalar(value)}")
        for key, value in subtables:
            name = f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key)
            if isinstance(value, list):
                for item in value:
                    lines.append(f"[[{name}]]")
                    table(name, item)
            else:
                lines.append(f"[{name}]")
                table(name, value)

    table("", document)
    return "\n".join(lines) + "\n"


def _write(tmp_path: Path, document: dict[str, Any]) -> Path:
    (tmp_path / "n1.storagekey").write_text(KEY_HEX + "\n")
    path = tmp_path / "n1.toml"
    path.write_text(_toml(document))
    return path


def _load(
    tmp_path: Path, document: dict[str, Any], environ: dict[str, str] | None = None
) -> NodeConfig:
    return load_config(_write(tmp_path, document), environ or {})


def test_a_complete_file_loads_with_lan_defaults(pki_dir: Path, tmp_path: Path) -> None:
    config = _load(tmp_path, _document(pki_dir))
    assert config.node_id == "n1"
    assert config.data_dir == tmp_path / "data/n1"  # relative to the file's directory
    assert config.admin_listen == Address("::1", 7441)
    assert str(config.admin_listen) == "[::1]:7441"
    assert config.raft == RaftTiming(tick_ms=100, election_ticks=10, heartbeat_ticks=1)
    assert config.peer_link == PeerLinkConfig()
    assert config.member_link == MemberLinkConfig(
        max_connections=100_000, max_connections_per_member=64, handshake_timeout_ms=5000
    )
    assert config.multicast.ttl == 1
    assert config.multicast.interface6 == "", "IPv6 groups: push only unless an interface is named"
    assert config.storage_key == bytes.fromhex(KEY_HEX)
    assert set(config.peers) == {"n1", "n2"}
    assert set(config.other_peers) == {"n2"}
    assert config.peers["n2"].peer.host == "gcks-1.gcks-headless.gcks.svc.cluster.local"
    assert config.peers["n2"].ops is not None
    assert [g.group_id for g in config.groups] == ["demo"]
    assert config.log_level == "info"


def test_the_storage_key_never_appears_in_repr(pki_dir: Path, tmp_path: Path) -> None:
    config = _load(tmp_path, _document(pki_dir))
    assert KEY_HEX not in repr(config)
    assert repr(bytes.fromhex(KEY_HEX)) not in repr(config)


def _set(document: dict[str, Any], dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    target = document
    for part in parents:
        target = target.setdefault(part, {})
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("node_id", "bad id", "node_id"),
        ("node_id", 7, "node_id"),
        ("node_id", _DELETE, "node_id"),
        ("node_id", "n3", "node_id"),  # not in the address book
        ("data_dir", ["x"], "data_dir"),
        ("data_dir", "", "data_dir"),
        ("peer_listen", "127.0.0.1", "peer_listen"),
        ("member_listen", "127.0.0.1:0", "member_listen"),
        ("probe_listen", "::1:7421", "probe_listen"),
        ("ops_listen", "host name:80", "ops_listen"),
        ("admin_listen", _DELETE, "admin_listen"),
        ("log_level", "loud", "log_level"),
        ("storage_key_file", _DELETE, "storage_key_file"),
        ("storage_key_file", "missing.key", "storage_key_file"),
        ("tls.cluster_ca", "missing.crt", "tls.cluster_ca"),
        ("tls.member_ca", _DELETE, "tls.member_ca"),
        ("tls", "not a table", "tls"),
        ("raft.tick_ms", 0, "raft.tick_ms"),
        ("raft.tick_ms", True, "raft.tick_ms"),
        ("raft.tick_ms", "100", "raft.tick_ms"),
        ("raft.election_ticks", 2, "raft.election_ticks"),  # not > 2 x heartbeat
        ("raft.heartbeat_ticks", 0, "raft.heartbeat_ticks"),
        ("peer_link", {"backoff_min_ms": 500, "backoff_max_ms": 100}, "peer_link.backoff_max_ms"),
        ("peer_link", {"keepalive_ms": 5000}, "peer_link.idle_timeout_ms"),
        ("peer_link", {"send_queue_bytes": 2048}, "peer_link.send_queue_bytes"),
        ("peer_link", {"max_frame_bytes": 10}, "peer_link.max_frame_bytes"),
        ("multicast", {"ttl": 256}, "multicast.ttl"),
        ("multicast", {"interface": "eth0"}, "multicast.interface"),
        ("multicast", {"interface6": "nonesuch0"}, "multicast.interface6"),
        ("peers.n2.peer", "nowhere", "peers.n2.peer"),
        ("peers.n2.member", _DELETE, "peers.n2.member"),
        ("peers.n2.probe", "127.0.0.1:7421", "peers.n2.probe"),  # n1's probe address
        ("peers.n2.color", "blue", "peers.n2.color"),
        ("peers.n2", "x", "peers.n2"),
        ("peers", {}, "peers"),
        ("groups", {"group_id": "demo"}, "groups"),
    ],
)
def test_every_bad_key_is_named(
    pki_dir: Path, tmp_path: Path, key: str, value: object, named: str
) -> None:
    document = copy.deepcopy(_document(pki_dir))
    _set(document, key, value)
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, document)
    assert caught.value.key == named
    assert str(caught.value).startswith(f"{named}: ")


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("colour", "blue", "colour"),
        ("raft", {"tick_ms": 100, "ticks": 3}, "raft.ticks"),
        ("tls", {"cert": "x", "ca": "y"}, "tls.ca"),
        ("raft.tick_ms", 5, "raft.tick_ms"),  # a quoted dotted key is not the section's key
    ],
)
def test_unknown_keys_are_rejected(
    pki_dir: Path, tmp_path: Path, key: str, value: object, named: str
) -> None:
    document = _document(pki_dir)
    document[key] = value
    with pytest.raises(ConfigError, match="unknown key") as caught:
        _load(tmp_path, document)
    assert caught.value.key == named


def test_group_policy_errors_name_the_group_and_the_policy_key(
    pki_dir: Path, tmp_path: Path
) -> None:
    document = _document(pki_dir)
    document["groups"][0]["multicast_port"] = 0
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, document)
    assert caught.value.key == "groups[0].multicast_port"
    document = _document(pki_dir)
    document["groups"].append(dict(document["groups"][0]))
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, document)
    assert caught.value.key == "groups[1].group_id"


def test_the_certificate_must_be_this_nodes(pki_dir: Path, tmp_path: Path) -> None:
    document = _document(pki_dir)
    document["tls"]["cert"] = str(pki_dir / "node/n2.crt")
    document["tls"]["key"] = str(pki_dir / "node/n2.key")
    with pytest.raises(ConfigError, match="node:n2, not of node:n1") as caught:
        _load(tmp_path, document)
    assert caught.value.key == "tls.cert"
    document["tls"]["key"] = str(pki_dir / "node/n1.key")
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, document)
    assert caught.value.key == "tls.key"
    document["tls"]["cert"] = str(pki_dir / "member/m1.crt")
    document["tls"]["key"] = str(pki_dir / "member/m1.key")
    with pytest.raises(ConfigError, match="member:m1") as caught:
        _load(tmp_path, document)
    assert caught.value.key == "tls.cert"


def test_environment_overrides_the_file(
    pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {
        "GCKS_NODE_ID": "n2",
        "GCKS_TLS_CERT": str(pki_dir / "node/n2.crt"),
        "GCKS_TLS_KEY": str(pki_dir / "node/n2.key"),
        "GCKS_DATA_DIR": "elsewhere",
        "GCKS_RAFT_TICK_MS": "50",
        "GCKS_PEER_LINK_SEND_QUEUE_FRAMES": "16",
        "GCKS_MEMBER_LINK_HANDSHAKE_TIMEOUT_MS": "800",
        "GCKS_MEMBER_LINK_MAX_CONNECTIONS_PER_MEMBER": "4",
        "GCKS_LOG_LEVEL": "DEBUG",
        "GCKS_STORAGE_KEY": "ab" * 32,
        "GCKS_UNRELATED": "ignored",
    }
    config = _load(tmp_path, _document(pki_dir), environ)
    assert config.node_id == "n2"
    assert config.data_dir == Path("elsewhere")  # environment paths: relative to the cwd
    assert config.raft.tick_ms == 50
    assert config.peer_link.send_queue_frames == 16
    assert config.member_link.handshake_timeout_ms == 800
    assert config.member_link.max_connections_per_member == 4
    assert config.log_level == "debug"
    assert config.storage_key == bytes.fromhex("ab" * 32)
    assert set(config.other_peers) == {"n1"}


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("GCKS_RAFT_TICK_MS", "fast", "raft.tick_ms"),
        ("GCKS_MULTICAST_TTL", "300", "multicast.ttl"),
        ("GCKS_PEER_LISTEN", "nowhere", "peer_listen"),
        ("GCKS_STORAGE_KEY", "abcd", "GCKS_STORAGE_KEY"),
        ("GCKS_STORAGE_KEY", "zz" * 32, "GCKS_STORAGE_KEY"),
    ],
)
def test_a_bad_environment_value_names_the_key_and_the_variable(
    pki_dir: Path, tmp_path: Path, variable: str, value: str, named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, _document(pki_dir), {variable: value})
    assert caught.value.key == named
    assert variable in str(caught.value)


def test_environment_can_supply_a_required_key(pki_dir: Path, tmp_path: Path) -> None:
    document = _document(pki_dir)
    del document["node_id"]
    with pytest.raises(ConfigError, match="GCKS_NODE_ID"):
        _load(tmp_path, document)
    assert _load(tmp_path, document, {"GCKS_NODE_ID": "n1"}).node_id == "n1"


def test_env_names_follow_the_dotted_keys() -> None:
    assert env_name("raft.tick_ms") == "GCKS_RAFT_TICK_MS"
    assert env_name("peer_link.write_timeout_ms") == "GCKS_PEER_LINK_WRITE_TIMEOUT_MS"
    assert env_name("node_id") == "GCKS_NODE_ID"


def test_storage_key_files_hold_64_hex_digits_and_are_made_mode_0600(
    pki_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "keys/fresh.key"
    write_storage_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_storage_key_file(path)
    document = _document(pki_dir)
    document["storage_key_file"] = str(path)
    config = _load(tmp_path, document)
    assert config.storage_key == bytes.fromhex(path.read_text())
    path.write_text("00" * 31)
    with pytest.raises(ConfigError, match="64 hex digits") as caught:
        _load(tmp_path, document)
    assert caught.value.key == "storage_key_file"


def test_a_storage_key_file_may_hold_base64_and_a_readable_one_is_warned_about(
    pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = bytes(range(32))
    path = tmp_path / "b64.key"
    path.write_text(base64.b64encode(key).decode() + "\n")
    path.chmod(0o644)
    document = _document(pki_dir)
    document["storage_key_file"] = str(path)
    with caplog.at_level(logging.WARNING):
        config = _load(tmp_path, document)
    assert config.storage_key == key
    assert "make it 0600" in caplog.text
    assert key.hex() not in caplog.text


def test_syntax_errors_and_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("node_id = \n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.key == "<toml>"
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.toml", {})
    assert caught.value.key == "<file>"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path, {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1", Address("127.0.0.1", 1)),
        ("[::]:65535", Address("::", 65535)),
        ("gcks-0.gcks-headless:7401", Address("gcks-0.gcks-headless", 7401)),
    ],
)
def test_addresses_parse_host_and_port(text: str, expected: Address) -> None:
    assert Address.parse(text) == expected
    assert str(Address.parse(text)) == text


def test_the_node_role_is_what_the_certificate_must_carry() -> None:
    # Guard the invariant config relies on: node certificates carry Role.NODE.
    assert pki.ISSUER_OF[Role.NODE] is pki.CaKind.CLUSTER


def test_ipv6_groups_are_multicast_on_an_interface_named_in_the_config(
    pki_dir: Path, tmp_path: Path
) -> None:
    document = _document(pki_dir)
    document["multicast"] = {"interface6": "lo"}  # an interface every host has
    assert _load(tmp_path, document).multicast.interface6 == "lo"
    document["multicast"] = {"interface6": ""}  # off, as when unset
    assert _load(tmp_path, document).multicast.interface6 == ""


def test_every_setting_field_is_a_configurable_key() -> None:
    for section, cls in [
        ("raft", RaftTiming),
        ("peer_link", PeerLinkConfig),
        ("member_link", MemberLinkConfig),
        ("multicast", MulticastConfig),
        ("tls", TlsConfig),
    ]:
        for f in fields(cls):
            assert f"{section}.{f.name}" in KEYS


def test_a_probe_may_share_a_port_number_with_a_tcp_listener_but_not_an_address(
    pki_dir: Path, tmp_path: Path
) -> None:
    # Probes are UDP, the other listeners TCP: the same number is no conflict.
    document = _document(pki_dir)
    document["peers"]["n2"]["probe"] = document["peers"]["n2"]["peer"]
    config = _load(tmp_path, document)
    assert config.peers["n2"].probe == config.peers["n2"].peer
    document["peers"]["n2"]["probe"] = document["peers"]["n1"]["probe"]
    with pytest.raises(ConfigError, match=r"peers\.n2\.probe: same address as peers\.n1\.probe"):
        _load(tmp_path, document)
    document = _document(pki_dir)
    document["peers"]["n2"]["member"] = document["peers"]["n2"]["peer"]
    with pytest.raises(ConfigError, match=r"peers\.n2\.member: same address as peers\.n2\.peer"):
        _load(tmp_path, document)
