"""How good the SAE is, on held-out text: variance explained, sparsity, and loss recovered.

Loss recovered compares next-token cross-entropy when the layer's output is left alone
(clean), replaced by the SAE's reconstruction (spliced) and replaced by zeros (zero-ablated):
(CE_zero - CE_spliced) / (CE_zero - CE_clean). Attention sinks (every window's first position,
which the SAE is not trained on, and any row over the sink norm: see features.activations) are
left as they are in all three and left out of the variance and L0: one sink's residual outweighs
thousands of ordinary ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from features.activations import windows
from features.sae import SAE

TARGETS = {"fve": (">=", 0.80), "mean_l0": ("<=", 64), "dead_fraction": ("<", 0.10), "loss_recovered": (">=", 0.90)}
DENSE = 0.10  # a feature active on more than 10% of tokens counts as dense


@contextmanager
def _replace_output(layer: torch.nn.Module, replace, sink_norm: float):
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = hidden.clone()
        rest = hidden[:, 1:]
        new[:, 1:] = torch.where(rest.norm(dim=-1, keepdim=True) > sink_norm, rest, replace(rest))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def reconstruct(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    return sae.reconstruct(x.reshape(-1, shape[-1]).float()).reshape(shape).to(x.dtype)


@torch.no_grad()
def evaluate(model_dir: Path, sae: SAE, tokens: np.ndarray, sink_norm: float, max_windows: int = 96) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layer = model.model.layers[sae.cfg.layer]
    batches = windows(tokens)[:max_windows]
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    residual_sq = total_sq = 0.0
    l0 = counted = 0
    captured: list[torch.Tensor] = []

    def capture(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output)[:, 1:].reshape(-1, sae.cfg.d_in).float())

    for start in tqdm(range(0, len(batches), 4), desc="quality (held-out)", unit="batch"):
        ids = torch.from_numpy(batches[start : start + 4].astype(np.int64))
        handle = layer.register_forward_hook(capture)
        try:
            ce["clean"] += _loss(model, ids)
        finally:
            handle.remove()
        x = captured.pop()
        x = x[x.norm(dim=1) <= sink_norm]
        acts = sae.encode(x)
        recon = sae.decode(acts, x)
        residual_sq += (x - recon).pow(2).sum().item()
        total_sq += (x - x.mean(0)).pow(2).sum().item()
        l0 += int((acts > 0).sum())
        counted += len(x)
        with _replace_output(layer, lambda h: reconstruct(sae, h), sink_norm):
            ce["spliced"] += _loss(model, ids)
        with _replace_output(layer, torch.zeros_like, sink_norm):
            ce["zero"] += _loss(model, ids)
    n = -(-len(batches) // 4)
    ce = {k: v / n for k, v in ce.items()}
    return {
        "heldout_tokens": counted,
        "fve": 1 - residual_sq / total_sq,
        "mean_l0": l0 / counted,
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero_ablated": ce["zero"],
        "loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]),
    }


def _loss(model, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids, use_cache=False).logits[:, 1:-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1)).item()


def report(metrics: dict) -> tuple[list[dict], str]:
    """Each target with its measured value and whether it is met, and a Markdown rendering."""
    rows = []
    for name, (op, target) in TARGETS.items():
        value = metrics[name]
        met = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
        rows.append({"metric": name, "value": round(value, 4), "target": f"{op} {target}", "met": met})
    lines = ["| metric | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['value']} | {r['target']} | {'yes' if r['met'] else '**no**'} |" for r in rows]
    return rows, "\n".join(lines)

