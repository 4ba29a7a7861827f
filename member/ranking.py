"""Which GCKS node a member talks to: the nearest-node ranking, sans-IO.

The probe driver (`gcks.member.probe`) feeds one outcome per probe: an RTT in
milliseconds, or `None` for a probe that got no valid answer before its
deadline. For each node the ranking keeps the last `window` outcomes and takes
their median, a lost probe counting as an infinitely slow one, so a node that
loses more than half of its recent probes is unreachable rather than merely
slow, and one lucky or unlucky probe never moves a node.

Decisions (each a `Choice` carrying its reason and the medians it was based
on, so the caller can emit it as an event):

- `choose_initial()`: the lowest median among nodes that are not marked failed;
  when no node answered any probe (a firewalled probe port), the first known
  node by id, so registration can still be attempted.
- `on_round_complete(now)`: switch away from the current node only when the
  same other node beats it by a clear margin (both `switch_ratio` and
  `switch_min_ms`) after `stable_rounds` consecutive probe rounds, and not
  sooner than `holddown_s` after the previous choice: all nodes hand out the
  same keys, so switching is safe, but flapping costs registrations.
- `next_after_failure(node)`: the caller lost the node (connection, deadline);
  it is skipped until one of its probes is answered again, and the next node
  in the ranking is returned. Failover is never held down.
- `stay(node, failed=other)`: a switch to `other` failed; the caller is still
  at `node`. `clear_failed()`: every node failed and none answers probes.

Deterministic: ties break by node id, time is passed in by the caller (seconds,
any monotonic origin). May import the standard library only; must never do
I/O, read a clock or draw random numbers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import median
from typing import Final

__all__ = ["Choice", "Ranking", "RankingConfig"]

_LOST: Final = math.inf


@dataclass(frozen=True, slots=True)
class RankingConfig:
    """Tuning of the ranking. Defaults suit probe rounds every few seconds to a minute."""

    window: int = 5  # outcomes kept per node; the median is over these
    switch_ratio: float = 0.20  # a better node must be this much faster (fraction) ...
    switch_min_ms: float = 2.0  # ... and at least this many milliseconds faster
    stable_rounds: int = 2  # ... in this many consecutive rounds
    holddown_s: float = 60.0  # no optimisation switch sooner than this after a choice

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be at least 1")
        if not 0.0 <= self.switch_ratio < 1.0:
            raise ValueError("switch_ratio must be in [0, 1)")
        if not (math.isfinite(self.switch_min_ms) and self.switch_min_ms >= 0.0):
            raise ValueError("switch_min_ms must be finite and >= 0")
        if self.stable_rounds < 1:
            raise ValueError("stable_rounds must be at least 1")
        if not (math.isfinite(self.holddown_s) and self.holddown_s >= 0.0):
            raise ValueError("holddown_s must be finite and >= 0")


@dataclass(frozen=True, slots=True)
class Choice:
    """A decision to use `node_id`: `reason` is for people (event text), `rtts`
    the median RTT in ms of every node that had one when the decision was made."""

    node_id: str
    reason: str
    rtts: dict[str, float] = field(hash=False)


class Ranking:
    """Per-node RTT medians and the choice of node, with hysteresis and failover."""

    __slots__ = ("_config", "_current", "_failed", "_last_choice_at", "_now", "_samples", "_streak")

    def __init__(self, config: RankingConfig | None = None, nodes: Iterable[str] = ()) -> None:
        self._config = config or RankingConfig()
        self._samples: dict[str, deque[float]] = {}
        self._failed: set[str] = set()
        self._current: str | None = None
        self._streak: tuple[str, int] | None = None  # challenger and its rounds ahead
        self._now = -math.inf  # latest time any call passed in
        self._last_choice_at = -math.inf
        self.set_nodes(nodes)

    @property
    def current(self) -> str | None:
        """The node chosen last, or `None` before the first choice / after all failed."""
        return self._current

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(sorted(self._samples))

    @property
    def failed(self) -> frozenset[str]:
        """Nodes skipped until one of their probes is answered again."""
        return frozenset(self._failed)

    def set_nodes(self, nodes: Iterable[str]) -> None:
        """Replace the set of known nodes (discovery changed). New nodes start
        without samples; removed ones are forgotten. If the current node is
        removed, the next `on_round_complete` moves away from it at once."""
        wanted = set(nodes)
        for node in list(self._samples):
            if node not in wanted:
                del self._samples[node]
                self._failed.discard(node)
        for node in wanted:
            if node not in self._samples:
                self._samples[node] = deque(maxlen=self._config.window)
        if self._streak is not None and self._streak[0] not in wanted:
            self._streak = None

    def record_probe(self, node_id: str, rtt_ms: float | None, now: float) -> None:
        """One probe outcome: its RTT, or `None` if it was lost. An answered
        probe makes a failed node eligible again. Unknown nodes are added."""
        if rtt_ms is not None and not (math.isfinite(rtt_ms) and rtt_ms >= 0.0):
            raise ValueError("rtt_ms must be finite and >= 0, or None for a lost probe")
        self._advance(now)
        samples = self._samples.get(node_id)
        if samples is None:
            samples = self._samples[node_id] = deque(maxlen=self._config.window)
        samples.append(_LOST if rtt_ms is None else float(rtt_ms))
        if rtt_ms is not None:
            self._failed.discard(node_id)

    def median_ms(self, node_id: str) -> float | None:
        """The node's median RTT over its window, `None` if unknown or unreachable."""
        samples = self._samples.get(node_id)
        if not samples:
            return None
        value = float(median(samples))
        return value if math.isfinite(value) else None

    def ranking(self) -> list[tuple[str, float | None]]:
        """Every known node, best first: nodes with a median by (median, id), then
        the rest (failed, unreachable, never answered) by id with `None`."""
        ranked: list[tuple[float, str]] = []
        rest: list[str] = []
        for node in self._samples:
            value = None if node in self._failed else self.median_ms(node)
            if value is None:
                rest.append(node)
            else:
                ranked.append((value, node))
        ranked.sort()
        return [(node, value) for value, node in ranked] + [(node, None) for node in sorted(rest)]

    def choose_initial(self) -> Choice | None:
        """Choose the best node; `None` if every known node is marked failed."""
        candidate = self._best(exclude=None)
        if candidate is None:
            return None
        node, value = candidate
        if value is None:
            reason = f"no probe answered yet; trying {node}"
        else:
            reason = f"lowest median RTT {value:.2f} ms"
        return self._choose(node, reason)

    def on_round_complete(self, now: float) -> Choice | None:
        """Apply hysteresis after a probe round; a `Choice` only when switching."""
        self._advance(now)
        current = self._current
        if current is None:
            return None
        if current not in self._samples:
            self._streak = None
            candidate = self._best(exclude=current)
            if candidate is None:
                self._current = None
                return None
            return self._choose(candidate[0], f"{current} is no longer a known node")
        challenger = self._best(exclude=current)
        current_ms = None if current in self._failed else self.median_ms(current)
        if challenger is None or not self._clearly_better(challenger[1], current_ms):
            self._streak = None
            return None
        node = challenger[0]
        rounds = self._streak[1] + 1 if self._streak and self._streak[0] == node else 1
        self._streak = (node, rounds)
        if rounds < self._config.stable_rounds:
            return None
        if now - self._last_choice_at < self._config.holddown_s:
            return None  # keep counting: switch as soon as the hold-down ends
        if current_ms is None:
            reason = f"{current} stopped answering probes for {rounds} rounds"
        else:
            reason = (
                f"{node} faster than {current} for {rounds} rounds "
                f"({challenger[1]:.2f} ms vs {current_ms:.2f} ms)"
            )
        return self._choose(node, reason)

    def next_after_failure(self, failed_node: str) -> Choice | None:
        """Mark `failed_node` failed and return the node to use now: the current
        one if it is not the failed one, else the next in the ranking. `None`
        when every known node is marked failed."""
        self._failed.add(failed_node)
        if self._streak is not None and self._streak[0] == failed_node:
            self._streak = None
        current = self._current
        if current is not None and current != failed_node and current not in self._failed:
            return Choice(current, f"staying on {current}; {failed_node} failed", self._rtts())
        candidate = self._best(exclude=None)
        if candidate is None:
            self._current = None
            return None
        return self._choose(candidate[0], f"failover from {failed_node}: it failed")

    def stay(self, node_id: str, *, failed: str) -> None:
        """A switch to `failed` did not happen: the member is still at `node_id`,
        the node hysteresis compares against; `failed` is skipped until one of
        its probes is answered again."""
        self._failed.add(failed)
        self._current = node_id
        self._streak = None

    def clear_failed(self) -> None:
        """Make every node eligible again: nothing answers probes, so no failed
        mark would ever clear, and the caller has waited before trying again."""
        self._failed.clear()

    def _advance(self, now: float) -> None:
        if not math.isfinite(now):
            raise ValueError("now must be finite")
        self._now = max(self._now, now)

    def _clearly_better(self, candidate_ms: float | None, current_ms: float | None) -> bool:
        if candidate_ms is None:
            return False
        if current_ms is None:
            return True
        gain = current_ms - candidate_ms
        return (
            gain >= self._config.switch_min_ms
            and gain >= self._config.switch_ratio * current_ms
            and gain > 0.0
        )

    def _best(self, exclude: str | None) -> tuple[str, float | None] | None:
        for node, value in self.ranking():
            if node != exclude and node not in self._failed:
                return node, value
        return None

    def _choose(self, node: str, reason: str) -> Choice:
        self._current = node
        self._streak = None
        self._last_choice_at = self._now
        return Choice(node, reason, self._rtts())

    def _rtts(self) -> dict[str, float]:
        return {node: value for node, value in self.ranking() if value is not None}
