"""Specification of the nearest-node ranking (gcks.member.ranking)."""

from __future__ import annotations

import math
from statistics import median

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gcks.member.ranking import Choice, Ranking, RankingConfig

NO_HOLDDOWN = RankingConfig(holddown_s=0.0)


def feed(ranking: Ranking, now: float, **rtts: float | None) -> None:
    for node, rtt in rtts.items():
        ranking.record_probe(node, rtt, now)


def round_of(ranking: Ranking, now: float, probes: int = 3, **rtts: float | None) -> Choice | None:
    for _ in range(probes):
        feed(ranking, now, **rtts)
    return ranking.on_round_complete(now)


# --- medians and order ---------------------------------------------------------


def test_median_over_last_window_outcomes_only() -> None:
    ranking = Ranking(RankingConfig(window=3))
    for rtt in (100.0, 100.0, 100.0, 1.0, 2.0, 3.0):
        ranking.record_probe("a", rtt, 0.0)
    assert ranking.median_ms("a") == 2.0


def test_single_outlier_does_not_move_median() -> None:
    ranking = Ranking(RankingConfig(window=5))
    for rtt in (10.0, 10.0, 500.0, 10.0, 10.0):
        ranking.record_probe("a", rtt, 0.0)
    assert ranking.median_ms("a") == 10.0


def test_lost_probes_count_as_failures_in_median() -> None:
    ranking = Ranking(RankingConfig(window=5))
    for rtt in (10.0, None, 12.0, None, 11.0):
        ranking.record_probe("a", rtt, 0.0)
    assert ranking.median_ms("a") == 12.0  # losses sit above every answer
    ranking.record_probe("a", None, 0.0)  # now 3 of 5 lost
    assert ranking.median_ms("a") is None


def test_node_without_samples_has_no_median() -> None:
    ranking = Ranking(nodes=["a"])
    assert ranking.median_ms("a") is None
    assert ranking.median_ms("unknown") is None


def test_ranking_best_first_unreachable_last_ties_by_id() -> None:
    ranking = Ranking(nodes=["silent"])
    feed(ranking, 0.0, c=5.0, b=5.0, a=9.0, lost=None)
    assert ranking.ranking() == [
        ("b", 5.0),
        ("c", 5.0),
        ("a", 9.0),
        ("lost", None),
        ("silent", None),
    ]


def test_invalid_rtt_rejected() -> None:
    ranking = Ranking()
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="rtt_ms"):
            ranking.record_probe("a", bad, 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 0},
        {"switch_ratio": 1.0},
        {"switch_ratio": -0.1},
        {"switch_min_ms": -1.0},
        {"stable_rounds": 0},
        {"holddown_s": math.inf},
    ],
)
def test_invalid_config_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RankingConfig(**kwargs)  # type: ignore[arg-type]


# --- initial choice --------------------------------------------------------------


def test_initial_choice_is_lowest_median_with_reason_and_rtts() -> None:
    ranking = Ranking()
    feed(ranking, 0.0, n1=40.0, n2=1.0, n3=41.0)
    choice = ranking.choose_initial()
    assert choice == Choice("n2", "lowest median RTT 1.00 ms", {"n1": 40.0, "n2": 1.0, "n3": 41.0})
    assert ranking.current == "n2"


def test_initial_choice_without_any_answer_tries_first_node_by_id() -> None:
    ranking = Ranking(nodes=["n2", "n1"])
    feed(ranking, 0.0, n1=None, n2=None)
    choice = ranking.choose_initial()
    assert choice is not None
    assert choice.node_id == "n1"
    assert "no probe answered" in choice.reason
    assert choice.rtts == {}


def test_initial_choice_none_when_no_nodes() -> None:
    assert Ranking().choose_initial() is None


# --- hysteresis ------------------------------------------------------------------


def test_no_round_decision_before_initial_choice() -> None:
    ranking = Ranking(NO_HOLDDOWN)
    assert round_of(ranking, 1.0, a=1.0, b=50.0) is None
    assert ranking.current is None


def test_switch_needs_two_consecutive_rounds_of_clear_gain() -> None:
    ranking = Ranking(NO_HOLDDOWN)
    feed(ranking, 0.0, a=10.0, b=20.0)
    ranking.choose_initial()
    assert round_of(ranking, 1.0, a=10.0, b=2.0) is None  # one round ahead: not yet
    choice = round_of(ranking, 2.0, a=10.0, b=2.0)
    assert choice is not None
    assert choice.node_id == "b"
    assert "2 rounds" in choice.reason
    assert ranking.current == "b"


def test_gain_that_does_not_hold_resets_the_streak() -> None:
    ranking = Ranking(RankingConfig(window=1, holddown_s=0.0))
    feed(ranking, 0.0, a=10.0, b=20.0)
    ranking.choose_initial()
    assert round_of(ranking, 1.0, a=10.0, b=2.0) is None
    assert round_of(ranking, 2.0, a=10.0, b=10.0) is None  # gain gone
    assert round_of(ranking, 3.0, a=10.0, b=2.0) is None  # streak restarts at 1
    assert ranking.current == "a"
    assert round_of(ranking, 4.0, a=10.0, b=2.0) is not None


def test_streak_counts_the_same_challenger_only() -> None:
    ranking = Ranking(RankingConfig(window=1, holddown_s=0.0))
    feed(ranking, 0.0, a=10.0, b=20.0, c=20.0)
    ranking.choose_initial()
    assert round_of(ranking, 1.0, a=10.0, b=2.0, c=20.0) is None
    assert round_of(ranking, 2.0, a=10.0, b=20.0, c=2.0) is None
    assert ranking.current == "a"


def test_gain_below_ratio_never_switches() -> None:
    # 100 -> 85 ms is 15 ms better but only 15 %: below the 20 % margin.
    ranking = Ranking(NO_HOLDDOWN)
    feed(ranking, 0.0, a=100.0, b=150.0)
    ranking.choose_initial()
    for now in range(1, 6):
        assert round_of(ranking, float(now), a=100.0, b=85.0) is None
    assert ranking.current == "a"


def test_gain_below_absolute_margin_never_switches() -> None:
    # 5 -> 3.5 ms is 30 % better but only 1.5 ms: below the 2 ms margin.
    ranking = Ranking(NO_HOLDDOWN)
    feed(ranking, 0.0, a=5.0, b=9.0)
    ranking.choose_initial()
    for now in range(1, 6):
        assert round_of(ranking, float(now), a=5.0, b=3.5) is None
    assert ranking.current == "a"


def test_holddown_delays_switch_until_it_expires() -> None:
    ranking = Ranking(RankingConfig(holddown_s=60.0))
    feed(ranking, 0.0, a=10.0, b=20.0)
    ranking.choose_initial()
    assert round_of(ranking, 10.0, a=10.0, b=2.0) is None
    assert round_of(ranking, 20.0, a=10.0, b=2.0) is None  # two rounds, but held down
    choice = round_of(ranking, 60.0, a=10.0, b=2.0)
    assert choice is not None
    assert choice.node_id == "b"


def test_current_that_stops_answering_is_left_after_two_rounds() -> None:
    ranking = Ranking(RankingConfig(window=1, holddown_s=0.0))
    feed(ranking, 0.0, a=1.0, b=30.0)
    ranking.choose_initial()
    assert round_of(ranking, 1.0, a=None, b=30.0) is None
    choice = round_of(ranking, 2.0, a=None, b=30.0)
    assert choice is not None
    assert choice.node_id == "b"
    assert "stopped answering" in choice.reason


def test_current_removed_by_discovery_is_left_at_once() -> None:
    ranking = Ranking(NO_HOLDDOWN)
    feed(ranking, 0.0, a=1.0, b=30.0)
    ranking.choose_initial()
    ranking.set_nodes(["b"])
    choice = ranking.on_round_complete(1.0)
    assert choice is not None
    assert choice.node_id == "b"
    assert "no longer a known node" in choice.reason


def test_set_nodes_keeps_samples_of_remaining_and_adds_new() -> None:
    ranking = Ranking()
    feed(ranking, 0.0, a=1.0, b=2.0)
    ranking.set_nodes(["a", "c"])
    assert ranking.nodes == ("a", "c")
    assert ranking.median_ms("a") == 1.0
    assert ranking.ranking() == [("a", 1.0), ("c", None)]


# --- failover --------------------------------------------------------------------


def test_failover_goes_to_next_in_ranking() -> None:
    ranking = Ranking()
    feed(ranking, 0.0, a=1.0, b=30.0, c=20.0)
    ranking.choose_initial()
    choice = ranking.next_after_failure("a")
    assert choice is not None
    assert choice.node_id == "c"
    assert choice.reason == "failover from a: it failed"
    assert "a" not in choice.rtts


def test_failover_skips_failed_nodes_until_they_answer_again() -> None:
    ranking = Ranking()
    feed(ranking, 0.0, a=1.0, b=30.0, c=20.0)
    ranking.choose_initial()
    ranking.next_after_failure("a")
    choice = ranking.next_after_failure("c")
    assert choice is not None
    assert choice.node_id == "b"
    assert ranking.failed == {"a", "c"}
    ranking.record_probe("a", None, 1.0)  # a lost probe does not clear the mark
    assert ranking.failed == {"a", "c"}
    ranking.record_probe("a", 1.0, 1.0)
    assert ranking.failed == {"c"}
    choice = ranking.next_after_failure("b")
    assert choice is not None
    assert choice.node_id == "a"


def test_failover_is_not_held_down() -> None:
    ranking = Ranking(RankingConfig(holddown_s=3600.0))
    feed(ranking, 0.0, a=1.0, b=2.0)
    ranking.choose_initial()
    choice = ranking.next_after_failure("a")
    assert choice is not None
    assert choice.node_id == "b"


def test_failure_of_other_node_keeps_current() -> None:
    ranking = Ranking()
    feed(ranking, 0.0, a=1.0, b=2.0)
    ranking.choose_initial()
    choice = ranking.next_after_failure("b")
    assert choice is not None
    assert choice.node_id == "a"
    assert ranking.current == "a"


def test_all_failed_gives_none_and_clears_current() -> None:
    ranking = Ranking()
    feed(ranking, 0.0, a=1.0, b=2.0)
    ranking.choose_initial()
    ranking.next_after_failure("a")
    assert ranking.next_after_failure("b") is None
    assert ranking.current is None
    assert ranking.choose_initial() is None
    ranking.record_probe("b", 2.0, 5.0)
    choice = ranking.choose_initial()
    assert choice is not None
    assert choice.node_id == "b"


def test_with_no_probe_answers_clearing_the_failed_marks_tries_every_node_again() -> None:
    # A firewalled probe port: no mark is ever cleared by an answer.
    ranking = Ranking(nodes=["a", "b"])
    feed(ranking, 0.0, a=None, b=None)
    assert ranking.next_after_failure("a") is not None
    assert ranking.next_after_failure("b") is None
    feed(ranking, 1.0, a=None, b=None)
    assert ranking.choose_initial() is None
    ranking.clear_failed()
    choice = ranking.choose_initial()
    assert choice is not None
    assert choice.node_id == "a"


def test_a_failed_switch_keeps_comparing_against_the_node_the_member_is_at() -> None:
    ranking = Ranking(RankingConfig(window=1, holddown_s=0.0), nodes=["a", "b", "c"])
    feed(ranking, 0.0, a=10.0, b=50.0, c=60.0)
    initial = ranking.choose_initial()
    assert initial is not None
    assert initial.node_id == "a"
    assert round_of(ranking, 1.0, a=10.0, b=5.0, c=6.0) is None
    switch = round_of(ranking, 2.0, a=10.0, b=5.0, c=6.0)
    assert switch is not None
    assert switch.node_id == "b"
    ranking.stay("a", failed="b")  # b could not be reached: still at a
    assert ranking.current == "a"
    assert ranking.failed == {"b"}
    assert round_of(ranking, 3.0, a=10.0, b=None, c=6.0) is None
    choice = round_of(ranking, 4.0, a=10.0, b=None, c=6.0)
    assert choice is not None
    assert choice.node_id == "c", "c is clearly faster than a, where the member is"


def test_failover_tries_silent_nodes_as_last_resort() -> None:
    ranking = Ranking(nodes=["z"])
    feed(ranking, 0.0, a=1.0)
    ranking.choose_initial()
    choice = ranking.next_after_failure("a")
    assert choice is not None
    assert choice.node_id == "z"


def test_after_failover_a_recovered_node_wins_back_only_by_hysteresis() -> None:
    ranking = Ranking(RankingConfig(window=1, holddown_s=0.0))
    feed(ranking, 0.0, a=1.0, b=30.0)
    ranking.choose_initial()
    ranking.next_after_failure("a")
    assert round_of(ranking, 1.0, a=1.0, b=30.0) is None
    choice = round_of(ranking, 2.0, a=1.0, b=30.0)
    assert choice is not None
    assert choice.node_id == "a"


# --- properties ------------------------------------------------------------------

NODES = ("n1", "n2", "n3", "n4")
rtt_values = st.one_of(st.none(), st.floats(min_value=0.0, max_value=500.0))
probe_round = st.dictionaries(st.sampled_from(NODES), st.lists(rtt_values, min_size=1, max_size=4))
events = st.lists(
    st.one_of(probe_round, st.sampled_from(NODES).map(lambda node: ("fail", node))),
    max_size=25,
)
configs = st.builds(
    RankingConfig,
    window=st.integers(1, 6),
    switch_ratio=st.sampled_from([0.0, 0.2, 0.5]),
    switch_min_ms=st.sampled_from([0.0, 2.0, 10.0]),
    stable_rounds=st.integers(1, 3),
    holddown_s=st.sampled_from([0.0, 1.5, 60.0]),
)


def run_events(config: RankingConfig, script: list[object]) -> list[Choice | None]:
    ranking = Ranking(config, NODES)
    decisions: list[Choice | None] = [None]
    now = 0.0
    for event in script:
        now += 1.0
        if isinstance(event, tuple):
            decisions.append(ranking.next_after_failure(event[1]))
            continue
        assert isinstance(event, dict)
        for node, rtts in event.items():
            for rtt in rtts:
                ranking.record_probe(node, rtt, now)
        if ranking.current is None:
            decisions.append(ranking.choose_initial())
        else:
            decisions.append(ranking.on_round_complete(now))
    return decisions


@given(config=configs, script=events)
def test_property_same_inputs_give_same_decisions(
    config: RankingConfig, script: list[object]
) -> None:
    assert run_events(config, script) == run_events(config, script)


@given(config=configs, script=events)
def test_property_ranking_sorted_and_medians_match_window(
    config: RankingConfig, script: list[object]
) -> None:
    ranking = Ranking(config, NODES)
    history: dict[str, list[float]] = {node: [] for node in NODES}
    now = 0.0
    for event in script:
        now += 1.0
        if isinstance(event, tuple):
            ranking.next_after_failure(event[1])
            continue
        assert isinstance(event, dict)
        for node, rtts in event.items():
            for rtt in rtts:
                ranking.record_probe(node, rtt, now)
                history[node].append(math.inf if rtt is None else rtt)
    order = ranking.ranking()
    assert sorted(node for node, _ in order) == sorted(NODES)
    known = [value for _, value in order if value is not None]
    assert known == sorted(known)
    seen_none = False
    for node, value in order:
        seen_none = seen_none or value is None
        assert not (seen_none and value is not None)  # unreachable strictly last
        window = history[node][-config.window :]
        expected = median(window) if window else math.inf
        if node in ranking.failed:
            assert value is None
        elif math.isfinite(expected):
            assert value == expected
        else:
            assert value is None


@given(config=configs, script=events)
def test_property_failover_never_returns_a_failed_node(
    config: RankingConfig, script: list[object]
) -> None:
    ranking = Ranking(config, NODES)
    now = 0.0
    for event in script:
        now += 1.0
        if isinstance(event, tuple):
            choice = ranking.next_after_failure(event[1])
            if choice is not None:
                assert choice.node_id not in ranking.failed
                assert choice.node_id == ranking.current
            else:
                assert ranking.failed == set(NODES)
        elif isinstance(event, dict):
            for node, rtts in event.items():
                for rtt in rtts:
                    ranking.record_probe(node, rtt, now)


@given(
    config=configs,
    rtts=st.dictionaries(st.sampled_from(NODES), st.floats(0.0, 500.0), min_size=1),
    rounds=st.integers(1, 10),
)
def test_property_stable_latencies_never_cause_a_switch(
    config: RankingConfig, rtts: dict[str, float], rounds: int
) -> None:
    ranking = Ranking(config)
    for node, rtt in rtts.items():
        ranking.record_probe(node, rtt, 0.0)
    first = ranking.choose_initial()
    assert first is not None
    assert rtts[first.node_id] == min(rtts.values())
    for now in range(1, rounds + 1):
        for node, rtt in rtts.items():
            ranking.record_probe(node, rtt, float(now))
        assert ranking.on_round_complete(float(now)) is None
    assert ranking.current == first.node_id


@given(config=configs, script=events)
def test_property_switch_only_after_stable_clear_gain(
    config: RankingConfig, script: list[object]
) -> None:
    """Replays the script with an independent oracle: every switch made by
    `on_round_complete` follows `stable_rounds` consecutive rounds in which the
    new node beat the old one by both margins (or the old one had no median)."""
    ranking = Ranking(config, NODES)
    ahead: dict[str, int] = {}
    now = 0.0
    for event in script:
        now += 1.0
        if isinstance(event, tuple):
            before = ranking.current
            ranking.next_after_failure(event[1])
            if ranking.current != before:
                ahead = {}
            continue
        assert isinstance(event, dict)
        for node, rtts in event.items():
            for rtt in rtts:
                ranking.record_probe(node, rtt, now)
        current = ranking.current
        if current is None:
            ranking.choose_initial()
            ahead = {}
            continue
        current_ms = None if current in ranking.failed else ranking.median_ms(current)
        new_ahead: dict[str, int] = {}
        for node in NODES:
            node_ms = ranking.median_ms(node)
            if node == current or node in ranking.failed or node_ms is None:
                continue
            if current_ms is None or (
                current_ms - node_ms >= config.switch_min_ms
                and current_ms - node_ms >= config.switch_ratio * current_ms
                and current_ms > node_ms
            ):
                new_ahead[node] = ahead.get(node, 0) + 1
        ahead = new_ahead
        choice = ranking.on_round_complete(now)
        if choice is not None:
            assert ahead.get(choice.node_id, 0) >= config.stable_rounds
            ahead = {}
