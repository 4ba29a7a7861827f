"""The observer turns `gcks-member --json` event lines into checked key events,
and the kit routes each node's view of each peer where the chaos harness says."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from tests.chaos.checks import check_monotonic
from tests.chaos.history import History
from tests.chaos.observers import Observer, write_observer_config
from tests.cluster.clusterkit import make_kit


def observer(tmp_path: Path) -> Observer:
    return Observer("m9", tmp_path / "m9.toml", tmp_path / "m9.log")


def line(**event: object) -> str:
    return json.dumps(event)


async def test_registered_and_rekey_events_become_key_events(tmp_path: Path) -> None:
    history, obs = History(), observer(tmp_path)
    obs.on_line(line(event="registered", node="n1", msg_id=4, kek="k4", tek="t4"), history)
    obs.on_line(line(event="duplicate", node="n2", msg_id=4, count=2), history)
    obs.on_line(line(event="rekey", node="multicast", msg_id=5, kek="k5", tek=None), history)
    assert [(e.msg_id, e.kek, e.tek) for e in history.key_events] == [
        (4, "k4", "t4"),
        (5, "k5", None),
    ]
    assert history.key_events[0].how.startswith("gsa")
    assert obs.last == (5, "k5", None)
    assert check_monotonic(history) == []


async def test_a_repeated_rekey_id_from_the_member_is_a_monotonic_violation(
    tmp_path: Path,
) -> None:
    history, obs = History(), observer(tmp_path)
    obs.on_line(line(event="rekey", node="n1", msg_id=5, kek="k", tek="t"), history)
    obs.on_line(line(event="rekey", node="n2", msg_id=5, kek="k", tek="t"), history)
    assert [v.check for v in check_monotonic(history)] == ["monotonic"]


async def test_lines_that_are_not_events_are_kept_for_the_report(tmp_path: Path) -> None:
    history, obs = History(), observer(tmp_path)
    obs.on_line("not json", history)
    obs.on_line("[1, 2]", history)
    obs.on_line(line(event="left", group="demo", reason="evicted"), history)
    assert len(obs.unparsed) == 2
    assert obs.left == "evicted"
    assert history.key_events == []


def test_each_node_dials_each_peer_at_the_address_the_harness_gives(tmp_path: Path) -> None:
    kit = make_kit(
        tmp_path, nodes=3, members=1, peer_address=lambda a, b: f"127.0.0.{a[1]}:{9000 + int(b[1])}"
    )
    for node in kit.node_ids:
        peers = tomllib.loads(kit.config(node).read_text())["peers"]
        for peer, entry in peers.items():
            if peer == node:
                assert entry["peer"] == f"127.0.0.1:{kit.ports[node]['peer']}"
            else:
                assert entry["peer"] == f"127.0.0.{node[1]}:{9000 + int(peer[1])}"
            assert entry["member"] == f"127.0.0.1:{kit.ports[peer]['member']}"
    config = tomllib.loads(
        write_observer_config(
            kit, "m1", {n: ("127.0.0.1", 7000 + i) for i, n in enumerate(kit.node_ids)}
        ).read_text()
    )
    assert [n["member"] for n in config["nodes"]] == [
        "127.0.0.1:7000",
        "127.0.0.1:7001",
        "127.0.0.1:7002",
    ]
