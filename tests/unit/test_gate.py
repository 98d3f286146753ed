"""The steering gate: API processes share --max-steered-requests, so together they never admit
more steered sequences than the engine has table rows for."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from server.state import SteeringGate


def in_flight() -> float:
    return REGISTRY.get_sample_value("steerserve_steered_in_flight") or 0.0


def test_processes_share_the_bound():
    gates = [SteeringGate(5, api_processes=2) for _ in range(2)]
    admitted = sum(gate.try_acquire(1) for gate in gates for _ in range(5))
    assert admitted == 4 <= 5  # each admits its share, 2 of 5
    before = in_flight()
    assert gates[0].try_acquire(1) is False and in_flight() == before
    gates[0].release(2)
    assert in_flight() == before - 2 and gates[0].try_acquire(2)


def test_fewer_slots_than_processes_is_refused():
    with pytest.raises(ValueError, match="--max-steered-requests 1 is fewer than the 2 API processes"):
        SteeringGate(1, api_processes=2)
