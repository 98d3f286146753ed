"""The CI-sized soak: one minute of mixed load on the session's server (`python -m benchmarks.soak`
runs the 10-minute one), and proof that its verdict can fail."""

from __future__ import annotations

import random

from benchmarks.soak import KINDS, RequestKind, soak
from tests.serving import ADMIN_KEY, MAX_STEERED

CONCURRENCY = 8  # every request steered at once still fits the session server's steering slots


def past_the_last_feature(rng: random.Random, saes: dict[str, int]) -> dict:
    """A steering spec the server must refuse with a 400: index d_sae, one past an SAE's last feature."""
    sae = rng.choice(sorted(saes))
    return {"features": [{"sae": sae, "index": saes[sae], "mode": "add", "strength": 1.0}]}


def test_one_minute_soak(server):
    assert CONCURRENCY <= MAX_STEERED
    result = soak(server.url, server.process.pid, minutes=1, concurrency=CONCURRENCY, api_key=ADMIN_KEY)
    assert result.requests >= 20 and result.outcomes.get("completed", 0) > 0 and result.outcomes.get("cancelled", 0) > 0, result.outcomes
    assert result.failures() == [], result.summary()


def test_soak_fails_on_a_refused_request(server):
    """The soak once counted 4xx answers as neither good nor bad, so a load the server kept refusing
    passed. A kind of request out of range must now fail it, named with its status and message.
    A quarter of a minute is enough: the verdict, not the duration, is under test."""
    bad = RequestKind("out-of-range index", past_the_last_feature)
    kinds = [*KINDS, bad]
    result = soak(server.url, server.process.pid, minutes=0.25, concurrency=CONCURRENCY, api_key=ADMIN_KEY, kinds=kinds)
    assert result.kinds.get(bad.name, 0) > 0, result.kinds
    assert result.failed and {f.request for f in result.failed} == {bad.name}, result.summary()
    for f in result.failed:
        assert (f.failure, f.status) == ("refused", 400) and "out of range" in f.message, f
    verdict = f"{len(result.failed)} x refused (request kind {bad.name}, status 400)"
    assert any(line.startswith(verdict) for line in result.failures()), result.failures()
