"""The API process's own settings (presets, policy, keys), handed from `steerserve serve` to the
process vLLM runs the API server in. The engine's settings are steering/wire.py's `EngineSettings`."""

from __future__ import annotations

import os

from pydantic import BaseModel

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
