"""`steerserve features build`: an SAE that came without statistics gets what the default SAE has."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.activations import CONTEXT, SINK_FACTOR
from features.catalogue import Catalogue
from features.describe import final_norm_scale
from features.formats import description_dir, load_sae
from server.cli import main
from steering.spec import FeatureIntervention, SteeringLimits, SteeringSpec, resolve
from tests.sae_formats import goodfire
from tests.saes import TEXTS, residuals

LAYER = 15


def test_build_gives_a_goodfire_sae_statistics_and_a_catalogue(tmp_path, hf_model, tokenizer, model_dir):
    written = goodfire(tmp_path / "sae", residuals(hf_model, tokenizer, LAYER), LAYER)
    with pytest.raises(Exception, match="no feature statistics"):
        resolve(SteeringSpec(features=[FeatureIntervention(sae="g", index=0, strength=1.0, unit="max_act")]), {"g": load_sae("g", written.source)}, SteeringLimits())
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TEXTS * 12))
    with pytest.raises(SystemExit) as done:
        main(["features", "build", "--sae", f"g={written.source}", "--model", str(model_dir), "--text", str(text),
              "--max-tokens", str(2 * CONTEXT), "--work", str(tmp_path / "work")])  # fmt: skip
    assert done.value.code == 0
    sae = load_sae("g", written.source)
    assert sae.has_statistics

    # Independently: the residuals of the same two windows (each window's first token left out, as
    # the build's cache does), attention sinks left out, through Goodfire's own formula.
    ids = tokenizer(" ".join(TEXTS * 12), add_special_tokens=False).input_ids[: 2 * CONTEXT]
    with torch.no_grad():
        hidden = hf_model(torch.tensor(ids).view(2, CONTEXT), output_hidden_states=True).hidden_states[LAYER + 1][:, 1:]
    x = hidden.reshape(-1, hidden.shape[-1]).float()
    x = x[x.norm(dim=1) <= SINK_FACTOR * x.norm(dim=1).median()]
    expected = written.encode(x).max(0).values
    assert (expected > 0).sum() > 10, "the features must fire on the text"
    # The build caches residuals in bfloat16 (features/activations.py): values agree to its rounding.
    torch.testing.assert_close(sae.max_act, expected, rtol=2e-2, atol=2e-2)

    catalogue = Catalogue.load(description_dir(sae.path))
    assert catalogue is not None and len(catalogue.cards) == sae.cfg.d_sae
    assert np.isclose(catalogue.card(0)["max_act"], float(sae.max_act[0]), rtol=1e-3)
    steering = resolve(SteeringSpec(features=[FeatureIntervention(sae="g", index=0, strength=2.0, unit="max_act")]), {"g": sae}, SteeringLimits())
    assert steering.features[0].strength == pytest.approx(2.0 * float(sae.max_act[0]))


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2"])
def test_logit_lens_reads_the_final_norm_as_the_model_applies_it(family):
    """Gemma's RMSNorm multiplies by 1 + weight, Llama's by weight: the scale the logit lens uses
    must give what the model's own final norm computes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)  # fmt: skip
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        lm.model.norm.weight.normal_()
    x = torch.randn(5, 16)
    norm = lm.model.norm
    eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps  # Llama's name, Gemma's
    normalised = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(norm(x), normalised * final_norm_scale(lm), rtol=1e-4, atol=1e-5)
