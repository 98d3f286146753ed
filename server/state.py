"""What the API process knows about steering: SAEs, limits, presets, policy, and admission."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from prometheus_client import Gauge
from vllm.platforms import current_platform

from features.calibration import Calibration
from features.catalogue import Catalogue
from features.formats import description_dir
from features.residuals import ResidualReader
from features.sae import SAE
from features.vectors import DirectionSAE, saes_only
from server.policy import KeyPolicy, Policy, authorize, authorize_steering
from server.presets import Preset, PresetStore, parse_presets
from server.readout import ReadoutHub
from server.settings import APISettings
from steering import wire
from steering.spec import (
    MonitorSpec,
    ReadoutSpec,
    ResolvedMonitor,
    ResolvedReadout,
    ResolvedSteering,
    SteeringError,
    SteeringSpec,
    at_calibration,
    calibrated_prompt_scale,
    resolve,
    resolve_monitors,
    resolve_readout,
    vector_calibration,
)
from steering.wire import EngineSettings

logger = logging.getLogger("steerserve.state")

# Back to 0 whenever nothing steered is running: anything else is a leaked slot. With several API
# processes (vLLM's multiprocess metrics), /metrics gives the sum over the live ones.
STEERED_IN_FLIGHT = Gauge(
    "steerserve_steered_in_flight", "Steered sequences admitted and not yet finished", multiprocess_mode="livesum"
)


class SteeringGate:
    """Bounds steered sequences in flight, so the worker's table rows can never run out.

    A request over the bound is refused (429) rather than queued or run unsteered. Each of
    several API processes (`--api-server-count`) admits its share of the bound, so together they
    never admit more than the engine's rows hold.
    """

    def __init__(self, max_steered: int, api_processes: int = 1):
        self.capacity = max_steered // api_processes
        if self.capacity < 1:
            raise ValueError(f"--max-steered-requests {max_steered} is fewer than the {api_processes} API processes sharing it")
        self.shared = api_processes > 1
        self.in_flight = 0
        self._lock = threading.Lock()

    def try_acquire(self, n: int) -> bool:
        with self._lock:
            if self.in_flight + n > self.capacity:
                return False
            self.in_flight += n
        STEERED_IN_FLIGHT.inc(n)
        return True

    def release(self, n: int) -> None:
        with self._lock:
            self.in_flight -= n
        STEERED_IN_FLIGHT.dec(n)


@dataclass(frozen=True)
class SavedVector:
    layer: int
    vector: torch.Tensor  # [d_in] float32
    stream_norm: float  # the mean norm of the streams it was derived from: what calibration scales by
    owner: str | None = None  # the key that kept it (None on an open server)
    calibration: Calibration | None = None  # what `unit: "calibrated"` means for it (POST /v1/vectors/{name}/calibrate)


class SavedVectors:
    """Vectors derived by `POST /v1/vectors/contrast` and kept under a name, in this API process
    (so not with several: each would know its own). A request names one as a loaded vector; it
    travels to the worker as that request's own (inline) vector, at its layer unless the request
    gives layers."""

    MAX = 64

    def __init__(self) -> None:
        self.vectors: dict[str, SavedVector] = {}

    def check_name(self, name: str, saes: dict[str, SAE], shared: bool, owner: str | None) -> None:
        """Raise SteeringError if a vector may not be kept under `name` here, by key `owner`: a
        name is the server's, seen and steered with by every key, and only its keeper replaces it."""
        if shared:
            raise SteeringError("name", "with several API processes (--api-server-count) a kept vector would be known to one; omit name and send the vector inline")
        if any(isinstance(sae, DirectionSAE) and name in sae.vectors for sae in saes.values()):
            raise SteeringError("name", f"{name!r} is a vector loaded at start-up; choose another name")
        if name in self.vectors and self.vectors[name].owner != owner:
            raise SteeringError("name", f"{name!r} was kept by another key; choose another name")
        if name not in self.vectors and len(self.vectors) >= self.MAX:
            raise SteeringError("name", f"at most {self.MAX} vectors are kept; reuse a name: {sorted(self.vectors)[:8]} ...")

    def put(self, name: str, saved: SavedVector) -> None:
        self.vectors[name] = saved

    def calibrate(self, name: str, calibration: Calibration) -> None:
        self.vectors[name] = replace(self.vectors[name], calibration=calibration)

    def expand(self, spec: SteeringSpec, saes: Mapping[str, SAE]) -> SteeringSpec:
        """`spec` with each kept vector it names given as numbers (at its layer unless it gives
        layers), one at unit 'calibrated' at its calibrated strength and prompt_scale."""
        spec = calibrated_prompt_scale(spec, saes, {name: kept.calibration for name, kept in self.vectors.items()})
        features = []
        for n, f in enumerate(spec.features):
            if isinstance(f.vector, str) and f.vector in self.vectors:
                kept = self.vectors[f.vector]
                if f.unit == "calibrated":
                    where = f"steering.features[{n}]"
                    if (f.layer, f.layers) not in ((None, None), (kept.layer, None), (None, (kept.layer, kept.layer))):
                        # Its strength was measured where it was derived; elsewhere it would mean another.
                        raise SteeringError(f"{where}.{'layer' if f.layers is None else 'layers'}",
                                            f"vector {f.vector!r} is calibrated at layer {kept.layer}; at unit 'calibrated' it steers there only")  # fmt: skip
                    f = at_calibration(f, vector_calibration(f.vector, kept.calibration, where), where)
                f = f.model_copy(update={"vector": kept.vector.tolist(), "layer": f.layer if f.layer is not None or f.layers else kept.layer})
            features.append(f)
        return spec.model_copy(update={"features": features}) if features != spec.features else spec


@dataclass(frozen=True)
class Plan:
    """A request's steering once presets are expanded, the policy applied and the spec resolved."""

    model: str  # the base model to run
    preset: Preset | None
    resolved: ResolvedSteering | None
    wire: str | None = None  # `resolved` as the worker reads it
    salt: str | None = None  # the prefix-cache salt, and the hash the response echoes
    readout: ResolvedReadout | None = None
    monitors: tuple[ResolvedMonitor, ...] = ()  # the request's, its preset's and its key's


class SteeringState:
    def __init__(
        self, settings: EngineSettings, api: APISettings, served_models: set[str], model_dir: Path, api_processes: int = 1
    ):
        self.settings = settings
        self.api = api
        self.saes: dict[str, SAE] = settings.load_saes()  # with the vectors' DirectionSAEs
        self.catalogues: dict[str, Catalogue] = {}
        self._catalogue_lock = threading.Lock()
        for sae_id in saes_only(self.saes):
            self.catalogue(sae_id)
        self.model_dir = model_dir
        self._readers: dict[int, ResidualReader] = {}
        self._readers_lock = threading.Lock()
        self.gate = SteeringGate(settings.max_steered_requests, api_processes)
        self.served_models = served_models
        self.presets = PresetStore(Path(api.presets) if api.presets else None, self.parse_presets)
        self.policy = Policy.load(Path(api.policy) if api.policy else None, api.api_keys)
        self.readouts = ReadoutHub()
        self.saved = SavedVectors()

    @functools.cached_property
    def tokenizer(self):
        """The served model's tokenizer, loaded on first use (readouts and stop monitors need it)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    def token_text(self, token_id: int) -> str:
        """A token as text, as a readout shows it."""
        return self.tokenizer.decode([token_id])

    def stop_token(self) -> int:
        """The token a stop monitor forces: the model's end of sequence."""
        return self.tokenizer.eos_token_id

    def catalogue(self, sae_id: str) -> Catalogue | None:
        """The SAE's catalogue, read again once its files change on disk: `steerserve features
        label` rewrites them while the server runs, and search then finds the new labels."""
        sae = saes_only(self.saes).get(sae_id)
        if sae is None:
            return None
        directory = description_dir(sae.path)
        current = self.catalogues.get(sae_id)
        if current is not None and current.stamp == Catalogue.stamp_of(directory):
            return current
        with self._catalogue_lock:  # one reload, however many requests find the files changed
            current = self.catalogues.get(sae_id)
            if current is None or current.stamp != Catalogue.stamp_of(directory):
                try:
                    loaded = Catalogue.load(directory)
                except (OSError, ValueError, EOFError) as exc:  # unreadable now: keep what was read before
                    logger.warning("catalogue of SAE %r not reloaded: %s", sae_id, exc)
                    return current
                if loaded is None:
                    self.catalogues.pop(sae_id, None)
                else:
                    self.catalogues[sae_id] = loaded
            return self.catalogues.get(sae_id)

    def reader(self, layer: int) -> ResidualReader:
        """The served model, cut after `layer`, in this process (loaded on first use): feature
        search by text reads residuals here rather than through the engine's batch."""
        with self._readers_lock:
            if layer not in self._readers:
                self._readers[layer] = ResidualReader(self.model_dir, layer, torch.float32)
            return self._readers[layer]

    def parse_presets(self, path: Path) -> dict[str, Preset]:
        return parse_presets(path, self.saes, self.served_models, self.settings.limits)

    def plan(
        self,
        model: str,
        spec: SteeringSpec | None,
        key: KeyPolicy | None,
        readout: ReadoutSpec | None = None,
        monitors: list[MonitorSpec] | None = None,
    ) -> Plan:
        """Raises SteeringError (400) or PolicyDenied (403)."""
        preset = self.presets.get(model)
        if spec is not None and spec.preset is not None:
            named = self.presets.get(spec.preset)
            if named is None:
                raise SteeringError("steering.preset", f"unknown preset {spec.preset!r}; presets: {sorted(self.presets.presets)}")
            if preset is not None and named is not preset:
                raise SteeringError("steering.preset", f"model {model!r} is itself a preset; name only one preset")
            if model != named.model:
                raise SteeringError("steering.preset", f"preset {named.name!r} is for model {named.model!r}")
            preset = named
        authorize(key, model, preset.name if preset else None, raw_features=bool(spec and spec.features))
        expanded = preset.spec(spec) if preset is not None else spec
        expanded = self.saved.expand(expanded, self.saes) if expanded is not None else None
        resolved = resolve(expanded, self.saes, self.settings.limits) if expanded is not None else None
        authorize_steering(key, resolved)
        base = preset.model if preset else model
        limits = self.settings.limits
        watch = resolve_monitors(monitors or [], self.saes, limits)
        if preset is not None:
            watch += resolve_monitors(preset.monitors, self.saes, limits, source=f"preset:{preset.name}")
        if key is not None:
            watch += resolve_monitors(key.monitors, self.saes, limits, source=f"policy:{key.name}")
        if len(watch) > limits.max_monitors:
            raise SteeringError("monitors", f"at most {limits.max_monitors} monitors, with the preset's and key's; got {len(watch)}")
        read = resolve_readout(readout, self.saes, limits, resolved) if readout is not None else None
        if (read is not None or watch) and not current_platform.is_cpu():
            # Both are computed in the CPU op; the GPU path (fixed shapes for CUDA graphs) does not read yet.
            raise SteeringError("readout" if read else "monitors", "readout and monitors run on CPU engines only, not yet on this device")
        if resolved is None:
            return Plan(model=base, preset=preset, resolved=None, readout=read, monitors=watch)
        encoded = wire.encode(resolved)
        salt = wire.cache_salt(encoded)
        return Plan(model=base, preset=preset, resolved=resolved, wire=encoded, salt=salt, readout=read, monitors=watch)
