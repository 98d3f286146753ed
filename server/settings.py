"""Steering settings shared by the API process and vLLM's workers.

They travel inside vLLM's `additional_config`, which vLLM hashes into its compile-cache
key: a change of SAEs, table sizes or hook code can never reuse a stale compiled graph.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic import BaseModel

import steering.hook
from features.sae import CONFIG_FILE, STATISTICS_FILE, WEIGHTS_FILE
from steering.spec import SteeringLimits
from steering.worker import CONFIG_KEY


class SAEEntry(BaseModel):
    id: str
    path: str
    digest: str  # of the SAE's files: a changed SAE is a changed graph key


class SteeringSettings(BaseModel):
    saes: list[SAEEntry]
    max_steered_requests: int  # admitted at once by the API server
    rows: int  # table rows per SAE in the worker: 1 (unsteered) + admitted + finishing lag
    width: int  # features per SAE per request
    max_features: int
    max_strength: float
    hook_digest: str

    @property
    def limits(self) -> SteeringLimits:
        return SteeringLimits(
            max_features=self.max_features, max_features_per_sae=self.width, max_strength=self.max_strength
        )

    def additional_config(self) -> dict:
        return {CONFIG_KEY: self.model_dump()}

    @classmethod
    def from_additional_config(cls, config: dict | None) -> SteeringSettings | None:
        raw = (config or {}).get(CONFIG_KEY)
        return cls.model_validate(raw) if raw else None


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        if path.exists():
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def sae_entry(sae_id: str, path: str | Path) -> SAEEntry:
    path = Path(path).resolve()
    return SAEEntry(
        id=sae_id, path=str(path), digest=file_digest(*(path / f for f in (CONFIG_FILE, WEIGHTS_FILE, STATISTICS_FILE)))
    )


def hook_digest() -> str:
    """Digest of the code traced into the compiled graph."""
    return file_digest(Path(steering.hook.__file__))


API_ENV = "STEERSERVE_API"  # the API process's own settings: kept out of additional_config, which vLLM logs


class APISettings(BaseModel):
    presets: str | None = None
    policy: str | None = None
    api_keys: list[str] = []
    log_prompts: bool = False

    def to_env(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_env(cls) -> APISettings:
        raw = os.environ.get(API_ENV)
        return cls.model_validate_json(raw) if raw else cls()
