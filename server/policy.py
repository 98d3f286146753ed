"""Who may steer what: API keys and their per-key rules.

Steering can switch off a model's refusal features, so raw feature steering is a privilege:
a key may be limited to presets, to some models, to a strength cap per unit, and kept away
from protected features. A request that breaks a rule is refused (403) naming the rule;
nothing is silently dropped. Keys are identified in logs by name, never by secret.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.errors import field_path
from steering.spec import MonitorSpec, ResolvedSteering, Unit


class ProtectedFeature(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sae: str
    index: int = Field(ge=0)
    forbid: Literal["any", "negative"] = "any"  # negative: ablate, add < 0, scale < 1, clamp <= 0


class KeyPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    key: str | None = None
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    models: list[str] = ["*"]  # model ids (base models or presets) the key may name
    presets: list[str] = ["*"]  # presets the key may use, by model id or steering.preset
    raw_features: bool = True  # False: presets only
    max_strength: dict[Unit, float] = {}
    protected: list[ProtectedFeature] = []
    monitors: list[MonitorSpec] = []  # attached to every request the key makes

    @model_validator(mode="after")
    def _one_secret(self) -> KeyPolicy:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of 'key' and 'key_sha256'")
        return self

    def digest(self) -> bytes:
        return bytes.fromhex(self.key_sha256) if self.key_sha256 else hashlib.sha256(self.key.encode()).digest()


FULL_ACCESS = dict(models=["*"], presets=["*"], raw_features=True)


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyPolicy] = Field(min_length=1)


class PolicyError(ValueError):
    pass


class PolicyDenied(Exception):
    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


class Policy:
    """The configured keys; `None` keys means the server is open, as vLLM is without --api-key."""

    def __init__(self, keys: list[KeyPolicy]):
        self.keys = keys
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise PolicyError("key names must be unique")

    @property
    def open(self) -> bool:
        return not self.keys

    @classmethod
    def load(cls, path: Path | None, api_keys: list[str]) -> Policy:
        keys = [KeyPolicy(name=f"api-key-{n + 1}", key=k, **FULL_ACCESS) for n, k in enumerate(api_keys)]
        if path is not None:
            try:
                keys += PolicyFile.model_validate(yaml.safe_load(path.read_text())).keys
            except (OSError, yaml.YAMLError) as exc:
                raise PolicyError(f"{path}: {exc}") from exc
            except ValidationError as exc:
                first = exc.errors()[0]
                raise PolicyError(f"{path}: {field_path(first['loc'])}: {first['msg']}") from exc
        return cls(keys)

    def identify(self, bearer: str | None) -> KeyPolicy | None:
        if bearer is None:
            return None
        digest = hashlib.sha256(bearer.encode()).digest()
        match = None
        for key in self.keys:  # compare against every key, in constant time
            if hmac.compare_digest(digest, key.digest()):
                match = key
        return match


def authorize(key: KeyPolicy | None, model: str, preset: str | None, raw_features: bool) -> None:
    """Raise PolicyDenied if `key` may not use this model or preset, or send features of its own.
    Checked before the spec is resolved, so a key learns nothing of what it may not use."""
    if key is None:
        return  # open server
    if not _allowed(model, key.models):
        raise PolicyDenied("models", f"key {key.name!r} may not use model {model!r}; allowed: {key.models}")
    if preset is not None and not _allowed(preset, key.presets):
        raise PolicyDenied("presets", f"key {key.name!r} may not use preset {preset!r}; allowed: {key.presets}")
    if raw_features and not key.raw_features:
        raise PolicyDenied("raw_features", f"key {key.name!r} may use presets only, not raw steering features")


def authorize_steering(key: KeyPolicy | None, steering: ResolvedSteering | None) -> None:
    """Raise PolicyDenied if the resolved steering (a preset's included) breaks `key`'s per-unit
    strength caps or touches a protected feature. Reads the strengths resolution yields."""
    if key is None or steering is None:
        return
    if key.protected and steering.vectors:
        # A vector of the client's own could be any protected feature's decoder direction.
        raise PolicyDenied("protected", f"key {key.name!r} has protected features, so it may not steer with inline vectors")
    for n, f in enumerate(steering.features):
        cap = key.max_strength.get(f.unit)
        if cap is not None and abs(f.peak) > cap:  # peak: prompt_scale > 1 steers the prompt harder
            raise PolicyDenied(
                f"max_strength.{f.unit}",
                f"key {key.name!r} caps |strength| in unit {f.unit!r} at {cap}; feature {n} asks {f.peak:g}",
            )
        for p in key.protected:
            if (p.sae, p.index) == (f.sae, f.index) and (p.forbid == "any" or _negative(f.mode, f.requested)):
                what = "steered" if p.forbid == "any" else "ablated or steered negatively"
                raise PolicyDenied("protected", f"feature {f.sae}/{f.index} is protected and may not be {what}")


def _allowed(name: str, allowed: list[str]) -> bool:
    return "*" in allowed or name in allowed


def _negative(mode: str, strength: float) -> bool:
    return mode == "ablate" or (mode == "add" and strength < 0) or (mode == "scale" and strength < 1) or (
        mode == "clamp" and strength <= 0
    )
