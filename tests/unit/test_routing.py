"""The worker's token -> row routing and row allocator, on a tiny stand-in model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steering.worker import Steerer
from tests.helpers import Model, request
from tests.saes import make_sae


@pytest.fixture
def steerer(tmp_path):
    sae = make_sae(tmp_path, "jumprelu", "none")
    return Steerer(Model(), [("t", str(sae.path))], rows=3, width=4, max_num_tokens=32, device=torch.device("cpu")), sae


def decode(steerer: Steerer, req_ids: list[str], tokens: list[int], requests: dict) -> None:
    """Route a step in which every token is past its prompt."""
    zeros = np.zeros(len(req_ids), dtype=np.int64)
    steerer.route(req_ids, np.array(tokens), requests.get, zeros, zeros)


def test_rows_follow_the_batch_order_and_are_reused(steerer):
    steerer, sae = steerer
    reqs = {"a": request(sae, 1), "b": request(sae, None), "c": request(sae, 2)}
    decode(steerer, ["a", "b", "c"], [2, 3, 1], reqs)
    routed = steerer.index.slot[:6].tolist()
    row_a, row_c = routed[0], routed[5]
    assert routed == [row_a, row_a, 0, 0, 0, row_c] and {row_a, row_c} == {1, 2}
    assert steerer.hooks["t"].feature[row_a, 0] == 1 and steerer.hooks["t"].feature[row_c, 0] == 2
    # reordered batch, fewer tokens: the stale tail is cleared
    decode(steerer, ["c", "a"], [1, 1], reqs)
    assert steerer.index.slot[:8].tolist() == [row_c, row_a, 0, 0, 0, 0, 0, 0]
    steerer.release("a")
    reqs["d"] = request(sae, 3)
    with pytest.raises(RuntimeError, match="exhausted"):
        decode(steerer, ["c", "d", "e"], [1, 1, 1], {**reqs, "e": request(sae, 4)})
    decode(steerer, ["d"], [1], reqs)
    assert steerer.index.slot[0] == row_a, "a finished request's row goes to the next steered one"
    assert steerer.hooks["t"].feature[row_a, 0] == 3


def test_prompt_tokens_carry_their_requests_prompt_scale(steerer):
    """A 5-token prompt prefilled in chunks of 3 beside a decoding request, then decoded: its
    prompt tokens are weighted by its prompt_scale, the token after them by 1; every token carries
    its position minus its prompt's length (what gates count by)."""
    steerer, sae = steerer
    reqs = {"p": request(sae, 1, prompt_scale=0.25), "d": request(sae, 2, prompt_scale=4.0), "u": request(sae, None)}
    steps = [  # (batch, tokens scheduled, tokens computed before, prompt lengths) -> weights
        (["p", "d"], [3, 1], [0, 9], [5, 6], [0.25, 0.25, 0.25, 1.0]),
        (["d", "u", "p"], [1, 2, 3], [10, 0, 3], [6, 8, 5], [1.0, 1.0, 1.0, 0.25, 0.25, 1.0]),
        (["p"], [1], [6], [5], [1.0]),
    ]
    for batch, tokens, computed, prompt, weights in steps:
        steerer.route(batch, np.array(tokens), reqs.get, np.array(computed), np.array(prompt))
        assert steerer.index.weight[: len(weights)].tolist() == weights
        generated = [c - p + i for n, c, p in zip(tokens, computed, prompt) for i in range(n)]
        assert steerer.index.generated[: len(generated)].tolist() == generated


def test_hook_is_installed_on_the_sae_layer(steerer):
    _, sae = steerer
    model = Model()
    fresh = Steerer(model, [("t", str(sae.path))], rows=2, width=1, max_num_tokens=8, device=torch.device("cpu"))
    assert model.layers[sae.cfg.layer].steerserve_0 is fresh.hooks["t"]
    decode(fresh, ["x"], [4], {"x": request(sae, 0)})
    h, r = torch.randn(4, sae.cfg.d_in), torch.zeros(4, sae.cfg.d_in)
    out, _ = model.layers[sae.cfg.layer](h.clone(), r)
    torch.testing.assert_close(out, h + sae.W_dec[0])


def test_tensor_parallel_ranks_steer_identically(tmp_path):
    """Under tensor parallelism every rank holds the full residual after a layer and sees the same
    scheduler output; each rank must then pick the same rows and apply the same delta."""
    sae = make_sae(tmp_path, "topk", "constant_norm_rescale")
    ranks = [Steerer(Model(), [("t", str(sae.path))], 4, 2, 16, torch.device("cpu")) for _ in range(2)]
    reqs = {name: request(sae, i) for i, name in enumerate("abcde")}
    steps = [(["a", "b"], [3, 2], []), (["b", "c", "a"], [1, 4, 1], []), (["c", "d"], [1, 1], ["a", "b"]), (["e", "d", "c"], [2, 1, 1], [])]
    x = torch.randn(16, sae.cfg.d_in)
    for batch, tokens, finished in steps:
        for rank in ranks:
            for req_id in finished:
                rank.release(req_id)
            decode(rank, batch, tokens, reqs)
        assert torch.equal(ranks[0].index.slot, ranks[1].index.slot)
        assert torch.equal(ranks[0].hooks["t"].delta(x), ranks[1].hooks["t"].delta(x))
