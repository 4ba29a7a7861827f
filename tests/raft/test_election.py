"""Leader election: PreVote, CheckQuorum, the leader lease and the election restriction."""

from __future__ import annotations

from gcks.cluster.raft.types import Message, MessageType, Role

from .network import Network

IDS = ["n1", "n2", "n3"]


def test_single_leader_elected_by_timeout_and_others_follow() -> None:
    net = Network(IDS)
    net.run(25)
    leader = net.leader()
    term = net.nodes[leader].term
    for nid, node in net.nodes.items():
        assert node.term == term
        assert node.status.leader == leader, nid


def test_single_voter_elects_itself_and_commits_alone() -> None:
    net = Network(["n1"])
    net.elect("n1")
    net.propose("n1", b"a")
    assert net.apps["n1"].commands == [b"a"]


def test_prevote_partitioned_node_rejoining_does_not_disrupt_leader() -> None:
    net = Network(IDS)
    net.elect("n1")
    term = net.nodes["n1"].term
    net.isolate("n3")
    net.run(60)  # n3 keeps pre-campaigning but never wins a pre-vote
    assert net.nodes["n3"].term == term, "pre-vote must not raise the term"
    net.heal()
    net.run(20)
    assert net.leader() == "n1"
    assert net.nodes["n1"].term == term


def test_without_prevote_rejoining_node_raises_term_but_leader_lease_protects() -> None:
    # Without PreVote the isolated node inflates its term; CheckQuorum's lease makes
    # followers ignore its vote requests, and its stale-term answer only restarts one election.
    net = Network(IDS, pre_vote=False)
    net.elect("n1")
    net.isolate("n3")
    net.run(40)
    assert net.nodes["n3"].term > net.nodes["n1"].term
    net.heal()
    net.run(60)
    assert len(net.leaders()) == 1


def test_check_quorum_leader_steps_down_when_isolated() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.isolate("n1")
    for _ in range(21):
        net.tick("n1")
    assert net.nodes["n1"].role is Role.FOLLOWER
    assert net.nodes["n1"].status.leader is None


def test_check_quorum_leader_stays_with_quorum() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.isolate("n3")
    net.run(50)
    assert net.nodes["n1"].role is Role.LEADER


def test_majority_side_elects_new_leader_after_partition() -> None:
    net = Network(["n1", "n2", "n3", "n4", "n5"])
    net.elect("n1")
    net.partition(["n1", "n2"], ["n3", "n4", "n5"])
    net.run(40)
    leaders = net.leaders()
    assert "n1" not in leaders  # stepped down by CheckQuorum
    assert len(leaders) == 1
    assert leaders[0] in {"n3", "n4", "n5"}
    net.heal()
    net.run(30)
    assert len(net.leaders()) == 1


def test_vote_refused_to_candidate_with_shorter_log() -> None:
    # n1 and n2 hold an entry of term 2 that n3 lacks: n3 cannot become leader.
    net = Network(IDS, logs={"n1": (2, [2]), "n2": (2, [2]), "n3": (2, [])})
    net.nodes["n3"].campaign()
    net.deliver()
    assert net.nodes["n3"].role is not Role.LEADER
    refusals = [m for m in net.sent if m.type is MessageType.PRE_VOTE_RESP and m.reject]
    assert {m.frm for m in refusals} == {"n1", "n2"}


def test_vote_granted_to_candidate_with_longer_log() -> None:
    net = Network(IDS, logs={"n1": (2, [2, 2]), "n2": (2, [2]), "n3": (2, [])})
    net.elect("n1")


def test_follower_in_lease_ignores_vote_requests() -> None:
    net = Network(IDS)
    net.elect("n1")
    n2 = net.nodes["n2"]
    term = n2.term
    n2.step(Message(MessageType.VOTE, "n2", "n3", term + 1, log_term=99, index=99))
    assert n2.term == term
    assert not n2.has_ready()


def test_one_vote_per_term() -> None:
    net = Network(IDS)
    n3 = net.nodes["n3"]
    last = n3.log.last_index()
    n3.step(Message(MessageType.VOTE, "n3", "n1", 5, log_term=1, index=last))
    n3.step(Message(MessageType.VOTE, "n3", "n2", 5, log_term=1, index=last))
    rd = n3.ready()
    grants = [m.frm for m in rd.messages if not m.reject]
    assert [m.to for m in rd.messages if not m.reject] == ["n1"]
    assert grants == ["n3"]
    assert rd.hard_state is not None
    assert rd.hard_state.vote == "n1"
    assert rd.hard_state.term == 5


def test_stale_leader_learns_newer_term_and_steps_down() -> None:
    net = Network(IDS, check_quorum=False)  # so that the isolated n1 keeps leading
    net.elect("n1")
    net.isolate("n1")
    net.down.add("n1")
    net.run(30)
    net.down.clear()
    new = [n for n in net.leaders() if n != "n1"]
    assert len(new) == 1
    assert net.nodes["n1"].role is Role.LEADER
    net.heal()
    net.tick("n1")  # n1 still thinks it leads and sends a heartbeat at its old term
    net.deliver()
    assert net.nodes["n1"].status.role is Role.FOLLOWER
    assert net.leader() == new[0]


def test_learner_never_campaigns() -> None:
    net = Network(IDS, learners=["n4"])
    net.isolate("n4")
    net.run(50)
    assert net.nodes["n4"].role is Role.LEARNER
    assert not any(m.frm == "n4" and m.type is MessageType.PRE_VOTE for m in net.sent)


def test_leader_lost_hint_elects_a_new_leader_within_a_few_ticks() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.down.add("n1")  # the leader's process died: its links broke
    for nid in ("n2", "n3"):
        net.nodes[nid].report_leader_lost("n1")
    ticks = 0
    while not net.leaders() and ticks < 5:
        net.run(1)
        ticks += 1
    assert net.leaders(), "no leader within 5 ticks of the hint"
    # Without the hint the followers would wait a whole election timeout (10+ ticks).
    assert ticks <= 3


def test_leader_lost_hint_elects_quickly_when_the_followers_get_it_a_tick_apart() -> None:
    # The followers notice the broken link on their own ticks. The first must
    # not canvass the second before the second stopped honouring the dead
    # leader's lease: a refusal then costs a whole election timeout when the
    # second's log is behind (it cannot win the vote itself).
    net = Network(IDS)
    net.elect("n1")
    net.cut.add(("n1", "n3"))
    net.propose("n1", b"only n2 stores this")
    net.run(1)
    assert net.nodes["n2"].log.last_index() > net.nodes["n3"].log.last_index()
    net.down.add("n1")
    net.nodes["n2"].report_leader_lost("n1")
    net.run(1)
    net.nodes["n3"].report_leader_lost("n1")
    ticks = 1
    while not net.leaders() and ticks < 12:
        net.run(1)
        ticks += 1
    assert net.leaders() == ["n2"]
    assert ticks <= 4, f"a leader after {ticks} ticks: the hint was wasted"


def test_leader_lost_hint_from_one_follower_does_not_disrupt_a_live_leader() -> None:
    net = Network(IDS)
    net.elect("n1")
    term = net.nodes["n1"].term
    net.nodes["n3"].report_leader_lost("n1")  # a flapping link, the leader is fine
    net.run(30)
    assert net.leader() == "n1"
    assert net.nodes["n1"].term == term


def test_leader_lost_hint_about_a_non_leader_is_ignored() -> None:
    net = Network(IDS)
    net.elect("n1")
    net.nodes["n2"].report_leader_lost("n3")
    net.run(5)
    assert net.leader() == "n1"
