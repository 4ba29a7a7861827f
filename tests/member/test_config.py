"""Member configuration: defaults, static and DNS node lists, env overrides,
and every error naming the key at fault."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gcks.member.config import (
    KEYS,
    ConfigError,
    DnsDiscovery,
    MemberConfig,
    ProbeSettings,
    RekeySettings,
    env_name,
    load_member_config,
)
from gcks.proto.messages import NodeEndpoint
from gcks.proto.policy import Role


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    for name in ("ca.crt", "m1.crt", "m1.key"):
        (tmp_path / name).write_text("not read by the config loader\n")
    return tmp_path


def _document() -> dict[str, Any]:
    return {
        "member_id": "m1",
        "group": "demo",
        "role": "receiver",
        "tls": {"cluster_ca": "ca.crt", "cert": "m1.crt", "key": "m1.key"},
        "nodes": [
            {"id": "n1", "member": "127.0.0.1:7501", "probe": "127.0.0.1:7601"},
            {"id": "n2", "member": "[::1]:7502", "probe": "node2.example:7602"},
        ],
    }


def _toml(document: dict[str, Any]) -> str:
    """A small TOML writer for these shapes (JSON scalars are valid TOML scalars)."""
    top: list[str] = []
    tables: list[str] = []
    for key, value in document.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]")
            tables += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                tables.append(f"[[{key}]]")
                tables += [f"{k} = {json.dumps(v)}" for k, v in item.items()]
        else:
            top.append(f"{key} = {json.dumps(value)}")
    return "\n".join(top + tables) + "\n"


def _load(
    directory: Path, document: dict[str, Any], environ: dict[str, str] | None = None
) -> MemberConfig:
    path = directory / "member.toml"
    path.write_text(_toml(document))
    return load_member_config(path, environ={} if environ is None else environ)


def _error(
    directory: Path, document: dict[str, Any], environ: dict[str, str] | None = None
) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        _load(directory, document, environ)
    return caught.value


def test_minimal_static_config_loads_with_documented_defaults(config_dir: Path) -> None:
    config = _load(config_dir, _document())
    assert (config.member_id, config.group, config.role) == ("m1", "demo", Role.RECEIVER)
    assert config.tls.cert == config_dir / "m1.crt"  # relative to the file's directory
    assert config.nodes == (
        NodeEndpoint("n1", "127.0.0.1:7501", "127.0.0.1:7601"),
        NodeEndpoint("n2", "[::1]:7502", "node2.example:7602"),
    )
    assert config.discovery is None
    assert config.probe == ProbeSettings(
        count=5, timeout_ms=500, interval_s=30.0, switch_margin=0.2, switch_min_ms=2.0
    )
    assert config.rekey == RekeySettings(
        multicast_interface="127.0.0.1",
        register_timeout_ms=5000,
        resync_margin_ms=10_000,
        gap_wait_ms=1000,
    )
    assert config.data_listen is None


def test_dns_discovery_replaces_the_static_list(config_dir: Path) -> None:
    document = _document()
    del document["nodes"]
    document["discovery"] = {
        "dns": "gcks-headless.gcks.svc.cluster.local",
        "member_port": 7411,
        "probe_port": 7421,
        "interval_s": 10,
    }
    config = _load(config_dir, document)
    assert config.nodes == ()
    assert config.discovery == DnsDiscovery(
        "gcks-headless.gcks.svc.cluster.local", 7411, 7421, interval_s=10.0
    )


def test_all_sections_are_read(config_dir: Path) -> None:
    document = _document()
    document["role"] = "sender"
    document["data_listen"] = "0.0.0.0:7900"
    document["probe"] = {"count": 3, "timeout_ms": 250, "interval_s": 5.5, "switch_margin": 0.5}
    document["rekey"] = {
        "multicast_interface": "0.0.0.0",
        "multicast_interface6": "lo",
        "register_timeout_ms": 2000,
        "resync_margin_ms": 0,
        "gap_wait_ms": 250,
    }
    config = _load(config_dir, document)
    assert config.role is Role.SENDER
    assert config.data_listen == ("0.0.0.0", 7900)
    assert (config.probe.count, config.probe.timeout_ms, config.probe.interval_s) == (3, 250, 5.5)
    assert config.probe.switch_margin == 0.5
    assert config.rekey == RekeySettings("0.0.0.0", 2000, 0, "lo", gap_wait_ms=250)


def test_environment_overrides_scalar_keys(config_dir: Path) -> None:
    config = _load(
        config_dir,
        _document(),
        {
            "GCKS_MEMBER_MEMBER_ID": "m7",
            "GCKS_MEMBER_PROBE_COUNT": "9",
            "GCKS_MEMBER_PROBE_SWITCH_MARGIN": "0.35",
            "GCKS_MEMBER_REKEY_MULTICAST_INTERFACE": "0.0.0.0",
        },
    )
    assert config.member_id == "m7"
    assert config.probe.count == 9
    assert config.probe.switch_margin == 0.35
    assert config.rekey.multicast_interface == "0.0.0.0"


def test_environment_can_switch_on_dns_discovery_when_the_file_has_no_nodes(
    config_dir: Path,
) -> None:
    document = _document()
    del document["nodes"]
    config = _load(
        config_dir,
        document,
        {
            "GCKS_MEMBER_DISCOVERY_DNS": "gcks-headless",
            "GCKS_MEMBER_DISCOVERY_MEMBER_PORT": "7411",
            "GCKS_MEMBER_DISCOVERY_PROBE_PORT": "7421",
        },
    )
    assert config.discovery == DnsDiscovery("gcks-headless", 7411, 7421)


def test_bad_environment_value_names_the_key_and_the_variable(config_dir: Path) -> None:
    error = _error(config_dir, _document(), {"GCKS_MEMBER_PROBE_COUNT": "many"})
    assert error.key == "probe.count"
    assert "GCKS_MEMBER_PROBE_COUNT" in error.message


def test_every_scalar_key_has_an_environment_variable() -> None:
    assert env_name("probe.timeout_ms") == "GCKS_MEMBER_PROBE_TIMEOUT_MS"
    assert len({env_name(key) for key in KEYS}) == len(KEYS)


def _without(key: str) -> dict[str, Any]:
    document = _document()
    del document[key]
    return document


def _with(path: str, value: object) -> dict[str, Any]:
    document = _document()
    target: Any = document
    *parents, last = path.split(".")
    for parent in parents:
        target = target[int(parent)] if parent.isdigit() else target.setdefault(parent, {})
    target[last] = value
    return document


@pytest.mark.parametrize(
    ("document", "key"),
    [
        (_with("colour", "blue"), "colour"),
        (_with("tls.password", "x"), "tls.password"),
        (_with("probe.cuont", 3), "probe.cuont"),
        (_without("member_id"), "member_id"),
        (_with("member_id", "m 1"), "member_id"),
        (_with("member_id", 7), "member_id"),
        (_with("group", "demo/x"), "group"),
        (_with("role", "admin"), "role"),
        (_without("tls"), "tls.cluster_ca"),
        (_with("tls.cert", "missing.crt"), "tls.cert"),
        (_with("nodes", []), "nodes"),
        (_without("nodes"), "nodes"),
        (_with("nodes.1.member", "no-port"), "nodes[1].member"),
        (_with("nodes.1.probe", "127.0.0.1:70000"), "nodes[1].probe"),
        (_with("nodes.1.id", "n1"), "nodes[1].id"),
        (_with("nodes.1.probe", "127.0.0.1:7601"), "nodes[1].probe"),
        (_with("nodes.0.weight", 3), "nodes[0].weight"),
        (_with("discovery", {"dns": "h", "member_port": 1, "probe_port": 2}), "discovery"),
        (_with("probe.count", 0), "probe.count"),
        (_with("probe.count", True), "probe.count"),
        (_with("probe.timeout_ms", "500"), "probe.timeout_ms"),
        (_with("probe.timeout_ms", 60_000), "probe.timeout_ms"),
        (_with("probe.switch_margin", 1.5), "probe.switch_margin"),
        (_with("probe.switch_min_ms", -1), "probe.switch_min_ms"),
        (_with("probe.interval_s", 0.5), "probe.interval_s"),
        (_with("rekey.multicast_interface", "eth0"), "rekey.multicast_interface"),
        (_with("rekey.register_timeout_ms", 10), "rekey.register_timeout_ms"),
        (_with("data_listen", "127.0.0.1"), "data_listen"),
    ],
)
def test_invalid_setting_is_reported_by_its_key(
    config_dir: Path, document: dict[str, Any], key: str
) -> None:
    assert _error(config_dir, document).key == key


def test_discovery_without_ports_names_the_missing_port(config_dir: Path) -> None:
    document = _without("nodes")
    document["discovery"] = {"dns": "gcks-headless", "probe_port": 7421}
    assert _error(config_dir, document).key == "discovery.member_port"


def test_discovery_without_a_name_names_it(config_dir: Path) -> None:
    document = _without("nodes")
    document["discovery"] = {"member_port": 7411, "probe_port": 7421}
    assert _error(config_dir, document).key == "discovery.dns"


def test_toml_syntax_error_and_unreadable_file_are_reported(config_dir: Path) -> None:
    path = config_dir / "broken.toml"
    path.write_text("member_id = \n")
    with pytest.raises(ConfigError) as caught:
        load_member_config(path, environ={})
    assert caught.value.key == "<toml>"
    with pytest.raises(ConfigError) as caught:
        load_member_config(config_dir / "absent.toml", environ={})
    assert caught.value.key == "<file>"


def test_a_node_may_probe_on_the_port_number_it_registers_on(config_dir: Path) -> None:
    # Probes are UDP, registration TCP: the same number is no conflict.
    document = _document()
    document["nodes"][0]["probe"] = document["nodes"][0]["member"]
    config = _load(config_dir, document)
    assert config.nodes[0].probe_addr == config.nodes[0].member_addr
    document["nodes"][1]["probe"] = document["nodes"][0]["probe"]
    error = _error(config_dir, document)
    assert (error.key, error.message) == ("nodes[1].probe", "same address as nodes[0].probe")
