"""The wire between the API process and vLLM's workers: the one module both sides import.

Three things cross it:
- per request, the resolved steering, as compact JSON in `SamplingParams.extra_args[CONFIG_KEY]`,
  and the prefix-cache salt derived from exactly that text; and a readout request, in
  `extra_args[READOUT_KEY]` (`ReadoutRequest`);
- back from the worker (tensor-parallel rank 0) to the API process that asked, over a ZeroMQ
  socket the API process binds (`ReadoutRequest.to`): the readout, one `ReadoutBatch` per request
  per engine step, then one with `end` set once the request's state leaves the worker;
- per engine, `EngineSettings` in vLLM's `additional_config[CONFIG_KEY]`, which vLLM hashes into
  its compile-cache key: the SAE files' digests, the table sizes and a digest of the steering
  code that torch.compile traces, so a graph compiled without these hooks (or with other SAEs,
  tables or hook code) is never reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
from pathlib import Path
from typing import NamedTuple

import torch
from pydantic import BaseModel

from core.local import file_sha256
from features.formats import load_sae
from features.sae import ARCHITECTURES, SAE
from features.vectors import SteeringVector, direction_saes, load_vector
from steering.spec import (
    ResolvedCondition,
    ResolvedFeature,
    ResolvedMonitor,
    ResolvedReadout,
    ResolvedSteering,
    Scope,
    SteeringLimits,
)

CONFIG_KEY = "steerserve"  # key in vllm_config.additional_config and in SamplingParams.extra_args
READOUT_KEY = "steerserve_readout"  # key in SamplingParams.extra_args

# Worker-side modules whose code runs inside the compiled graph: the hook op and the layer callback.
# The SAE architectures' activations are traced too; their files are added where they are defined.
TRACED_MODULES = ("steering.hook", "steering.kernels", "steering.triton_kernels", "steering.worker", "features.vectors")

class Gate(NamedTuple):
    """Where a feature's term applies, per token (1 where all of these hold, else 0)."""

    when: int = 0  # the gate column of its condition (0: none; condition i of the request is column i + 1)
    prompt: bool = True  # on the prompt's tokens
    after_n: int = 0  # on generated tokens g with after_n <= g < first_n
    first_n: int | None = None


OPEN = Gate()


class WireFeature(NamedTuple):
    sae: str
    index: int
    c0: float
    c1: float
    gate: Gate = OPEN
    bias: float = 0.0  # added to its pre-activation (a vector's cap)


class WireCondition(NamedTuple):
    sae: str
    index: int
    above: float  # raw units; holds where the activation exceeds it
    sticky: bool


def _gate(feature: ResolvedFeature, conditions: list[ResolvedCondition]) -> Gate:
    when = 0 if feature.when is None else conditions.index(feature.when) + 1
    completion = feature.tokens != "prompt"
    return Gate(when, feature.tokens != "completion", feature.after_n, feature.first_n if completion else 0)


class WireSteering(NamedTuple):
    features: list[WireFeature]
    conditions: list[WireCondition]
    prompt_scale: float
    vectors: list[torch.Tensor]  # the request's own (inline) vectors, which negative indices name


def encode(resolved: ResolvedSteering) -> str:
    """A request's steering as the worker reads it: (sae, index, c0, c1) per feature, then for one
    that is gated its `Gate` (else null) and for one with a bias the bias; its conditions (sae,
    index, above, sticky); the prompt scale; its inline vectors. Ungated, unbiased steering leaves
    both out, and steering without inline vectors their list."""
    conditions = resolved.conditions()
    features = []
    for f in resolved.features:
        gate = _gate(f, conditions)
        extra = [None if gate == OPEN else list(gate), f.bias] if f.bias else [] if gate == OPEN else [list(gate)]
        features.append([f.sae, f.index, f.c0, f.c1, *extra])
    data: dict = {"features": features, "prompt_scale": resolved.prompt_scale}
    if conditions:
        data["conditions"] = [[c.sae, c.index, c.above, c.sticky] for c in conditions]
    if resolved.vectors:
        data["vectors"] = [list(v) for v in resolved.vectors]
    return json.dumps(data, separators=(",", ":"))


def decode(wire: str) -> WireSteering:
    """The worker's side of `encode`."""
    data = json.loads(wire)
    features = [
        WireFeature(str(s), int(i), float(c0), float(c1), Gate(*extra[0]) if extra and extra[0] else OPEN, float(extra[1]) if len(extra) > 1 else 0.0)
        for s, i, c0, c1, *extra in data["features"]
    ]  # fmt: skip
    conditions = [WireCondition(str(s), int(i), float(above), bool(sticky)) for s, i, above, sticky in data.get("conditions", [])]
    vectors = [torch.tensor(v, dtype=torch.float32) for v in data.get("vectors", [])]
    return WireSteering(features, conditions, float(data["prompt_scale"]), vectors)


def cache_salt(wire: str) -> str:
    """Identifies the steering exactly; salts the prefix cache so steered KV is never shared.
    Also the `hash` a response echoes."""
    return hashlib.sha256(wire.encode()).hexdigest()[:32]


class WireReadout(BaseModel):
    sae: str
    top_k: int
    features: list[int]
    prompt: bool  # read the prompt's positions too
    steered: list[int]  # report these features' values before steering as well


class WireMonitor(BaseModel):
    sae: str
    index: int
    above: float  # raw units; fires where the activation exceeds it
    stop: bool  # force `stop_token` as the next token once it fires
    scope: Scope


class WireResidual(BaseModel):
    """Sum the residual stream over the prompt's positions from `first` on, at the layer of
    `sae` (the stream its hook sees, as the next layer reads it), and keep the last position's."""

    sae: str
    first: int


class ReadoutRequest(BaseModel):
    """What the worker reads and watches for a request, and where it sends what it found."""

    id: str  # the API process's key for the request
    to: str  # the API process's ZeroMQ address
    readout: WireReadout | None = None
    monitors: list[WireMonitor] = []
    stop_token: int | None = None  # what a stop monitor forces: a stop token of the request
    residual: WireResidual | None = None

    def touches(self, sae: str) -> bool:
        return (
            (self.readout is not None and self.readout.sae == sae)
            or any(m.sae == sae for m in self.monitors)
            or (self.residual is not None and self.residual.sae == sae)
        )

    @classmethod
    def of(
        cls, request_id: str, to: str, readout: ResolvedReadout | None, monitors: tuple[ResolvedMonitor, ...], stop_token: int | None
    ) -> ReadoutRequest:
        return cls(
            id=request_id, to=to, stop_token=stop_token,
            readout=WireReadout(sae=readout.sae, top_k=readout.top_k, features=list(readout.features), prompt=readout.prompt,
                                steered=list(readout.steered)) if readout else None,
            monitors=[WireMonitor(sae=m.sae, index=m.index, above=m.above, stop=m.action == "stop", scope=m.scope) for m in monitors],
        )  # fmt: skip


class ReadoutBatch(BaseModel):
    """Worker -> API process: positions one engine request read in one step, or its end.

    Each token: [position, token id, [[index, activation], ...] (top_k, most active first),
    [activation of each listed feature], [activation of each steered feature before steering]].
    A position read again (a preempted request recomputed) carries the same values.
    `residual` (a `WireResidual` asked for it): [positions summed, their sum, the stream at the
    prompt's last position if this step computed it, else null], each position summed once."""

    id: str
    req: str  # the engine's request id: `{i}_...` for choice i when n > 1
    prompt_tokens: int = 0  # the prompt's length: positions before it are the prompt's
    tokens: list[tuple[int, int, list[tuple[int, float]], list[float], list[float]]] = []
    fired: list[tuple[int, int, int, float]] = []  # (monitor's place in the request's list, position, token id, activation)
    residual: tuple[int, list[float], list[float] | None] | None = None
    end: bool = False

    # Several per step per reading request cross the wire: plain JSON both ways, unvalidated (the
    # worker writes them), rather than pydantic's slower serialisation and validation.
    def pack(self) -> bytes:
        return json.dumps({name: getattr(self, name) for name in type(self).model_fields}).encode()

    @classmethod
    def unpack(cls, data: bytes) -> ReadoutBatch:
        return cls.model_construct(**json.loads(data))


class SourceEntry(BaseModel):
    """A loaded SAE or steering vector, as the worker loads it again."""

    id: str
    source: str  # what loads it: features/formats.py's `FORMAT:PATH[@LAYER]`, features/vectors.py's `PATH[@LAYER]`
    digest: str  # of its files: a changed SAE or vector is a changed graph key


class EngineSettings(BaseModel):
    """What the engine's workers need to build the hooks, and what the API process admits against."""

    saes: list[SourceEntry]
    vectors: list[SourceEntry]
    hidden_size: int  # the model's d_in, which every vector has
    inline_vector_layers: list[int]  # where requests may steer with vectors of their own
    max_steered_requests: int  # admitted at once by the API server
    rows: int  # table rows per SAE in the worker: 1 (unsteered) + admitted + finishing lag
    width: int  # features per SAE per request
    max_features: int
    max_strength: float
    max_readout_top_k: int
    max_readout_features: int
    max_monitors: int
    max_inline_vectors: int
    code_digest: str  # of the traced steering code (`traced_files`)

    def load_saes(self) -> dict[str, SAE]:
        """Its SAEs, and its vectors as one DirectionSAE per layer (`vectors@L`), by id: what the
        worker steers with and the API process resolves against."""
        saes = {e.id: load_sae(e.id, e.source) for e in self.saes}
        vectors = {e.id: load_vector(e.id, e.source) for e in self.vectors}
        return saes | direction_saes(vectors, self.hidden_size, self.max_inline_vectors, self.inline_vector_layers)

    @property
    def limits(self) -> SteeringLimits:
        return SteeringLimits(
            max_features=self.max_features, max_features_per_sae=self.width, max_strength=self.max_strength,
            max_readout_top_k=self.max_readout_top_k, max_readout_features=self.max_readout_features,
            max_monitors=self.max_monitors, max_inline_vectors=self.max_inline_vectors,
        )  # fmt: skip

    def additional_config(self) -> dict:
        return {CONFIG_KEY: self.model_dump()}

    @classmethod
    def from_additional_config(cls, config: dict | None) -> EngineSettings | None:
        raw = (config or {}).get(CONFIG_KEY)
        return cls.model_validate(raw) if raw else None


def source_entry(loaded: SAE | SteeringVector) -> SourceEntry:
    return SourceEntry(id=loaded.id, source=loaded.source, digest=file_sha256(*loaded.files)[:16])


def traced_files() -> list[Path]:
    """The source files of all steering code torch.compile traces, found without importing the
    worker side (the API process computes the digest)."""
    files = {Path(importlib.util.find_spec(name).origin) for name in TRACED_MODULES}  # type: ignore[union-attr, arg-type]
    for cls in ARCHITECTURES.values():
        files.update(Path(inspect.getsourcefile(base)) for base in cls.__mro__ if base is not object)  # type: ignore[arg-type]
    return sorted(files)


def code_digest(files: list[Path] | None = None) -> str:
    """Digest of the traced steering code (`traced_files` unless given)."""
    return file_sha256(*(traced_files() if files is None else files))[:16]
