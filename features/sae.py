"""Sparse autoencoders in SAELens's on-disk format.

A directory holds `cfg.json` and `sae_weights.safetensors` (`W_enc` [d_in, d_sae],
`b_enc` [d_sae], `W_dec` [d_sae, d_in], `b_dec` [d_in], and `threshold` [d_sae]
for JumpReLU), plus optionally `feature_statistics.safetensors` with per-feature
`max_act` [d_sae], which is what `unit: max_act` steers in multiples of.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
STATISTICS_FILE = "feature_statistics.safetensors"
DEFAULT_SAE = Path(__file__).parent / "default"  # the default model's own SAE (python -m features.build)

Architecture = Literal["standard", "jumprelu", "topk"]
Normalization = Literal["none", "constant_norm_rescale", "expected_average_only_in"]

# SAELens writes "standard" for ReLU SAEs; "relu" is accepted as a synonym.
_ARCHITECTURES = {"standard": "standard", "relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}
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
    architecture: Architecture
    d_in: int
    d_sae: int
    hook_name: str
    layer: int
    apply_b_dec_to_input: bool
    normalize_activations: Normalization
    norm_scaling_factor: float | None
    k: int | None

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

        arch = _ARCHITECTURES.get(str(raw.get("architecture", "standard")))
        if arch is None:
            raise SAEFormatError(
                path, f"architecture {raw['architecture']!r} is not one of {sorted(_ARCHITECTURES)}"
            )
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
        k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
        if arch == "topk" and not (isinstance(k, int) and k > 0):
            raise SAEFormatError(path, "a topk SAE needs a positive integer 'k'")
        d_in, d_sae = need("d_in"), need("d_sae")
        if not (isinstance(d_in, int) and isinstance(d_sae, int) and d_in > 0 and d_sae > 0):
            raise SAEFormatError(path, "d_in and d_sae must be positive integers")
        return cls(
            architecture=arch,  # type: ignore[arg-type]
            d_in=d_in,
            d_sae=d_sae,
            hook_name=hook_name,
            layer=layer,
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", False)),
            normalize_activations=norm,
            norm_scaling_factor=float(scaling) if scaling is not None else None,
            k=k if arch == "topk" else None,
        )


@dataclass
class SAE:
    """One loaded SAE; `encode` is the plain full-width encoder, used as the reference."""

    id: str
    path: Path
    cfg: SAEConfig
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None
    max_act: torch.Tensor | None

    @property
    def has_statistics(self) -> bool:
        return self.max_act is not None

    def input_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token factor [T, 1] that maps x into the SAE's normalised input space."""
        return input_scale(x, self.cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [T, d_sae] of residual vectors x [T, d_in], as SAELens computes them."""
        x = x.float() * self.input_scale(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.cfg.architecture == "jumprelu":
            assert self.threshold is not None
            return pre * (pre > self.threshold)
        if self.cfg.architecture == "topk":
            top = torch.topk(pre, self.cfg.k, dim=-1)  # type: ignore[arg-type]
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)


def input_scale(x: torch.Tensor, cfg: SAEConfig) -> torch.Tensor:
    """Factor [T, 1] by which the SAE's input normalisation multiplies each token.

    The SAE's reconstruction lives in that normalised space, so a decoder-space delta
    is divided by the same factor to bring it back to the model's residual stream.
    """
    if cfg.normalize_activations == "constant_norm_rescale":
        return math.sqrt(cfg.d_in) / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    if cfg.normalize_activations == "expected_average_only_in":
        return x.new_full((x.shape[0], 1), cfg.norm_scaling_factor, dtype=torch.float32)  # type: ignore[arg-type]
    return x.new_ones((x.shape[0], 1), dtype=torch.float32)


def load_sae(sae_id: str, path: str | Path) -> SAE:
    """Load and check an SAE directory; any problem raises SAEFormatError naming the file."""
    path = Path(path)
    cfg = SAEConfig.from_json(path / CONFIG_FILE)
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
    }
    if cfg.architecture == "jumprelu":
        expected["threshold"] = (cfg.d_sae,)
    for name, shape in expected.items():
        if name not in weights:
            raise SAEFormatError(weights_path, f"missing tensor {name!r}")
        if tuple(weights[name].shape) != shape:
            raise SAEFormatError(weights_path, f"tensor {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")
        if not torch.isfinite(weights[name]).all():
            raise SAEFormatError(weights_path, f"tensor {name!r} holds NaN or inf")
    return SAE(
        id=sae_id,
        path=path,
        cfg=cfg,
        W_enc=weights["W_enc"].float(),
        b_enc=weights["b_enc"].float(),
        W_dec=weights["W_dec"].float(),
        b_dec=weights["b_dec"].float(),
        threshold=weights["threshold"].float() if "threshold" in weights else None,
        max_act=_load_max_act(path / STATISTICS_FILE, cfg.d_sae),
    )


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
