"""Sparse autoencoders in SAELens's on-disk format: the SAE math's one home.

A directory holds `cfg.json` and `sae_weights.safetensors` (`W_enc` [d_in, d_sae],
`b_enc` [d_sae], `W_dec` [d_sae, d_in], `b_dec` [d_in], and an architecture's own
per-feature tensors, such as JumpReLU's `threshold` [d_sae]), plus optionally
`feature_statistics.safetensors` with per-feature `max_act` [d_sae], which is what
`unit: max_act` steers in multiples of.

Each architecture is one small class registered by name (as in SAELens): the base class holds
the shared input pipeline, pre-activation and decoding; a subclass gives its activation f. The
steering hook, `SAE.encode`, the quality report and the catalogue all go through these classes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
STATISTICS_FILE = "feature_statistics.safetensors"
DEFAULT_SAE = Path(__file__).parent / "default"  # the default model's own SAE (python -m features.build)

Normalization = Literal["none", "constant_norm_rescale", "expected_average_only_in"]
_NORMALIZATIONS = ("none", "constant_norm_rescale", "expected_average_only_in")
# TransformerLens names (`blocks.L.hook_resid_post`) and HF module names (`model.layers.L`)
# both denote the output of decoder layer L: the residual stream after the layer.
_RESID_POST = (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), re.compile(r"^model\.layers\.(\d+)$"))


class SAEFormatError(ValueError):
    """A file on disk is not a usable SAE; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")


def layer_of_hook(hook_name: str) -> int | None:
    """The decoder layer whose output (resid_post) `hook_name` denotes, or None."""
    for pattern in _RESID_POST:
        if match := pattern.match(hook_name):
            return int(match.group(1))
    return None


@dataclass(frozen=True)
class SAEConfig:
    architecture: str  # a name in ARCHITECTURES, as the file gives it
    d_in: int
    d_sae: int
    hook_name: str
    layer: int
    apply_b_dec_to_input: bool
    normalize_activations: Normalization
    norm_scaling_factor: float | None
    k: int | None  # TopK's k, where the file gives one

    @classmethod
    def from_json(cls, path: Path) -> SAEConfig:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SAEFormatError(path, f"cannot read SAE config: {exc}") from exc
        if not isinstance(raw, dict):
            raise SAEFormatError(path, "SAE config must be a JSON object")

        def need(key: str) -> object:
            if key not in raw:
                raise SAEFormatError(path, f"missing required field {key!r}")
            return raw[key]

        arch = str(raw.get("architecture", "standard"))
        if arch not in ARCHITECTURES:
            raise SAEFormatError(path, f"architecture {arch!r} is not one of {sorted(ARCHITECTURES)}")
        hook_name = str(need("hook_name"))
        layer = layer_of_hook(hook_name)
        if layer is None:
            raise SAEFormatError(
                path,
                f"unknown hook {hook_name!r}: steerserve hooks the residual stream after a layer, "
                "named 'blocks.<L>.hook_resid_post' or 'model.layers.<L>'",
            )
        norm = raw.get("normalize_activations") or "none"
        if norm not in _NORMALIZATIONS:
            raise SAEFormatError(path, f"normalize_activations {norm!r} is not one of {list(_NORMALIZATIONS)}")
        scaling = raw.get("norm_scaling_factor")
        if norm == "expected_average_only_in" and not isinstance(scaling, (int, float)):
            raise SAEFormatError(path, "normalize_activations 'expected_average_only_in' needs a numeric 'norm_scaling_factor'")
        d_in, d_sae = need("d_in"), need("d_sae")
        if not (isinstance(d_in, int) and isinstance(d_sae, int) and d_in > 0 and d_sae > 0):
            raise SAEFormatError(path, "d_in and d_sae must be positive integers")
        k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
        return cls(
            architecture=arch,
            d_in=d_in,
            d_sae=d_sae,
            hook_name=hook_name,
            layer=layer,
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", False)),
            normalize_activations=norm,
            norm_scaling_factor=float(scaling) if scaling is not None else None,
            k=k if isinstance(k, int) else None,
        )


class SAE:
    """One loaded SAE. The base class holds what every architecture shares: the input pipeline
    (normalise, then subtract b_dec where the SAE says so; SAELens's `process_sae_in`), the
    pre-activation and decoding. A subclass is one architecture: its activation f.
    """

    architecture: ClassVar[str]
    per_feature: ClassVar[tuple[str, ...]] = ()  # [d_sae] tensors f reads besides W_enc, b_enc
    dense: ClassVar[bool] = False  # f_i depends on every pre-activation (TopK), not on feature i's alone

    def __init__(
        self, sae_id: str, path: Path, cfg: SAEConfig, weights: Mapping[str, torch.Tensor], max_act: torch.Tensor | None
    ):
        self.id, self.path, self.cfg, self.max_act = sae_id, path, cfg, max_act
        self.W_enc = weights["W_enc"].float()  # [d_in, d_sae]
        self.b_enc = weights["b_enc"].float()  # [d_sae]
        self.W_dec = weights["W_dec"].float()  # [d_sae, d_in]
        self.b_dec = weights["b_dec"].float()  # [d_in]
        self.params = {name: weights[name].float() for name in self.per_feature}  # each [d_sae]

    @classmethod
    def check_config(cls, cfg: SAEConfig, path: Path) -> None:
        """Raise SAEFormatError where `cfg` lacks what this architecture needs."""

    @property
    def has_statistics(self) -> bool:
        return self.max_act is not None

    def input_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Factor [T, 1] by which the SAE's input normalisation multiplies each token of x [T, d_in].

        The SAE's reconstruction lives in that normalised space, so a decoder-space delta
        is divided by the same factor to bring it back to the model's residual stream.
        """
        cfg = self.cfg
        if cfg.normalize_activations == "constant_norm_rescale":
            return math.sqrt(cfg.d_in) / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
        if cfg.normalize_activations == "expected_average_only_in":
            return x.new_full((x.shape[0], 1), cfg.norm_scaling_factor, dtype=torch.float32)  # type: ignore[arg-type]
        return x.new_ones((x.shape[0], 1), dtype=torch.float32)

    def sae_in(self, x: torch.Tensor, b_dec: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the encoder's input [T, d_in], the normalisation factor [T, 1]) for residual vectors x.
        `b_dec` is this SAE's b_dec on x's device, where that is not the CPU."""
        scale = self.input_scale(x)
        xin = x.float() * scale
        if self.cfg.apply_b_dec_to_input:
            xin = xin - (self.b_dec if b_dec is None else b_dec)
        return xin, scale

    def activation(self, pre: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """f from pre-activations [..., n] and the `per_feature` tensors of those n features."""
        raise NotImplementedError

    def selected_activations(
        self,
        xin: torch.Tensor,
        project: Callable[[torch.Tensor], torch.Tensor],
        params: Mapping[str, torch.Tensor],
        feature: torch.Tensor,
        dense: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """f [T, K] of K selected features at each token of xin [T, d_in]: the steering hook's path.

        Semantics: pre = project(xin), the selected features' pre-activations [T, K]
        (pre[t, k] = xin[t] . W_enc[:, i] + b_enc[i]), which the hook computes from its tables;
        then `activation` with their `per_feature` values `params`. `params` and `feature` (their
        indices) are [T, K], a row per token, or [K], the same features at every token. `dense`
        holds W_enc (in the model's dtype) and b_enc on the hook's device for a `dense`
        architecture, else nothing.
        """
        return self.activation(project(xin), params)

    def encode_scaled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature activations [T, d_sae], normalisation factor [T, 1]) of residual vectors x [T, d_in]."""
        xin, scale = self.sae_in(x)
        return self.activation(xin @ self.W_enc + self.b_enc, self.params), scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [T, d_sae] of residual vectors x [T, d_in], as SAELens computes them."""
        return self.encode_scaled(x)[0]

    def decode(self, f: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The reconstruction [T, d_in] of activations f [T, d_sae] in the residual stream's own
        units: the input normalisation (factor `scale` [T, 1], from `encode_scaled`) undone."""
        return (f @ self.W_dec + self.b_dec) / scale

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) for residual vectors x [T, d_in]."""
        return self.decode(*self.encode_scaled(x))


ARCHITECTURES: dict[str, type[SAE]] = {}


def register(*names: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: the class loads SAEs whose cfg.json `architecture` is any of `names`."""

    def add(cls: type[SAE]) -> type[SAE]:
        cls.architecture = names[0]
        for name in names:
            ARCHITECTURES[name] = cls
        return cls

    return add


@register("standard", "relu")  # SAELens writes "standard" for ReLU SAEs
class StandardSAE(SAE):
    def activation(self, pre: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.relu(pre)


@register("jumprelu")
class JumpReLUSAE(SAE):
    per_feature = ("threshold",)

    def activation(self, pre: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return pre * (pre > params["threshold"])


@register("topk")
class TopKSAE(SAE):
    dense = True

    @classmethod
    def check_config(cls, cfg: SAEConfig, path: Path) -> None:
        if cfg.k is None or not 0 < cfg.k <= cfg.d_sae:
            raise SAEFormatError(path, "a topk SAE needs a positive integer 'k', at most d_sae")

    def activation(self, pre: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        top = torch.topk(pre, self.cfg.k, dim=-1)  # type: ignore[arg-type]
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def selected_activations(
        self,
        xin: torch.Tensor,
        project: Callable[[torch.Tensor], torch.Tensor],
        params: Mapping[str, torch.Tensor],
        feature: torch.Tensor,
        dense: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        full = (xin.to(dense["W_enc"].dtype) @ dense["W_enc"]).float() + dense["b_enc"]
        return self._in_top_k(full, full.gather(1, feature.expand(len(xin), -1)))

    def _in_top_k(self, full: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """f [T, K] of selected pre-activations `pre`, taken from each token's full row `full` [T, d_sae]."""
        # Membership in the top k is decided on the very numbers it is measured against.
        kth = torch.topk(full, self.cfg.k, dim=-1).values[:, -1:]  # type: ignore[arg-type]
        return torch.relu(pre) * (pre >= kth)


def load_sae(sae_id: str, path: str | Path) -> SAE:
    """Load and check an SAE directory; any problem raises SAEFormatError naming the file."""
    path = Path(path)
    cfg = SAEConfig.from_json(path / CONFIG_FILE)
    cls = ARCHITECTURES[cfg.architecture]
    cls.check_config(cfg, path / CONFIG_FILE)
    weights_path = path / WEIGHTS_FILE
    try:
        weights = load_file(weights_path)
    except Exception as exc:  # safetensors raises several types for a bad file
        raise SAEFormatError(weights_path, f"cannot read SAE weights: {exc}") from exc
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
        **{name: (cfg.d_sae,) for name in cls.per_feature},
    }
    for name, shape in expected.items():
        if name not in weights:
            raise SAEFormatError(weights_path, f"missing tensor {name!r}")
        if tuple(weights[name].shape) != shape:
            raise SAEFormatError(weights_path, f"tensor {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")
        if not torch.isfinite(weights[name]).all():
            raise SAEFormatError(weights_path, f"tensor {name!r} holds NaN or inf")
    return cls(sae_id, path, cfg, weights, _load_max_act(path / STATISTICS_FILE, cfg.d_sae))


def _load_max_act(path: Path, d_sae: int) -> torch.Tensor | None:
    if not path.exists():
        return None
    try:
        stats = load_file(path)
    except Exception as exc:
        raise SAEFormatError(path, f"cannot read feature statistics: {exc}") from exc
    max_act = stats.get("max_act")
    if max_act is None or tuple(max_act.shape) != (d_sae,):
        raise SAEFormatError(path, f"feature statistics need a 'max_act' tensor of shape ({d_sae},)")
    return max_act.float()


def save_sae(
    path: str | Path,
    cfg: dict,
    weights: dict[str, torch.Tensor],
    max_act: torch.Tensor | None = None,
) -> Path:
    """Write an SAE directory in SAELens's format (used by tests and by the SAE builder)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, path / WEIGHTS_FILE)
    if max_act is not None:
        save_file({"max_act": max_act.contiguous()}, path / STATISTICS_FILE)
    return path
