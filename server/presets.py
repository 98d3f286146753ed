"""Presets: named, reviewed steering in exactly the request's form, loaded from a YAML file.

A file is validated whole before it replaces the presets in force, so an invalid edit is
refused (and logged) while the previous presets keep serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from features.sae import SAE
from server.errors import field_path
from steering.spec import (
    FeatureIntervention,
    FiniteFloat,
    MonitorSpec,
    SteeringError,
    SteeringLimits,
    SteeringSpec,
    resolve,
    resolve_monitors,
)

logger = logging.getLogger("steerserve.presets")


class Sampling(BaseModel):
    """Sampling defaults a preset applies where the request does not set them."""

    model_config = ConfigDict(extra="forbid")

    temperature: FiniteFloat | None = None
    top_p: FiniteFloat | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    frequency_penalty: FiniteFloat | None = None
    presence_penalty: FiniteFloat | None = None


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    model: str
    features: list[FeatureIntervention] = []
    scale: FiniteFloat = 1.0
    prompt_scale: Annotated[FiniteFloat, Field(ge=0)] = 1.0
    sampling: Sampling | None = None
    # Guardrails: attached to every request through the preset; a request cannot remove them.
    monitors: list[MonitorSpec] = []

    @model_validator(mode="after")
    def _does_something(self) -> Preset:
        if not self.features and not self.monitors:
            raise ValueError("a preset needs features, monitors or both")
        return self

    def spec(self, extra: SteeringSpec | None = None) -> SteeringSpec:
        """The preset's steering, scaled, with a request's extra features and scale on top; the
        request's prompt_scale, where it sets one, replaces the preset's."""
        extra = extra or SteeringSpec()
        own = [f.model_copy(update={"strength": f.strength * self.scale}) for f in self.features]
        spec = SteeringSpec(features=own + extra.features, scale=extra.scale)
        # Where neither sets one, a calibrated feature's own prompt_scale applies (steering.spec).
        for source in (extra, self):
            if "prompt_scale" in source.model_fields_set:
                return spec.model_copy(update={"prompt_scale": source.prompt_scale})
        return spec

    def file_form(self) -> dict[str, Any]:
        """The preset as a file gives it: unset sampling, gates and an empty features or monitors list left out."""
        form = self.model_dump(exclude_none=True)
        gates = {"when", "tokens", "first_n", "after_n"}
        form["features"] = [f.model_dump(exclude_none=True, exclude=gates - f.model_fields_set) for f in self.features]
        return {name: value for name, value in form.items() if value != [] or name not in ("features", "monitors")}


class PresetsError(ValueError):
    pass


def parse_presets(
    path: Path, saes: Mapping[str, SAE], models: set[str], limits: SteeringLimits
) -> dict[str, Preset]:
    """Load and fully check a presets file; errors name the file, line and preset."""
    try:
        text = path.read_text()
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise PresetsError(f"{path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("presets"), list):
        raise PresetsError(f"{path}:1: expected a mapping with a 'presets' list")
    lines = _entry_lines(root)
    presets: dict[str, Preset] = {}
    for n, raw in enumerate(data["presets"]):
        where = f"{path}:{lines[n] if n < len(lines) else 1}"
        label = f"preset {raw.get('name')!r}" if isinstance(raw, dict) else f"preset #{n + 1}"
        try:
            preset = Preset.model_validate(raw)
            resolve(preset.spec(), saes, limits)
            resolve_monitors(preset.monitors, saes, limits, where="steering.monitors")
        except ValidationError as exc:
            first = exc.errors()[0]
            field = field_path(first["loc"])
            raise PresetsError(f"{where}: {label}: {field}: {first['msg']}") from exc
        except SteeringError as exc:
            field = exc.param.removeprefix("steering.")
            raise PresetsError(f"{where}: {label}: {field}: {exc}") from exc
        if preset.model not in models:
            raise PresetsError(f"{where}: {label}: model {preset.model!r} is not served; served: {sorted(models)}")
        if preset.name in presets or preset.name in models:
            raise PresetsError(f"{where}: {label}: the name is already taken")
        presets[preset.name] = preset
    return presets


def _entry_lines(root: yaml.Node | None) -> list[int]:
    """1-based line of each entry of the top-level 'presets' list."""
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "presets" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


class PresetStore:
    """The presets in force, swapped atomically when the file changes to a valid one."""

    def __init__(self, path: Path | None, parse: Callable[[Path], dict[str, Preset]]):
        self.path = path
        self._parse = parse
        self.presets: dict[str, Preset] = parse(path) if path else {}
        self._mtime = path.stat().st_mtime_ns if path else None
        self._lock = threading.Lock()

    def get(self, name: str) -> Preset | None:
        return self.presets.get(name)

    def reload(self) -> bool:
        """Re-read the file; keep the old presets if the new file is invalid. True if replaced."""
        if self.path is None:
            return False
        with self._lock:
            self._mtime = self.path.stat().st_mtime_ns
            try:
                presets = self._parse(self.path)
            except PresetsError as exc:
                logger.error("presets reload rejected, keeping the %d presets in force: %s", len(self.presets), exc)
                return False
            self.presets = presets  # one assignment: a request sees the old set or the new, never a mix
            logger.info("presets reloaded from %s: %s", self.path, sorted(presets))
            return True

    def changed(self) -> bool:
        try:
            return self.path is not None and self.path.stat().st_mtime_ns != self._mtime
        except OSError:
            return False

    def watch(self, interval: float = 0.5) -> None:
        """Reload in a daemon thread whenever the file's modification time changes."""

        def loop() -> None:
            while True:
                threading.Event().wait(interval)
                if self.changed():
                    self.reload()

        if self.path is not None:
            threading.Thread(target=loop, daemon=True, name="steerserve-presets").start()
