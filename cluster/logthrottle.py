"""A warning at most once per interval, for conditions that recur on every event
(each rekey, each proposal) and would otherwise flood the log.

May import only the standard library.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable


class LogThrottle:
    """`ready(kind)` is True at most once per `interval_s` for each kind."""

    def __init__(
        self, interval_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[Hashable, float] = {}

    def ready(self, kind: Hashable = None) -> bool:
        now = self._clock()
        if now - self._last.get(kind, -math.inf) < self._interval_s:
            return False
        self._last[kind] = now
        return True
