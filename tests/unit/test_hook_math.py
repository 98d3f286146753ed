"""The table-fed hook against the independent reference, on small tensors (no engine)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steering.hook import SAESteering
from steering.spec import FeatureIntervention, SteeringLimits, SteeringSpec, resolve
from tests.reference import Intervention, steered_residual
from tests.saes import D_SAE, ROWS, WIDTH, D, make_sae

feature = st.tuples(
    st.integers(0, D_SAE - 1), st.sampled_from(["add", "clamp", "ablate", "scale"]), st.floats(-5, 5, width=32)
)


@settings(max_examples=60, deadline=None)
@given(
    architecture=st.sampled_from(["standard", "jumprelu", "topk"]),
    normalize=st.sampled_from(["none", "constant_norm_rescale", "expected_average_only_in"]),
    requests=st.lists(st.lists(feature, min_size=1, max_size=WIDTH), min_size=1, max_size=ROWS - 1),
    seed=st.integers(0, 3),
    weights=st.lists(st.sampled_from([1.0, 0.0, 0.5, 3.0]), min_size=64, max_size=64),
)
def test_hook_matches_reference(tmp_path_factory, architecture, normalize, requests, seed, weights):
    """Each token's weight (a request's prompt_scale on its prompt tokens) multiplies its delta."""
    sae = make_sae(tmp_path_factory.mktemp("sae"), architecture, normalize, seed)
    tokens_per_request = 3
    slot_of_token = torch.zeros(64, dtype=torch.long)
    weight_of_token = torch.tensor(weights)
    hook = SAESteering(sae, slot_of_token, ROWS, WIDTH, torch.float32, weight_of_token)
    x = torch.randn(tokens_per_request * (len(requests) + 1), D, generator=torch.Generator().manual_seed(seed)) * 3
    expected = [x[:tokens_per_request]]  # the first request is unsteered: row 0
    for r, features in enumerate(requests, start=1):
        spec = SteeringSpec(features=[FeatureIntervention(sae="t", index=i, mode=m, strength=s) for i, m, s in features])
        resolved = resolve(spec, {"t": sae}, SteeringLimits())
        hook.set_row(r, [(f.index, f.c0, f.c1) for f in resolved.features])
        slot_of_token[r * tokens_per_request : (r + 1) * tokens_per_request] = r
        xs = x[r * tokens_per_request : (r + 1) * tokens_per_request]
        w = weight_of_token[r * tokens_per_request : (r + 1) * tokens_per_request, None]
        expected.append(xs + w * (steered_residual(xs, [Intervention(sae, i, m, s) for i, m, s in features]) - xs))
    hidden, residual = x * 0.25, x * 0.75  # vLLM's fused layout: stream = hidden + residual
    out_hidden, out_residual = hook(hidden, residual)
    assert out_residual is residual
    torch.testing.assert_close(out_hidden + out_residual, torch.cat(expected), rtol=1e-4, atol=1e-4)


def test_unsteered_rows_are_bit_exact(tmp_path):
    sae = make_sae(tmp_path, "jumprelu", "none")
    hook = SAESteering(sae, torch.zeros(8, dtype=torch.long), ROWS, WIDTH, torch.float32)
    hook.set_row(2, [(3, 0.0, 0.0)])  # add with strength 0
    hook.slot_of_token[4:] = 2
    hidden, residual = torch.randn(8, D), torch.randn(8, D)
    out, _ = hook(hidden, residual)
    assert torch.equal(out, hidden)


def test_reused_row_forgets_previous_request(tmp_path):
    sae = make_sae(tmp_path, "standard", "none")
    hook = SAESteering(sae, torch.ones(4, dtype=torch.long), ROWS, WIDTH, torch.float32)
    hook.set_row(1, [(i, 5.0, 0.0) for i in range(WIDTH)])
    hook.set_row(1, [(7, 2.0, 0.0)])
    x = torch.randn(4, D)
    out, _ = hook(x, torch.zeros_like(x))
    torch.testing.assert_close(out, x + 2.0 * sae.W_dec[7])
