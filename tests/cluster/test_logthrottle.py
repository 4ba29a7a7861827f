"""The log throttle: each kind of warning at most once per interval."""

from __future__ import annotations

from gcks.cluster.logthrottle import LogThrottle


def test_each_kind_is_ready_once_per_interval_and_kinds_do_not_share_it() -> None:
    now = [100.0]
    throttle = LogThrottle(60.0, clock=lambda: now[0])
    assert throttle.ready("a")
    assert not throttle.ready("a")
    assert throttle.ready("b"), "another kind has its own interval"
    now[0] += 59.9
    assert not throttle.ready("a")
    now[0] += 0.1
    assert throttle.ready("a")
    assert throttle.ready(), "no kind is a kind of its own"
