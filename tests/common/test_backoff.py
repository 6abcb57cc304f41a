"""The shared backoff and rate-limited counter."""

from __future__ import annotations

import random

from cnc_common.backoff import Backoff, RateLimitedCounter


def test_backoff_grows_to_cap_without_jitter() -> None:
    backoff = Backoff(initial=0.1, factor=2, cap=1.0, jitter=False)
    delays = [backoff.next_delay() for _ in range(6)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_jitter_stays_within_ceiling() -> None:
    backoff = Backoff(initial=0.1, factor=2, cap=1.0, rng=random.Random(1))
    for attempt in range(20):
        ceiling = min(1.0, 0.1 * 2**attempt)
        delay = backoff.next_delay()
        assert 0 < delay <= ceiling


def test_backoff_reset_starts_over() -> None:
    backoff = Backoff(initial=0.5, cap=10, jitter=False)
    backoff.next_delay()
    backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_rate_limited_counter_logs_first_then_one_per_interval() -> None:
    now = [0.0]
    counter = RateLimitedCounter(interval=60, clock=lambda: now[0])
    assert counter.hit() == 0
    for _ in range(5):
        now[0] += 1
        assert counter.hit() is None
    now[0] = 61
    assert counter.hit() == 5
    assert counter.total == 7
