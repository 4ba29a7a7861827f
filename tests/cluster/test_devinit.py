"""`gcks dev init`: every written file loads with its real loader, ports never
collide, secrets are private, and an existing directory is never clobbered by accident."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gcks.cluster.cli import load_admin_config
from gcks.cluster.config import load_config
from gcks.cluster.devinit import (
    MULTICAST_ADDRESS,
    DevInitError,
    DevLayout,
    dev_init,
    node_ports,
)
from gcks.member.config import load_member_config
from gcks.proto.messages import NodeEndpoint
from gcks.proto.policy import Role


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> DevLayout:
    return dev_init(tmp_path_factory.mktemp("dev") / "cluster", nodes=3, members=3, base_port=20000)


def test_node_configs_load_and_list_every_node(layout: DevLayout) -> None:
    directory = layout.directory
    assert layout.node_configs == tuple(directory / f"n{i}.toml" for i in (1, 2, 3))
    for index, path in enumerate(layout.node_configs, start=1):
        config = load_config(path, environ={})
        assert config.node_id == f"n{index}"
        assert sorted(config.peers) == ["n1", "n2", "n3"]
        ports = node_ports(20000, index)
        assert config.peer_listen.port == ports.peer
        assert config.ops_listen.port == ports.ops
        assert config.peers[f"n{index}"].admin == config.admin_listen
        assert config.data_dir == directory / "data" / f"n{index}"
        assert config.multicast.interface == "127.0.0.1"
        assert config.raft.tick_ms * config.raft.election_ticks <= 1000  # short LAN timing


def test_nodes_declare_the_demo_group_for_members_m_star(layout: DevLayout) -> None:
    groups = load_config(layout.node_configs[0], environ={}).groups
    assert [group.group_id for group in groups] == ["demo"]
    policy = groups[0]
    assert str(policy.multicast.address) == MULTICAST_ADDRESS
    assert policy.multicast.address.is_multicast
    assert policy.roles_for("m2") == {Role.SENDER, Role.RECEIVER}
    assert policy.roles_for("x1") == frozenset()
    # Every node holds the same policy, so whichever leads creates the same group.
    assert {load_config(path, environ={}).groups for path in layout.node_configs} == {groups}


def test_every_listening_port_is_distinct(layout: DevLayout) -> None:
    ports: list[int] = []
    for path in layout.node_configs:
        config = load_config(path, environ={})
        addresses = (
            config.peer_listen,
            config.member_listen,
            config.probe_listen,
            config.ops_listen,
            config.admin_listen,
        )
        assert {address.host for address in addresses} == {"127.0.0.1"}
        ports += [address.port for address in addresses]
    ports.append(load_config(layout.node_configs[0], environ={}).groups[0].multicast.port)
    assert len(set(ports)) == len(ports)


def test_member_configs_load_with_the_static_node_list(layout: DevLayout) -> None:
    assert layout.member_configs == tuple(layout.directory / f"m{i}.toml" for i in (1, 2, 3))
    expected = tuple(
        NodeEndpoint(
            f"n{i}",
            f"127.0.0.1:{node_ports(20000, i).member}",
            f"127.0.0.1:{node_ports(20000, i).probe}",
        )
        for i in (1, 2, 3)
    )
    roles = []
    for index, path in enumerate(layout.member_configs, start=1):
        config = load_member_config(path, environ={})
        assert config.member_id == f"m{index}"
        assert config.group == "demo"
        assert config.nodes == expected
        assert config.tls.cert.is_file()
        assert config.rekey.multicast_interface == "127.0.0.1"
        roles.append(config.role)
    assert roles == [Role.SENDER, Role.RECEIVER, Role.RECEIVER]


def test_admin_config_loads_with_every_node_admin_address(layout: DevLayout) -> None:
    config = load_admin_config(layout.admin_config)
    assert [(node.id, node.admin.port) for node in config.nodes] == [
        (f"n{i}", node_ports(20000, i).admin) for i in (1, 2, 3)
    ]


def test_secrets_are_private(layout: DevLayout) -> None:
    secrets_dir = layout.directory / "secrets"
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    private = list(secrets_dir.iterdir()) + list((layout.directory / "pki").rglob("*.key"))
    assert len(private) == 3 + (2 + 3 + 3 + 1)  # storage keys; CA, node, member, admin keys
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_non_empty_directory_refused_without_force(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DevInitError, match="--force"):
        dev_init(tmp_path, nodes=1, members=1)
    assert [entry.name for entry in tmp_path.iterdir()] == ["notes.txt"]


def test_force_replaces_the_dev_cluster_and_keeps_foreign_files(tmp_path: Path) -> None:
    first = dev_init(tmp_path, nodes=2, members=1)
    old_key = (tmp_path / "secrets" / "n1.storagekey").read_text()
    (tmp_path / "data" / "n1").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    second = dev_init(tmp_path, nodes=1, members=2, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "n2.toml").exists()
    assert not (tmp_path / "data").exists()  # old data is unreadable under the new keys
    assert (tmp_path / "secrets" / "n1.storagekey").read_text() != old_key
    assert len(first.node_configs) == 2
    assert len(second.member_configs) == 2
    load_config(second.node_configs[0], environ={})


def test_a_file_in_place_of_the_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(DevInitError, match="not a directory"):
        dev_init(target, nodes=1, members=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nodes": 0, "members": 1}, "--nodes"),
        ({"nodes": 100, "members": 1}, "--nodes"),
        ({"nodes": 1, "members": -1}, "--members"),
        ({"nodes": 1, "members": 1, "base_port": 80}, "--base-port"),
        ({"nodes": 1, "members": 1, "base_port": 65_500}, "--base-port"),
        ({"nodes": 1, "members": 1, "group": "no/slash"}, "--group"),
    ],
)
def test_bad_arguments_refused_before_writing(
    tmp_path: Path, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(DevInitError, match=match):
        dev_init(tmp_path / "dev", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "dev").exists()
