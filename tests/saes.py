"""Test SAEs, written in SAELens format, whose features really fire on the default model.

Random directions barely touch a real residual stream, so ablating one would change
nothing and a test of `ablate` could not fail. Here the first features are the top
principal directions of real activations at the layer (largest variance, so steering
them moves the output), the rest random; thresholds sit at the median pre-activation.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from features.formats import load_sae, save_sae
from features.sae import SAE

TEXTS = [
    "The Golden Gate Bridge is a suspension bridge spanning the strait in San Francisco.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Roses are red, violets are blue, sugar is sweet and so are you.",
    "The mitochondria is the powerhouse of the cell, producing energy for the body.",
    "In 1969, astronauts landed on the Moon and walked on its dusty surface.",
    "Preheat the oven to 180 degrees and mix the flour, sugar and eggs in a bowl.",
]


@torch.no_grad()
def residuals(model, tokenizer, layer: int) -> torch.Tensor:
    """Residual stream after decoder layer `layer` over TEXTS, as [tokens, d]."""
    rows = []
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        hidden = model(ids, output_hidden_states=True).hidden_states[layer + 1]  # [0] is the embeddings
        rows.append(hidden[0])
    return torch.cat(rows).float()


def build_sae(
    path: Path,
    x: torch.Tensor,
    layer: int,
    architecture: str,
    normalize: str = "none",
    d_sae: int = 256,
    k: int = 16,
    statistics: bool = True,
    seed: int = 0,
) -> Path:
    d = x.shape[1]
    if normalize == "constant_norm_rescale":
        x = x * math.sqrt(d) / x.norm(dim=-1, keepdim=True)
    mean = x.mean(0)
    centered = x - mean
    g = torch.Generator().manual_seed(seed)
    n_pc = min(64, x.shape[0] - 1)
    principal = torch.linalg.svd(centered, full_matrices=False).Vh[:n_pc]
    rand = torch.randn(d_sae - n_pc, d, generator=g)
    dirs = torch.cat([principal, rand / rand.norm(dim=1, keepdim=True)])
    W_enc = dirs.T.contiguous()
    pre = centered @ W_enc
    cfg = {
        "architecture": architecture,
        "d_in": d,
        "d_sae": d_sae,
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "apply_b_dec_to_input": True,
        "normalize_activations": normalize,
        "dtype": "float32",
    }
    weights = {"W_enc": W_enc, "b_enc": torch.zeros(d_sae), "W_dec": dirs.clone(), "b_dec": mean}
    if architecture == "jumprelu":
        weights["threshold"] = pre.median(0).values.clamp_min(1e-3)
    if architecture == "topk":
        cfg["k"] = k
    max_act = pre.clamp_min(0).max(0).values if statistics else None
    return save_sae(path, cfg, weights, max_act=max_act)


# Tiny random SAEs for the unit tests: the shapes of the hook's tables in miniature.
D, D_SAE, ROWS, WIDTH = 12, 20, 5, 4


def make_sae(tmp_path, architecture: str, normalize: str, seed: int = 0, d_in: int = D, layer: int = 3, sae_id: str = "t") -> SAE:
    """A random SAE, by default "t" at layer 3 (`d_in` 576 fits the default model, for tests of its settings)."""
    g = torch.Generator().manual_seed(seed)
    cfg = {
        "architecture": architecture, "d_in": d_in, "d_sae": D_SAE, "hook_name": f"blocks.{layer}.hook_resid_post",
        "apply_b_dec_to_input": True, "normalize_activations": normalize, "k": 5, "norm_scaling_factor": 0.7,
    }  # fmt: skip
    weights = {
        "W_enc": torch.randn(d_in, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
        "W_dec": torch.randn(D_SAE, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
        "threshold": torch.rand(D_SAE, generator=g),
    }
    path = tmp_path / f"{architecture}-{normalize}-{seed}-{d_in}-{layer}"
    return load_sae(sae_id, save_sae(path, cfg, weights, torch.rand(D_SAE) + 1))
