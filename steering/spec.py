"""The `steering` request field: its schema, and its resolution into per-feature coefficients.

Every mode is one formula, x + (c0 + c1 * f_i(x)) * d_i, with f_i the SAE's activation of
feature i and d_i its decoder row:

    add     c0 = s, c1 = 0       x + s*d_i
    clamp   c0 = s, c1 = -1      x + (s - f_i(x))*d_i
    ablate  c0 = 0, c1 = -1      x - f_i(x)*d_i
    scale   c0 = 0, c1 = s - 1   x + (s-1)*f_i(x)*d_i

so the worker needs only (sae, index, c0, c1) per feature; units and the request-level
`scale` are folded into s here, on the server, where the SAE statistics live. A steering vector
(loaded, or given inline as numbers) is a feature of its layer's DirectionSAE, whose projection
modes (ablate, clamp, cap) take the same form (features/vectors.py).

`prompt_scale` multiplies the whole delta on the prompt's tokens (chat history and template
included) and leaves the tokens the model writes as they are: 0 steers only what the model
writes; above 1, the prompt is read more strongly steered than the answer is written.

Each intervention may also be gated, per token, by a window and a condition (1 where both hold,
else 0, multiplying its term). A token counts as it is fed in: generated token g (0-based) sits at
position prompt length + g, and the prompt's last token, which yields token 0, is the prompt's.
- Window: `tokens` ("all", "prompt" or "completion"), and over generated tokens `after_n`
  <= g < `first_n`. `tokens: "completion"` steers exactly as `prompt_scale: 0` does.
- Condition (`when`): a feature of an SAE at the intervention's layer (the same SAE) or an earlier
  one, above a threshold, on the stream as that SAE's hook receives it (before it steers; after
  any hook before it at that layer). Scope "token" gates each token
  by its own value; "sticky" opens at the request's first token where it held and stays open.

`resolve` is the one validation path: a request, a presets file (at start-up, on reload and in
`steerserve presets check`) and the access policy all read what it yields, so a spec that one
of them accepts every other accepts too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from features.calibration import Calibration
from features.sae import SAE
from features.vectors import PREFIX, DirectionSAE, inline_layers, saes_only

Mode = Literal["add", "clamp", "ablate", "scale", "cap"]
Unit = Literal["raw", "max_act", "norm", "calibrated"]
Scope = Literal["prompt", "completion", "all"]
Tokens = Literal["all", "prompt", "completion"]
# Distinct conditions one request may carry: each is a column of the worker's per-token gate table.
MAX_CONDITIONS = 8
# The largest first_n or after_n: past any context length, and exact as the worker's float32.
MAX_WINDOW = 1 << 24
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]
INLINE_LENGTH = (1e-6, 6e4)  # an inline vector's: its direction is taken in float32, its values kept in float16
Layer = Annotated[int, Field(ge=0, le=1 << 16, strict=True)]  # past any model's depth


class Condition(BaseModel):
    """An intervention's `when`: it applies only where this feature fires."""

    model_config = ConfigDict(extra="forbid")

    sae: str = Field(description="id of a server-loaded SAE at the intervention's layer (its own SAE) or an earlier one")
    index: Annotated[int, Field(ge=0, strict=True)]
    above: FiniteFloat = Field(description="holds where the feature's activation exceeds this")
    unit: Literal["raw", "max_act"] = "raw"
    scope: Literal["token", "sticky"] = Field(
        default="token", description="token: on the tokens where it holds; sticky: from the first such token to the end"
    )


class FeatureIntervention(BaseModel):
    """One feature, or one loaded steering vector, to steer, in the form requests and preset files both use."""

    model_config = ConfigDict(extra="forbid")

    sae: str | None = Field(default=None, description="id of a server-loaded SAE (see GET /v1/saes); with `index`")
    index: Annotated[int, Field(ge=0, strict=True)] | None = Field(default=None, description="feature index in the SAE")
    vector: str | list[FiniteFloat] | None = Field(
        default=None, description="instead of sae and index: a loaded steering vector's id (see GET /v1/vectors), or d_in numbers"
    )
    layer: Layer | None = Field(default=None, description="a vector: the layer to steer, as layers [layer, layer]")
    layers: tuple[Layer, Layer] | None = Field(
        default=None, description="a vector: the layers a..b (inclusive) to steer; a loaded vector steers its own direction at each"
    )
    mode: Mode = "add"
    strength: FiniteFloat = 0.0
    unit: Unit = "raw"
    when: Condition | None = Field(default=None, description="steer only where this condition holds")
    tokens: Tokens = Field(default="all", description="which tokens to steer: the prompt's, the generated ones, or all")
    first_n: Annotated[int, Field(ge=1, le=MAX_WINDOW, strict=True)] | None = Field(default=None, description="steer only the first n generated tokens")
    after_n: Annotated[int, Field(ge=0, le=MAX_WINDOW, strict=True)] = Field(default=0, description="steer generated tokens only after the first n")


class SteeringSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field(default=None, description="a preset's steering, with `features` added on top")
    features: list[FeatureIntervention] = Field(default_factory=list)
    scale: FiniteFloat = Field(default=1.0, description="multiplies every strength")
    prompt_scale: Annotated[FiniteFloat, Field(ge=0)] = Field(
        default=1.0, description="multiplies the steering on the prompt's tokens; 0 steers only the tokens the model writes"
    )


class ReadoutSpec(BaseModel):
    """The `readout` field: which features to report at each token (see `resolve_readout`)."""

    model_config = ConfigDict(extra="forbid")

    sae: str = Field(description="id of a server-loaded SAE")
    top_k: Annotated[int, Field(ge=0, strict=True)] = Field(default=5, description="the most active features per token")
    features: list[Annotated[int, Field(ge=0, strict=True)]] = Field(
        default_factory=list, description="feature indices whose activation is reported at every token"
    )
    prompt: bool = Field(default=False, description="also read the prompt's tokens")


class MonitorSpec(BaseModel):
    """One entry of the `monitors` field: watch a feature, flag or stop when it fires."""

    model_config = ConfigDict(extra="forbid")

    sae: str = Field(description="id of a server-loaded SAE")
    index: Annotated[int, Field(ge=0, strict=True)]
    above: FiniteFloat = Field(description="fires where the feature's activation exceeds this")
    unit: Literal["raw", "max_act"] = "raw"
    action: Literal["flag", "stop"] = "flag"
    scope: Scope = "completion"


@dataclass(frozen=True)
class SteeringLimits:
    """What one request may steer and read; `steerserve serve` and `steerserve presets check`
    take these defaults as their flags' defaults."""

    max_features: int = 64
    max_features_per_sae: int = 64
    max_strength: float = 1000.0
    max_readout_top_k: int = 32
    max_readout_features: int = 64
    max_monitors: int = 16
    max_inline_vectors: int = 4


class SteeringError(ValueError):
    """A steering spec the server cannot apply; `param` is the offending field's path."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ResolvedCondition:
    sae: str
    index: int
    above: float  # raw units
    sticky: bool


@dataclass(frozen=True)
class ResolvedFeature:
    sae: str
    index: int
    mode: Mode
    unit: Unit  # a vector's add is judged in "norm": the length of what it adds
    requested: float  # strength x scale, in `unit`: what the policy's per-unit caps read
    peak: float  # requested, times prompt_scale where that steers the prompt harder
    strength: float  # in the SAE's raw activation units (norm: along the raw decoder row)
    c0: float
    c1: float
    when: ResolvedCondition | None = None
    tokens: Tokens = "all"
    after_n: int = 0
    first_n: int | None = None
    vector: str | None = None  # a loaded vector's id; `sae` is then its layer's DirectionSAE
    inline: int | None = None  # or the request's own vector k (`index` -(2k + 1) or -(2k + 2))
    bias: float = 0.0  # added to the feature's pre-activation (a vector's cap: -c)

    def target(self) -> dict:
        """What it steers, as a response echoes it."""
        if self.vector is not None:
            return {"vector": self.vector, "layer": int(self.sae.removeprefix(PREFIX))}
        if self.inline is not None:
            return {"inline_vector": self.inline, "layer": int(self.sae.removeprefix(PREFIX))}
        return {"sae": self.sae, "index": self.index}

    def gating(self) -> dict:
        """Its condition and window where they narrow it, as a response echoes them (raw units)."""
        out: dict = {}
        if self.when is not None:
            w = self.when
            out["when"] = {"sae": w.sae, "index": w.index, "above": w.above, "unit": "raw", "scope": "sticky" if w.sticky else "token"}
        if self.tokens != "all":
            out["tokens"] = self.tokens
        if self.after_n:
            out["after_n"] = self.after_n
        if self.first_n is not None:
            out["first_n"] = self.first_n
        return out


@dataclass(frozen=True)
class ResolvedSteering:
    features: tuple[ResolvedFeature, ...]
    prompt_scale: float = 1.0
    vectors: tuple[tuple[float, ...], ...] = ()  # the request's own (inline) vectors, in order

    def sticky(self) -> int | None:
        """The place of the first feature with a sticky condition, if any: its state needs every
        prompt token computed, none taken from the prefix cache."""
        return next((n for n, f in enumerate(self.features) if f.when is not None and f.when.sticky), None)

    def private(self) -> bool:
        """Whether its KV must never be shared through the prefix cache: steering that follows the
        prompt's length (prompt_scale, a token window) writes the KV of an answer's tokens as no
        later prompt holding them would, and a sticky condition must see every prompt token."""
        windowed = any(f.tokens != "all" or f.after_n or f.first_n is not None for f in self.features)
        return self.prompt_scale != 1.0 or windowed or self.sticky() is not None

    def conditions(self) -> list[ResolvedCondition]:
        """Its distinct conditions, in first-use order: condition i is the worker's gate column i + 1."""
        return list(dict.fromkeys(f.when for f in self.features if f.when is not None))

    def echo(self) -> dict:
        """What the response reports back: the interventions as applied, in raw units."""
        return {
            "features": [
                {**f.target(), "mode": f.mode, "strength": f.strength, "unit": "raw", **f.gating()}
                for f in self.features
            ],
            "prompt_scale": self.prompt_scale,
        }


@dataclass(frozen=True)
class ResolvedReadout:
    sae: str
    layer: int
    top_k: int
    features: tuple[int, ...]
    prompt: bool
    steered: tuple[int, ...]  # this SAE's features the request steers: their values before steering are reported too


def resolve_readout(
    spec: ReadoutSpec, saes: Mapping[str, SAE], limits: SteeringLimits, steering: ResolvedSteering | None
) -> ResolvedReadout:
    """Check a readout spec against the loaded SAEs and limits. Raises SteeringError naming the field."""
    sae = _find_sae(saes, spec.sae, "readout.sae")
    if spec.top_k > min(limits.max_readout_top_k, sae.cfg.d_sae):
        raise SteeringError("readout.top_k", f"top_k must be at most {min(limits.max_readout_top_k, sae.cfg.d_sae)}")
    if len(spec.features) > limits.max_readout_features:
        raise SteeringError("readout.features", f"at most {limits.max_readout_features} features, got {len(spec.features)}")
    for n, index in enumerate(spec.features):
        if index >= sae.cfg.d_sae:
            raise SteeringError(f"readout.features[{n}]", f"index {index} out of range for SAE {sae.id!r}: 0 <= index < {sae.cfg.d_sae}")
        if index in spec.features[:n]:
            raise SteeringError(f"readout.features[{n}]", f"feature {index} is listed twice")
    if not spec.top_k and not spec.features:
        raise SteeringError("readout", "nothing to read: give top_k > 0 or features")
    steered = tuple(f.index for f in steering.features if f.sae == sae.id) if steering else ()
    return ResolvedReadout(sae.id, sae.cfg.layer, spec.top_k, tuple(spec.features), spec.prompt, steered)


@dataclass(frozen=True)
class ResolvedMonitor:
    sae: str
    index: int
    above: float  # raw units
    action: Literal["flag", "stop"]
    scope: Scope
    source: str  # "request", or the preset or policy key that attached it


def resolve_monitors(
    specs: list[MonitorSpec], saes: Mapping[str, SAE], limits: SteeringLimits, source: str = "request", where: str = "monitors"
) -> tuple[ResolvedMonitor, ...]:
    """Check monitors against the loaded SAEs and limits. Raises SteeringError naming the field."""
    if len(specs) > limits.max_monitors:
        raise SteeringError(where, f"at most {limits.max_monitors} monitors, got {len(specs)}")
    resolved = []
    for n, spec in enumerate(specs):
        sae = _find_sae(saes, spec.sae, f"{where}[{n}].sae")
        if spec.index >= sae.cfg.d_sae:
            raise SteeringError(f"{where}[{n}].index", f"index {spec.index} out of range for SAE {sae.id!r}: 0 <= index < {sae.cfg.d_sae}")
        above = _threshold(spec.above, spec.unit, sae, spec.index, f"{where}[{n}]")
        resolved.append(ResolvedMonitor(sae.id, spec.index, above, spec.action, spec.scope, source))
    return tuple(resolved)


def resolve(spec: SteeringSpec, saes: Mapping[str, SAE], limits: SteeringLimits) -> ResolvedSteering | None:
    """Check a spec against the loaded SAEs and limits; None when it steers nothing.
    Raises SteeringError naming the first offending field."""
    if not spec.features:
        return None
    if len(spec.features) > limits.max_features:
        raise SteeringError(
            "steering.features", f"at most {limits.max_features} interventions per request, got {len(spec.features)}"
        )
    spec = calibrated_prompt_scale(spec, saes)
    seen: dict[tuple[str, int], int] = {}
    resolved, inline = [], []
    for n, feature in enumerate(spec.features):
        where = f"steering.features[{n}]"
        if abs(feature.strength) > limits.max_strength:
            raise SteeringError(f"{where}.strength", f"|strength| must be at most {limits.max_strength}")
        if isinstance(feature.vector, list):
            if len(inline) == limits.max_inline_vectors:
                raise SteeringError(f"{where}.vector", f"at most {limits.max_inline_vectors} inline vectors per request")
            inline.append(tuple(feature.vector))
        for sae, index, length in _targets(feature, where, saes, len(inline) - 1):
            key = (sae.id, index)
            if key in seen:
                what = f"vector {feature.vector} at layer {sae.cfg.layer}" if isinstance(feature.vector, str) else f"feature {sae.id}:{index}"
                raise SteeringError(where, f"{what} is already steered by features[{seen[key]}]; give it once")
            seen[key] = n
            resolved.append(_resolve_one(feature, n, sae, index, length, saes, spec, limits))
    steering = ResolvedSteering(tuple(resolved), spec.prompt_scale, tuple(inline))
    conditions = steering.conditions()
    if len(conditions) > MAX_CONDITIONS:
        raise SteeringError("steering.features", f"at most {MAX_CONDITIONS} distinct `when` conditions per request, got {len(conditions)}")
    # Each intervention, and each condition, takes one of its SAE's per-request table slots.
    for sae_id in {f.sae for f in resolved} | {c.sae for c in conditions}:
        used = sum(f.sae == sae_id for f in resolved) + sum(c.sae == sae_id for c in conditions)
        if used > limits.max_features_per_sae:
            raise SteeringError(
                "steering.features",
                f"at most {limits.max_features_per_sae} interventions per SAE per request, "
                f"each distinct `when` condition counting as one at its SAE ({sae_id!r}: {used})",
            )
    return steering


def _targets(feature: FeatureIntervention, where: str, saes: Mapping[str, SAE], k: int) -> list[tuple[SAE, int, float | None]]:
    """The (SAE, feature index, vector length) triples an intervention steers: one SAE feature; or a
    vector's projection feature (2j; cap: 2j + 1) at each layer it steers (features/vectors.py), or
    for the request's inline vector `k` -(2k + 1) (cap: -(2k + 2))."""
    if feature.vector is None:
        if feature.sae is None or feature.index is None:
            raise SteeringError(f"{where}.{'index' if feature.sae else 'sae'}", "give an SAE feature (sae and index) or a vector (vector)")
        for field in ("layer", "layers"):
            if getattr(feature, field) is not None:
                raise SteeringError(f"{where}.{field}", f"{field} applies to vectors; an SAE feature steers at its SAE's layer")
        if feature.mode == "cap":
            raise SteeringError(f"{where}.mode", "mode 'cap' applies to vectors; an SAE feature takes add, clamp, ablate or scale")
        sae = _find_sae(saes, feature.sae, f"{where}.sae")
        if feature.index >= sae.cfg.d_sae:
            raise SteeringError(f"{where}.index", f"index {feature.index} out of range for SAE {sae.id!r}: 0 <= index < {sae.cfg.d_sae}")
        return [(sae, feature.index, None)]
    if feature.sae is not None or feature.index is not None:
        raise SteeringError(f"{where}.vector", "a vector replaces sae and index: give one or the other")
    if feature.mode == "scale" or feature.unit in ("max_act", "calibrated"):
        field, what = ("mode", "a vector's modes are add, ablate, clamp and cap") if feature.mode == "scale" else (
            "unit", "a vector's units are raw and norm, and calibrated for a kept vector once calibrated (POST /v1/vectors/{name}/calibrate)")
        raise SteeringError(f"{where}.{field}", what)
    if feature.layer is not None and feature.layers is not None:
        raise SteeringError(f"{where}.layer", "give layer or layers, not both")
    span = (feature.layer, feature.layer) if feature.layer is not None else feature.layers
    if span is not None and span[0] > span[1]:
        raise SteeringError(f"{where}.layers", f"layers [{span[0]}, {span[1]}]: the first must not exceed the second")
    directions = [sae for sae in saes.values() if isinstance(sae, DirectionSAE)]
    cap = feature.mode == "cap"
    if isinstance(feature.vector, list):
        return _inline_targets(feature.vector, span, where, directions, k, cap)
    found = [(sae, 2 * sae.vectors[feature.vector] + cap, float(sae.W_dec[2 * sae.vectors[feature.vector]].norm()))
             for sae in directions if feature.vector in sae.vectors]  # fmt: skip
    if not found:
        raise SteeringError(f"{where}.vector", f"unknown vector {feature.vector!r}; loaded vectors: {sorted({v for sae in directions for v in sae.vectors})}")
    if span is not None:
        inside = [target for target in found if span[0] <= target[0].cfg.layer <= span[1]]
        if not inside:
            layers = [sae.cfg.layer for sae, _, _ in found]
            raise SteeringError(f"{where}.{'layer' if feature.layer is not None else 'layers'}",
                                f"vector {feature.vector!r} has directions at layers {layers}, none in {span[0]}..{span[1]}")  # fmt: skip
        found = inside
    return sorted(found, key=lambda target: target[0].cfg.layer)


def _inline_targets(
    vector: list[float], span: tuple[int, int] | None, where: str, directions: list[DirectionSAE], k: int, cap: bool
) -> list[tuple[SAE, int, float]]:
    """A request's own vector k at each layer of `span` (every one must take inline vectors)."""
    taking = inline_layers(directions)
    if not taking:
        raise SteeringError(f"{where}.vector", "this server takes no inline vectors (see --max-inline-vectors and --inline-vector-layers)")
    if span is None:
        raise SteeringError(f"{where}.layer", f"an inline vector needs a layer (or layers); this server takes them at layers {taking}")
    missing = [layer for layer in range(span[0], span[1] + 1) if layer not in taking]
    if missing:
        raise SteeringError(f"{where}.layer" if span[0] == span[1] else f"{where}.layers",
                            f"this server takes inline vectors at layers {taking} (--inline-vector-layers), not {missing[:8]}{' ...' if len(missing) > 8 else ''}")  # fmt: skip
    d_in = directions[0].cfg.d_in
    if len(vector) != d_in:
        raise SteeringError(f"{where}.vector", f"an inline vector has d_in = {d_in} numbers, got {len(vector)}")
    length = math.sqrt(sum(v * v for v in vector))
    if not INLINE_LENGTH[0] <= length <= INLINE_LENGTH[1]:  # the worker's float32 normalises it
        raise SteeringError(f"{where}.vector", f"an inline vector's length must be between {INLINE_LENGTH[0]:g} and {INLINE_LENGTH[1]:g}")
    return [(sae, -(2 * k + 1) - cap, length) for sae in directions if span[0] <= sae.cfg.layer <= span[1]]


def _resolve_one(
    feature: FeatureIntervention, n: int, sae: SAE, index: int, length: float | None, saes: Mapping[str, SAE],
    spec: SteeringSpec, limits: SteeringLimits,
) -> ResolvedFeature:  # fmt: skip
    """`length`: a vector's, whose feature decodes to the raw vector (None for an SAE feature)."""
    where = f"steering.features[{n}]"
    if feature.tokens == "prompt" and (feature.first_n is not None or feature.after_n):
        raise SteeringError(f"{where}.tokens", "first_n and after_n count generated tokens; with tokens 'prompt' none is steered")
    if feature.first_n is not None and feature.after_n >= feature.first_n:
        raise SteeringError(f"{where}.after_n", f"after_n ({feature.after_n}) must be below first_n ({feature.first_n}), or no token is steered")
    when = _resolve_condition(feature.when, f"{where}.when", sae, saes) if feature.when is not None else None
    requested = feature.strength * spec.scale
    if abs(requested) > limits.max_strength:
        raise SteeringError(
            "steering.scale",
            f"scale {spec.scale} takes features[{n}].strength to {requested}; "
            f"|strength x scale| must be at most {limits.max_strength}",
        )
    peak = requested * max(1.0, spec.prompt_scale)
    if abs(peak) > limits.max_strength:
        raise SteeringError(
            "steering.prompt_scale",
            f"prompt_scale {spec.prompt_scale} takes features[{n}].strength to {peak} on the "
            f"prompt; |strength x scale x prompt_scale| must be at most {limits.max_strength}",
        )
    s = requested
    unit = feature.unit
    if unit == "calibrated":
        calibration = _calibration(sae, index, where)
        feature = _in_calibrated_mode(feature, calibration, where, f"feature {index} of SAE {sae.id!r}")
        # What caps and the echo read: the calibrated strength in its own unit.
        s, requested, peak, unit = s * calibration.strength, requested * calibration.strength, peak * calibration.strength, calibration.unit
        if abs(peak) > limits.max_strength:
            raise SteeringError(f"{where}.strength", f"the calibrated strength takes it to {peak:g} {unit}; at most {limits.max_strength}")
    if unit == "max_act":
        if sae.max_act is None:
            raise SteeringError(
                f"{where}.unit", f"SAE {sae.id!r} has no feature statistics, so unit 'max_act' is unavailable; use 'raw'"
            )
        s *= float(sae.max_act[index])
    elif unit == "norm":
        if feature.mode != "add":
            raise SteeringError(f"{where}.unit", "unit 'norm' applies to mode 'add' only; use 'raw' or 'max_act'")
        norm = length if length is not None else float(sae.W_dec[index].norm())
        if not norm > 0:
            raise SteeringError(
                f"{where}.unit", f"feature {index} of SAE {sae.id!r} has no decoder direction; unit 'norm' is undefined"
            )
        s /= norm
    if not math.isfinite(s):
        raise SteeringError(f"{where}.strength", "strength overflows once its unit and scale are applied")
    # A vector's feature decodes to the raw vector v; its projection modes act along v / |v|.
    inverse = 1.0 / length if length is not None else 1.0
    if length is not None and feature.mode == "add" and unit == "raw":
        # A raw vector adds s * |v|: caps (--max-strength, a key's per-unit caps) judge that length,
        # as unit "norm", or a long vector would carry any strength past them.
        requested, peak = requested * length, peak * length
        if abs(peak) > limits.max_strength:
            raise SteeringError(f"{where}.strength", f"|strength| x the vector's length ({length:g}) must be at most {limits.max_strength}")
    c0, c1 = {
        "add": (s, 0.0),
        "clamp": (s * inverse, -inverse),
        "ablate": (0.0, -inverse),
        "scale": (0.0, s - 1.0),
        "cap": (0.0, -inverse),
    }[feature.mode]
    unit = "norm" if length is not None and feature.mode == "add" else unit
    return ResolvedFeature(
        sae=sae.id, index=index, mode=feature.mode, unit=unit, requested=requested, peak=peak,
        strength=s, c0=c0, c1=c1, when=when, tokens=feature.tokens, after_n=feature.after_n, first_n=feature.first_n,
        vector=feature.vector if isinstance(feature.vector, str) else None, inline=(-index - 1) // 2 if index < 0 else None,
        bias=-s if feature.mode == "cap" else 0.0,
    )  # fmt: skip


def _calibration(sae: SAE, index: int, where: str) -> Calibration:
    calibration = sae.calibrations.get(index) if sae.calibrations is not None else None
    if calibration is None:
        raise SteeringError(
            f"{where}.unit", f"feature {index} of SAE {sae.id!r} is not calibrated: POST /v1/saes/{sae.id}/features/{index}/calibrate first"
        )
    return calibration


def calibrated_prompt_scale(spec: SteeringSpec, saes: Mapping[str, SAE], vectors: Mapping[str, Calibration | None] | None = None) -> SteeringSpec:
    """The spec with the prompt_scale its calibrated features (and kept `vectors`, by name) were
    calibrated at, unless it sets one itself; features calibrated at different ones need it set."""
    if "prompt_scale" in spec.model_fields_set:
        return spec
    found: dict[float, int] = {}
    for n, feature in enumerate(spec.features):
        if feature.unit != "calibrated":
            continue
        if isinstance(feature.vector, str) and vectors is not None and feature.vector in vectors:
            found.setdefault(vector_calibration(feature.vector, vectors[feature.vector], f"steering.features[{n}]").prompt_scale, n)
        elif feature.vector is None and feature.sae in saes and feature.index is not None:
            sae = saes[feature.sae]
            if feature.index < sae.cfg.d_sae:
                found.setdefault(_calibration(sae, feature.index, f"steering.features[{n}]").prompt_scale, n)
    if len(found) > 1:
        listed = ", ".join(f"features[{n}] at {p:g}" for p, n in found.items())
        raise SteeringError("steering.prompt_scale", f"the features were calibrated at different prompt_scales ({listed}): give prompt_scale")
    return spec.model_copy(update={"prompt_scale": next(iter(found))}) if found else spec


def vector_calibration(name: str, calibration: Calibration | None, where: str) -> Calibration:
    if calibration is None:
        raise SteeringError(f"{where}.unit", f"vector {name!r} is not calibrated: POST /v1/vectors/{name}/calibrate first")
    return calibration


def at_calibration(feature: FeatureIntervention, calibration: Calibration, where: str) -> FeatureIntervention:
    """A kept vector's intervention at unit 'calibrated' in the calibration's own mode and unit."""
    feature = _in_calibrated_mode(feature, calibration, where, f"vector {feature.vector!r}")
    return feature.model_copy(update={"strength": feature.strength * calibration.strength, "unit": calibration.unit})


def _in_calibrated_mode(feature: FeatureIntervention, calibration: Calibration, where: str, what: str) -> FeatureIntervention:
    """The intervention in the mode it was calibrated for; naming another is refused."""
    if "mode" in feature.model_fields_set and feature.mode != calibration.mode:
        raise SteeringError(f"{where}.mode", f"{what} is calibrated for mode {calibration.mode!r}, not {feature.mode!r}")
    return feature.model_copy(update={"mode": calibration.mode})


def _resolve_condition(condition: Condition, where: str, steered: SAE, saes: Mapping[str, SAE]) -> ResolvedCondition:
    sae = _find_sae(saes, condition.sae, f"{where}.sae")
    # A condition is read before the intervention's SAE steers: at an earlier layer, or by its own hook.
    if sae.cfg.layer > steered.cfg.layer or (sae.cfg.layer == steered.cfg.layer and sae.id != steered.id):
        raise SteeringError(
            f"{where}.sae",
            f"a condition must be read at the intervention's layer ({steered.cfg.layer}) by its own SAE {steered.id!r}, "
            f"or at an earlier layer; SAE {sae.id!r} is at layer {sae.cfg.layer}",
        )
    if condition.index >= sae.cfg.d_sae:
        raise SteeringError(f"{where}.index", f"index {condition.index} out of range for SAE {sae.id!r}: 0 <= index < {sae.cfg.d_sae}")
    above = _threshold(condition.above, condition.unit, sae, condition.index, where)
    return ResolvedCondition(sae.id, condition.index, above, condition.scope == "sticky")


def _find_sae(saes: Mapping[str, SAE], sae_id: str, param: str) -> SAE:
    """The loaded SAE `sae_id` (a layer's DirectionSAE is none); SteeringError on `param` if there is none."""
    sae = saes_only(saes).get(sae_id)
    if sae is None:
        raise SteeringError(param, f"unknown SAE {sae_id!r}; loaded SAEs: {sorted(saes_only(saes))}")
    return sae


def _threshold(above: float, unit: str, sae: SAE, index: int, where: str) -> float:
    """A monitor's or condition's threshold in raw units."""
    if unit == "raw":
        return above
    if sae.max_act is None:
        raise SteeringError(f"{where}.unit", f"SAE {sae.id!r} has no feature statistics; use unit 'raw'")
    return above * float(sae.max_act[index])
