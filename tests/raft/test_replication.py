"""Log replication: commit rule, batching, pipelining, conflict back-off, restart."""

from __future__ import annotations

from gcks.cluster.raft.types import Message, MessageType, Role

from .network import Network

IDS = ["n1", "n2", "n3"]


def test_committed_proposals_applied_in_order_everywhere() -> None:
    net = Network(IDS)
    net.elect("n1")
    for i in range(20):
        net.nodes["n1"].propose(b"c%d" % i)
    net.deliver()
    want = [b"c%d" % i for i in range(20)]
    for app in net.apps.values():
        assert app.commands == want


def test_leader_appends_noop_of_its_term_on_election() -> None:
    net = Network(IDS)
    net.elect("n2")
    node = net.nodes["n2"]
    last = node.log.last_index()
    assert node.log.term(last) == node.term
    assert node.log.slice(last, last + 1)[0].data == b""


def test_figure8_old_term_entry_not_committed_by_count() -> None:
    # Raft paper, Figure 8 (c): n1 led term 2 and put index 2 on n2 only; n5 led
    # term 3 with its own index 2 (never replicated). n1 now leads term 4 and copies
    # its term-2 entry to a majority: that alone must not commit it, since n5 could
    # still win an election and overwrite it.
    five = ["n1", "n2", "n3", "n4", "n5"]
    logs = {
        "n1": (3, [2]),
        "n2": (3, [2]),
        "n3": (3, []),
        "n4": (3, []),
        "n5": (3, [3]),
    }
    net = Network(five, logs=logs)
    net.down.add("n5")
    n1 = net.nodes["n1"]
    net.filters.append(lambda m: m.type is not MessageType.APP)  # appends are "lost"
    n1.campaign()
    net.deliver()
    assert n1.role is Role.LEADER
    assert n1.term == 4
    # Acks for index 2 (the term-2 entry) from a majority with n1: still not committed.
    for peer in ("n2", "n3"):
        n1.step(Message(MessageType.APP_RESP, "n1", peer, 4, index=2))
    assert n1.status.progress["n3"].match == 2
    assert n1.log.committed == 1
    # Once the term-4 no-op at index 3 is on a majority, both commit together.
    for peer in ("n2", "n3"):
        n1.step(Message(MessageType.APP_RESP, "n1", peer, 4, index=3))
    assert n1.log.committed == 3


def test_figure8_commit_on_real_network_converges() -> None:
    five = ["n1", "n2", "n3", "n4", "n5"]
    logs = {"n1": (3, [2]), "n2": (3, [2]), "n3": (3, []), "n4": (3, []), "n5": (3, [3])}
    net = Network(five, logs=logs)
    net.elect("n1")
    net.run(3)
    for nid in five:
        node = net.nodes[nid]
        assert node.log.committed == 3, nid
        assert node.log.term(2) == 2, nid


def test_fast_backoff_finds_conflict_in_few_round_trips() -> None:
    # n2 holds 200 entries of a term-3 leader that never committed; the new leader
    # n1 holds 100 entries of term 4 there. One-entry-at-a-time back-off would need
    # ~100 rejections; the term hint needs at most two.
    logs = {
        "n1": (4, [2] * 50 + [4] * 100),
        "n2": (4, [2] * 50 + [3] * 200),
        "n3": (4, [2] * 50 + [4] * 100),
    }
    net = Network(IDS, logs=logs)
    net.elect("n1")
    net.run(2)
    rejections = [m for m in net.sent if m.type is MessageType.APP_RESP and m.reject]
    assert 1 <= len(rejections) <= 2
    n1, n2 = net.nodes["n1"], net.nodes["n2"]
    assert n2.log.last_index() == n1.log.last_index()
    assert n2.log.term(100) == 4
    assert n2.log.committed == n1.log.committed


def test_fast_backoff_when_follower_log_is_shorter() -> None:
    logs = {"n1": (4, [2] * 100), "n2": (4, [2] * 3), "n3": (4, [2] * 100)}
    net = Network(IDS, logs=logs)
    net.elect("n1")
    net.run(2)
    rejections = [m for m in net.sent if m.type is MessageType.APP_RESP and m.reject]
    assert len(rejections) <= 1
    assert net.nodes["n2"].log.last_index() == net.nodes["n1"].log.last_index()


def test_appends_batched_by_max_size_per_msg() -> None:
    net = Network(IDS, max_size_per_msg=1000)
    net.elect("n1")
    net.sent.clear()
    for _ in range(50):
        net.nodes["n1"].propose(b"x" * 100)  # 116 bytes each with overhead
    net.deliver()
    apps = [m for m in net.sent if m.type is MessageType.APP and m.to == "n2" and m.entries]
    assert all(len(m.entries) <= 9 for m in apps)
    assert sum(len(m.entries) for m in apps) == 50
    assert len(apps) <= 7  # batched, not one append per proposal


def test_pipelining_bounded_by_inflight_messages() -> None:
    net = Network(IDS, max_size_per_msg=1, max_inflight_msgs=4)
    net.elect("n1")
    net.sent.clear()
    net.cut.add(("n2", "n1"))  # n2's acks are lost: the window never opens
    for i in range(20):
        net.nodes["n1"].propose(b"%d" % i)
    net.deliver()
    to_n2 = [m for m in net.sent if m.type is MessageType.APP and m.to == "n2" and m.entries]
    assert len(to_n2) == 4
    net.heal()
    net.run(5)
    assert net.apps["n2"].commands == [b"%d" % i for i in range(20)]


def test_pipelining_bounded_by_inflight_bytes() -> None:
    net = Network(IDS, max_size_per_msg=200, max_inflight_bytes=500)
    net.elect("n1")
    net.sent.clear()
    net.cut.add(("n2", "n1"))
    for _ in range(20):
        net.nodes["n1"].propose(b"y" * 100)
    net.deliver()
    to_n2 = [m for m in net.sent if m.type is MessageType.APP and m.to == "n2" and m.entries]
    assert sum(len(m.entries) for m in to_n2) <= 6


def test_lost_appends_recovered_via_heartbeat() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.filters.append(lambda m: not (m.type is MessageType.APP and m.to == "n3"))
    for i in range(5):
        net.propose("n1", b"%d" % i)
    assert net.apps["n3"].commands == []
    net.heal()
    net.run(3)
    assert net.apps["n3"].commands == [b"%d" % i for i in range(5)]


def test_follower_uncommitted_conflicting_suffix_truncated() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.isolate("n1")
    net.nodes["n1"].propose(b"lost-1")  # never reaches anyone
    net.nodes["n1"].propose(b"lost-2")
    net.deliver()
    net.down.add("n1")
    net.run(30)
    new_leader = net.leader()
    net.propose(new_leader, b"kept")
    net.down.clear()
    net.heal()
    net.run(30)
    for app in net.apps.values():
        assert app.commands == [b"kept"]


def test_restart_from_disk_keeps_term_vote_and_log() -> None:
    net = Network(IDS)
    net.elect("n1")
    for i in range(5):
        net.propose("n1", b"%d" % i)
    before = net.nodes["n2"].status
    node = net.restart("n2")
    assert node.term == before.term
    assert node.vote == "n1"
    assert node.log.last_index() == before.commit
    net.run(3)
    assert net.apps["n2"].commands == [b"%d" % i for i in range(5)]


def test_restarted_leader_cluster_recovers() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.propose("n1", b"a")
    for nid in IDS:
        net.restart(nid)
    net.run(30)
    leader = net.leader()
    net.propose(leader, b"b")
    for app in net.apps.values():
        assert app.commands == [b"a", b"b"]
