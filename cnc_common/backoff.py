"""Capped exponential backoff with full jitter on the monotonic clock."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays for a retry loop: ``initial * factor**attempt``, capped, jittered.

    Full jitter (a uniform draw between 0 and the capped delay) keeps many
    agents that lost the same server from reconnecting in lockstep. There is
    no attempt limit: callers stop retrying when they are stopped.
    """

    initial: float = 0.1
    factor: float = 2.0
    cap: float = 10.0
    jitter: bool = True
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        """Return the delay before the next attempt and count the attempt."""
        ceiling = min(self.cap, self.initial * self.factor**self.attempt)
        self.attempt += 1
        if not self.jitter:
            return ceiling
        # Never return 0: a zero delay turns a retry loop into a busy loop.
        return max(self.initial / 10, self.rng.uniform(0, ceiling))

    def reset(self) -> None:
        """Start again from the initial delay after a success."""
        self.attempt = 0


class RateLimitedCounter:
    """Count repeated events and decide which of them to log.

    The first event is always logged; after that at most one per ``interval``
    seconds, with the number suppressed in between.
    """

    def __init__(
        self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.total = 0
        self._suppressed = 0
        self._last_logged: float | None = None

    def hit(self) -> int | None:
        """Count one event; return how many were suppressed if it should be logged."""
        self.total += 1
        now = self.clock()
        if self._last_logged is None or now - self._last_logged >= self.interval:
            suppressed = self._suppressed
            self._suppressed = 0
            self._last_logged = now
            return suppressed
        self._suppressed += 1
        return None


def not_logged(suppressed: int) -> str:
    """Suffix for a rate-limited log line: how many similar events were skipped."""
    return (
        f"; {suppressed} similar events since the last line not logged"
        if suppressed
        else ""
    )
