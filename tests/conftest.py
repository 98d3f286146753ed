"""Fixtures both tiers use: the default model (and its transformers twin, the reference) and test
SAEs whose features really fire on it. The server tier's own fixtures are in tests/server/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.local import ensure_default_model
from features.formats import load_sae
from features.sae import SAE
from tests.saes import build_sae, residuals

# id -> (layer, architecture, input normalisation, has statistics)
TEST_SAES = {
    "jr": (15, "jumprelu", "none", True),
    "topk": (20, "topk", "none", True),
    "relu": (8, "standard", "constant_norm_rescale", False),
    "lab": (15, "jumprelu", "none", False),  # labelled through the served model (tests/server/test_labelling.py)
}


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def sae_dirs(tmp_path_factory, hf_model, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saes")
    dirs = {}
    for sae_id, (layer, arch, norm, stats) in TEST_SAES.items():
        x = residuals(hf_model, tokenizer, layer)
        dirs[sae_id] = build_sae(root / sae_id, x, layer, arch, normalize=norm, statistics=stats)
    return dirs


@pytest.fixture(scope="session")
def saes(sae_dirs) -> dict[str, SAE]:
    return {sae_id: load_sae(sae_id, path) for sae_id, path in sae_dirs.items()}
