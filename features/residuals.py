"""Residual-stream activations of the model at one layer, read with plain transformers.

The model is cut after the layer that is read, so the layers above it cost nothing. Used to
collect the SAE's training activations and to search features by text in the server.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class ResidualReader:
    """resid_post of decoder layer `layer` (the layer's output, residual included)."""

    def __init__(self, model_dir: str | Path, layer: int, dtype: torch.dtype = torch.bfloat16):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        model.model.layers = nn.ModuleList(model.model.layers[: layer + 1])
        model.model.norm = nn.Identity()  # hidden_states[-1] is then the raw output of `layer`
        self.base = model.model
        self.layer = layer

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, d_model] residuals, in the reader's dtype."""
        return self.base(input_ids=input_ids, use_cache=False).last_hidden_state

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids
