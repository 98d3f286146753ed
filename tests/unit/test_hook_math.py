"""The table-fed hook against the independent reference, on small tensors (no engine)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steering.hook import MAX_DELTA, SAESteering
from tests.helpers import assert_hook_matches_reference, mixed_batches, token_weights
from tests.saes import ROWS, WIDTH, D, make_sae


@settings(max_examples=60, deadline=None)
@given(
    architecture=st.sampled_from(["standard", "jumprelu", "topk"]),
    normalize=st.sampled_from(["none", "constant_norm_rescale", "expected_average_only_in"]),
    requests=mixed_batches,
    seed=st.integers(0, 3),
    weights=token_weights,
)
def test_hook_matches_reference(tmp_path_factory, architecture, normalize, requests, seed, weights):
    """Each token's weight (a request's prompt_scale on its prompt tokens) multiplies its delta."""
    sae = make_sae(tmp_path_factory.mktemp("sae"), architecture, normalize, seed)
    assert_hook_matches_reference(sae, requests, weights, seed)


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


def test_guard_keeps_every_delta_finite_and_bounded(tmp_path):
    """The hook's guard alone, on small tensors: extreme rows come out finite and bounded,
    every other row exactly as without them."""
    sae = make_sae(tmp_path, "jumprelu", "none")
    slots = torch.tensor([0, 1, 2, 3, 4, 4])
    hook = SAESteering(sae, slots, 5, 4, torch.float32)
    hook.set_row(1, [(0, float("inf"), 0.0)])  # add, inf
    hook.set_row(2, [(1, 3e38, -1.0), (2, 3e38, -1.0), (3, -3e38, 0.0)])  # sums past float32
    hook.set_row(3, [(4, 0.0, 1e39)])  # scale mode: inf * f, NaN where f = 0
    hook.set_row(4, [(5, 2.0, 0.0)])  # ordinary
    hidden, residual = torch.randn(6, D), torch.randn(6, D)
    out, _ = hook(hidden, residual)
    assert torch.isfinite(out).all()
    assert (out - hidden)[1:4].abs().amax() <= MAX_DELTA
    assert torch.equal(out[0], hidden[0])
    for row in (1, 2, 3):
        hook.set_row(row, [])
    calm, _ = hook(hidden, residual)
    assert torch.equal(out[[0, 4, 5]], calm[[0, 4, 5]])
