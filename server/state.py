"""What the API process knows about steering: the loaded SAEs, the limits, and admission."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from features.sae import SAE, load_sae
from server.settings import SteeringSettings
from steering.spec import ResolvedSteering, SteeringSpec, resolve


class SteeringGate:
    """Bounds steered sequences in flight, so the worker's table rows can never run out.

    A request over the bound is refused (429) rather than queued or run unsteered.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_flight = 0
        self._lock = threading.Lock()

    def try_acquire(self, n: int) -> bool:
        with self._lock:
            if self.in_flight + n > self.capacity:
                return False
            self.in_flight += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.in_flight -= n


@dataclass
class SteeringState:
    settings: SteeringSettings
    saes: dict[str, SAE]
    gate: SteeringGate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = SteeringGate(self.settings.max_steered_requests)

    @classmethod
    def load(cls, settings: SteeringSettings) -> SteeringState:
        return cls(settings, {e.id: load_sae(e.id, e.path) for e in settings.saes})

    def resolve(self, spec: SteeringSpec | None) -> ResolvedSteering | None:
        return resolve(spec, self.saes, self.settings.limits) if spec is not None else None
