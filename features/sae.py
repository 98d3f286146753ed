"""Sparse autoencoders: the SAE math's one home.

An SAE is held in one canonical form, whatever file it came from (features/formats.py reads the
formats people publish into it): `W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_in],
`b_dec` [d_in], an architecture's own per-feature tensors (JumpReLU's `threshold` [d_sae]), an
`SAEConfig`, and optionally per-feature `max_act` [d_sae], which `unit: max_act` steers in
multiples of. Its encode is SAELens's: normalise the input, subtract b_dec where the SAE says so,
pre = xin @ W_enc + b_enc, then the architecture's activation f.

Each architecture is one small class registered by name (as in SAELens): the base class holds
the shared input pipeline, pre-activation and decoding; a subclass gives its activation f. The
steering hook, `SAE.encode`, the quality report and the catalogue all go through these classes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from features.calibration import Calibrations

Normalization = Literal["none", "constant_norm_rescale", "expected_average_only_in", "layer_norm"]
NORMALIZATIONS: tuple[Normalization, ...] = ("none", "constant_norm_rescale", "expected_average_only_in", "layer_norm")
LAYER_NORM_EPS = 1e-5  # SAELens's and OpenAI's: x centred, divided by (its std + eps)
# Names of the residual stream after decoder layer L (TransformerLens, Hugging Face, sparsify), and
# before it (TransformerLens's resid_pre: the output of layer L - 1).
_RESID_POST = (
    re.compile(r"^blocks\.(\d+)\.hook_resid_post$"),
    re.compile(r"^model\.layers\.(\d+)(\.output)?$"),
    re.compile(r"^layers\.(\d+)$"),
)
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")
# What a hook name we cannot steer denotes, for the refusal.
_OTHER_HOOKS = (
    (re.compile(r"hook_z$|attn|hook_q$|hook_k$|hook_v$|hook_pattern"), "an attention output"),
    (re.compile(r"mlp|hook_post$|hook_pre$"), "an MLP output"),
    (re.compile(r"resid_mid"), "the residual stream between attention and MLP"),
)


class SAEFormatError(ValueError):
    """A file on disk is not a usable SAE; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")


def layer_of_hook(hook_name: str) -> int:
    """The decoder layer whose output `hook_name` denotes; ValueError, saying why, if none does."""
    for pattern in _RESID_POST:
        if match := pattern.match(hook_name):
            return int(match.group(1))
    if match := _RESID_PRE.match(hook_name):
        if int(match.group(1)) == 0:
            raise ValueError(f"hook {hook_name!r} is the embeddings, before any decoder layer; steerserve steers layer outputs")
        return int(match.group(1)) - 1
    what = next((name for pattern, name in _OTHER_HOOKS if pattern.search(hook_name)), "not a residual-stream hook")
    raise ValueError(
        f"hook {hook_name!r} is {what}: steerserve steers the residual stream after a decoder layer, named "
        "'blocks.<L>.hook_resid_post', 'blocks.<L>.hook_resid_pre' (layer L-1's output), 'model.layers.<L>[.output]' "
        "or 'layers.<L>'"
    )


@dataclass(frozen=True)
class SAEConfig:
    architecture: str  # a name in ARCHITECTURES
    d_in: int
    d_sae: int
    hook_name: str
    layer: int  # the decoder layer whose output the SAE reads and steers
    apply_b_dec_to_input: bool
    normalize_activations: Normalization
    norm_scaling_factor: float | None  # expected_average_only_in's factor
    k: int | None  # TopK's k


class SAE:
    """One loaded SAE. The base class holds what every architecture shares: the input pipeline
    (normalise, then subtract b_dec where the SAE says so; SAELens's `process_sae_in`), the
    pre-activation and decoding. A subclass is one architecture: its activation f.
    """

    architecture: ClassVar[str]
    per_feature: ClassVar[tuple[str, ...]] = ()  # [d_sae] tensors f reads besides W_enc, b_enc
    dense: ClassVar[bool] = False  # f_i depends on every pre-activation (TopK), not on feature i's alone

    def __init__(
        self,
        sae_id: str,
        path: Path,
        cfg: SAEConfig,
        weights: Mapping[str, torch.Tensor],
        max_act: torch.Tensor | None,
        source: str | None = None,
        files: tuple[Path, ...] = (),
        calibrations: Calibrations | None = None,
    ):
        """`path`: where it was read from; `source`: what loads it again (features/formats.py's
        `FORMAT:PATH[@LAYER]`); `files`: the files its values came from; `calibrations`: its
        features' calibrated settings (what `unit: calibrated` reads)."""
        self.id, self.path, self.cfg, self.max_act = sae_id, path, cfg, max_act
        self.calibrations = calibrations
        self.source, self.files = source or str(path), files
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

    def input_norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift [T, 1], scale [T, 1]): the SAE's input normalisation maps each token of x [T, d_in]
        to (x - shift) * scale.

        The SAE's reconstruction lives in that normalised space, so a decoder-space delta is
        divided by the same scale to bring it back to the model's residual stream (a shift cancels
        in a delta).
        """
        cfg, x = self.cfg, x.float()
        shift = x.new_zeros((x.shape[0], 1))
        if cfg.normalize_activations == "constant_norm_rescale":
            return shift, math.sqrt(cfg.d_in) / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        if cfg.normalize_activations == "expected_average_only_in":
            return shift, x.new_full((x.shape[0], 1), cfg.norm_scaling_factor)  # type: ignore[arg-type]
        if cfg.normalize_activations == "layer_norm":
            shift = x.mean(dim=-1, keepdim=True)
            return shift, 1 / ((x - shift).std(dim=-1, keepdim=True) + LAYER_NORM_EPS)
        return shift, x.new_ones((x.shape[0], 1))

    def sae_in(self, x: torch.Tensor, b_dec: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the encoder's input [T, d_in], the normalisation's scale [T, 1]) for residual vectors x.
        `b_dec` is this SAE's b_dec on x's device, where that is not the CPU."""
        shift, scale = self.input_norm(x)
        xin = (x.float() - shift) * scale
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

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [T, d_sae] of residual vectors x [T, d_in], as SAELens computes them."""
        xin, _ = self.sae_in(x)
        return self.activation(xin @ self.W_enc + self.b_enc, self.params)

    def decode(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction [T, d_in], in the residual stream's own units, from activations f
        [T, d_sae] of residual vectors x [T, d_in]: the input normalisation undone."""
        shift, scale = self.input_norm(x)
        return (f @ self.W_dec + self.b_dec) / scale + shift

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) for residual vectors x [T, d_in]."""
        return self.decode(self.encode(x), x)


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
        return torch.relu(pre) * (pre > params["threshold"])


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
