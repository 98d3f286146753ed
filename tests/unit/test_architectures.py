"""A new SAE architecture is one class: registered here in a few lines, it loads, runs through the
steering hook's math and is checked against the reference, with no other file changed."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from features.sae import SAE, register
from tests.helpers import assert_hook_matches_reference, mixed_batches, token_weights
from tests.saes import make_sae


@register("relu_squared")
class ReLUSquaredSAE(SAE):
    def activation(self, pre: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.relu(pre) ** 2


def test_toy_architecture_loads_and_encodes(tmp_path):
    sae = make_sae(tmp_path, "relu_squared", "none")
    assert isinstance(sae, ReLUSquaredSAE) and sae.architecture == "relu_squared"
    x = torch.randn(5, sae.cfg.d_in)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # the fixture applies b_dec to the input
    torch.testing.assert_close(sae.encode(x), pre.clamp_min(0) ** 2)


@settings(max_examples=20, deadline=None)
@given(
    normalize=st.sampled_from(["none", "constant_norm_rescale", "expected_average_only_in"]),
    requests=mixed_batches,
    seed=st.integers(0, 3),
    weights=token_weights,
)
def test_toy_architecture_steers_as_the_reference(tmp_path_factory, normalize, requests, seed, weights):
    sae = make_sae(tmp_path_factory.mktemp("sae"), "relu_squared", normalize, seed)
    assert_hook_matches_reference(sae, requests, weights, seed)
