"""Malformed SAE files stop start-up with a message naming the file and the problem."""

from __future__ import annotations

import json

import pytest
import torch

from features.formats import load_sae
from features.sae import SAEFormatError
from server.cli import build_parser
from server.startup import StartupError, steering_settings
from tests.saes import make_sae


def _corrupt(path, **changes):
    cfg = json.loads((path / "cfg.json").read_text())
    cfg.update(changes)
    (path / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"hook_name": "blocks.3.attn.hook_z"}, "'blocks.3.attn.hook_z' is an attention output"),
        ({"hook_name": "blocks.3.hook_mlp_out"}, "'blocks.3.hook_mlp_out' is an MLP output"),
        ({"hook_name": "blocks.0.hook_resid_pre"}, "the embeddings"),
        ({"architecture": "gated"}, "architecture 'gated'"),
        ({"d_sae": 21}, "has shape"),
        ({"normalize_activations": "batch_norm"}, "normalize_activations 'batch_norm'"),
    ],
)
def test_bad_config_is_named(tmp_path, changes, problem):
    sae = make_sae(tmp_path, "jumprelu", "none")
    _corrupt(sae.path, **changes)
    with pytest.raises(SAEFormatError, match=problem) as err:
        load_sae("x", sae.path)
    assert str(sae.path) in str(err.value)


def test_truncated_weights_are_named(tmp_path):
    sae = make_sae(tmp_path, "standard", "none")
    weights = sae.path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SAEFormatError, match="cannot read SAE weights") as err:
        load_sae("x", sae.path)
    assert "sae_weights.safetensors" in str(err.value)


def test_nan_weights_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    sae = make_sae(tmp_path, "standard", "none")
    weights = load_file(sae.path / "sae_weights.safetensors")
    weights["W_dec"][0, 0] = torch.nan
    save_file(weights, sae.path / "sae_weights.safetensors")
    with pytest.raises(SAEFormatError, match="NaN"):
        load_sae("x", sae.path)


def test_startup_refuses_sae_that_does_not_fit_the_model(tmp_path, model_dir):
    """The check itself; tests/server/test_cli.py runs it through `steerserve serve`."""
    sae = make_sae(tmp_path, "jumprelu", "none")  # d_in 12, the model's hidden size is 576
    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--sae", f"small={sae.path}"])
    with pytest.raises(StartupError, match="cfg.json: d_in 12 does not match the model's hidden size 576"):
        steering_settings(model_dir, args)
