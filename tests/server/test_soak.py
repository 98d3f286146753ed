"""The CI-sized soak: one minute of mixed load on the session's server (`python -m benchmarks.soak`
runs the 10-minute one)."""

from __future__ import annotations

from benchmarks.soak import soak
from tests.serving import ADMIN_KEY, MAX_STEERED

CONCURRENCY = 8  # every request steered at once still fits the session server's steering slots


def test_one_minute_soak(server):
    assert CONCURRENCY <= MAX_STEERED
    result = soak(server.url, server.process.pid, minutes=1, concurrency=CONCURRENCY, api_key=ADMIN_KEY)
    assert result.requests >= 20 and result.outcomes.get("completed", 0) > 0 and result.outcomes.get("cancelled", 0) > 0, result.outcomes
    assert result.failures() == [], result.summary()
