"""The server's greedy tokens equal a plain transformers forward with the same hook.

The server runs compiled, from a warm compile cache (see conftest), with float32 weights.
"""

from __future__ import annotations

import pytest

from tests.helpers import chat_prompt_ids, common_prefix, server_tokens, spec_and_reference
from tests.reference import greedy
from tests.serving import PREFILL_CHUNK

PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Give me a recipe for dinner.",
]
N_TOKENS = 16

CASES = {
    "add": [{"sae": "jr", "index": 0, "mode": "add", "strength": 3.0, "unit": "max_act"}],
    "clamp": [{"sae": "jr", "index": 1, "mode": "clamp", "strength": 4.0, "unit": "max_act"}],
    "ablate": [{"sae": "jr", "index": i, "mode": "ablate"} for i in range(8)],
    "scale": [{"sae": "jr", "index": 0, "mode": "scale", "strength": 5.0}],
    "topk-clamp": [{"sae": "topk", "index": 2, "mode": "clamp", "strength": 4.0, "unit": "max_act"}],
    "normalised-relu-add": [{"sae": "relu", "index": 0, "mode": "add", "strength": 30.0}],
    "normalised-relu-ablate": [{"sae": "relu", "index": i, "mode": "ablate"} for i in range(4)],
    "two-saes-two-layers": [
        {"sae": "jr", "index": 3, "mode": "clamp", "strength": 2.0, "unit": "max_act"},
        {"sae": "topk", "index": 0, "mode": "scale", "strength": 3.0},
    ],
}


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [chat_prompt_ids(tokenizer, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def unsteered_reference(hf_model, prompts) -> list[list[int]]:
    return [greedy(hf_model, ids, N_TOKENS) for ids in prompts]


def test_unsteered_matches_reference(client, model_name, prompts, unsteered_reference):
    for ids, expected in zip(prompts, unsteered_reference):
        assert server_tokens(client, model_name, ids, N_TOKENS) == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_steered_matches_reference(case, client, model_name, hf_model, saes, prompts, unsteered_reference):
    spec, interventions = spec_and_reference(saes, CASES[case])
    expected = [greedy(hf_model, ids, N_TOKENS, interventions) for ids in prompts]
    # The case must move the model, or a server that ignored steering would pass it.
    assert expected != unsteered_reference, f"{case}: steering too weak to test"
    got = [server_tokens(client, model_name, ids, N_TOKENS, spec) for ids in prompts]
    assert got == expected


@pytest.mark.parametrize("prompt_scale", [0.0, 3.0])
def test_prompt_scale_matches_reference(prompt_scale, client, model_name, hf_model, saes, prompts):
    """Steering only what the model writes (0), and the prompt harder than the answer (3)."""
    features = [{"sae": "jr", "index": 1, "mode": "clamp", "strength": 2.0, "unit": "max_act"}]
    spec, interventions = spec_and_reference(saes, features)
    expected = [greedy(hf_model, ids, N_TOKENS, interventions, prompt_scale) for ids in prompts]
    assert expected != [greedy(hf_model, ids, N_TOKENS, interventions) for ids in prompts], "prompt_scale must matter"
    got = [server_tokens(client, model_name, ids, N_TOKENS, {**spec, "prompt_scale": prompt_scale}) for ids in prompts]
    assert got == expected


def test_zero_strength_add_equals_no_steering(client, model_name, prompts):
    zero = {"features": [{"sae": "jr", "index": 0, "mode": "add", "strength": 0.0}]}
    for ids in prompts:
        assert server_tokens(client, model_name, ids, N_TOKENS, zero) == server_tokens(client, model_name, ids, N_TOKENS)


def test_long_generation_chunked_prefill(client, model_name, hf_model, saes, tokenizer):
    """200 tokens from a prompt prefilled in several chunks equal the reference, unsteered and steered.

    Both sides are float32 and greedy. Rounding differences between the server's chunked, paged
    forward and transformers' one could in principle flip a near-tie, but none does in these 200
    tokens, so every one of them must agree: a late difference is a fault, not noise.
    """
    story = " ".join(f"Chapter {i}: the travellers crossed river number {i} and counted {i * 7} stones." for i in range(40))
    ids = chat_prompt_ids(tokenizer, f"Summarise this story.\n{story}")
    assert len(ids) > 2 * PREFILL_CHUNK, "the prompt must span several prefill chunks"
    n = 200
    spec, interventions = spec_and_reference(
        saes, [{"sae": "jr", "index": 1, "mode": "clamp", "strength": 3.0, "unit": "max_act"}]
    )
    plain_ref, steered_ref = greedy(hf_model, ids, n), greedy(hf_model, ids, n, interventions)
    assert steered_ref != plain_ref
    plain_srv = server_tokens(client, model_name, ids, n)
    assert plain_srv == plain_ref, f"unsteered: the server parts after {common_prefix(plain_srv, plain_ref)}"
    steered_srv = server_tokens(client, model_name, ids, n, spec)
    assert steered_srv == steered_ref, f"steered: the server parts after {common_prefix(steered_srv, steered_ref)}"
