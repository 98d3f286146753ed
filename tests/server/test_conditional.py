"""Conditional steering over HTTP: greedy tokens equal a transformers forward applying the same
rule (tests/reference.py), exactly, in float32: a `when` condition with token and with sticky
scope, on the steered SAE and on an earlier layer's, and token windows.

Each condition's threshold is set from the reference's own activations so that it holds at some
positions and not at others, and each case asserts that its gate changes the output: a server
that ignored the gate, or treated sticky as token, would fail."""

from __future__ import annotations

import dataclasses

import httpx
import pytest
import torch

from tests.helpers import chat_prompt_ids, common_prefix, server_tokens, spec_and_reference
from tests.reference import Intervention, feature_activations, greedy
from tests.serving import ADMIN, PREFILL_CHUNK

PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Give me a recipe for dinner.",
]
N_TOKENS = 16


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [chat_prompt_ids(tokenizer, p) for p in PROMPTS]


def threshold_after(hf_model, sae, index: int, prompts: list[list[int]], first: int) -> float:
    """A threshold the feature exceeds nowhere in the prompts' first `first` positions and somewhere
    after them: midway between its largest value there and the next larger value anywhere."""
    acts = [feature_activations(hf_model, ids, sae)[0][:, index] for ids in prompts]
    before = max(float(a[:first].max()) for a in acts)
    later = torch.cat(acts).unique()
    later = later[later > before]
    assert len(later), "the feature must exceed its early values somewhere"
    return (before + float(later[0])) / 2


def ungated(interventions: list[Intervention]) -> list[Intervention]:
    return [dataclasses.replace(iv, when=None, prompt=True, after_n=0, first_n=None) for iv in interventions]


def check(client, model_name, hf_model, prompts, spec, interventions, other: list[Intervention] | None = None) -> None:
    """The server equals the reference under the gates, and the gates matter (so do `other`'s,
    a different rule that must give different tokens)."""
    expected = [greedy(hf_model, ids, N_TOKENS, interventions) for ids in prompts]
    assert expected != [greedy(hf_model, ids, N_TOKENS, ungated(interventions)) for ids in prompts], "the gate must matter"
    if other is not None:
        assert expected != [greedy(hf_model, ids, N_TOKENS, other) for ids in prompts], "the rules must differ"
    got = [server_tokens(client, model_name, ids, N_TOKENS, spec) for ids in prompts]
    for g, e in zip(got, expected):
        assert g == e, f"the server parts from the reference after {common_prefix(g, e)} tokens"


def test_token_scope_on_the_steered_sae(client, model_name, hf_model, saes, prompts):
    """Add jr feature 0 only at tokens where jr feature 3 fires, read before jr steers."""
    when = {"sae": "jr", "index": 3, "above": 0.0}
    spec, interventions = spec_and_reference(saes, [{"sae": "jr", "index": 0, "mode": "add", "strength": 3.0, "unit": "max_act", "when": when}])
    check(client, model_name, hf_model, prompts, spec, interventions)


def test_sticky_scope_from_an_earlier_layer(client, model_name, hf_model, saes, prompts):
    """Add jr feature 0 (layer 15) from the first token where relu feature 1 (layer 8) fired past the
    shared chat template on; the same condition with token scope gives other tokens."""
    shared = min(common_prefix(prompts[0], p) for p in prompts[1:])
    above = threshold_after(hf_model, saes["relu"], 1, prompts, shared)
    feature = {"sae": "jr", "index": 0, "mode": "add", "strength": 3.0, "unit": "max_act",
               "when": {"sae": "relu", "index": 1, "above": above, "scope": "sticky"}}  # fmt: skip
    spec, interventions = spec_and_reference(saes, [feature])
    token_scope = [dataclasses.replace(iv, when=dataclasses.replace(iv.when, sticky=False)) for iv in interventions]
    check(client, model_name, hf_model, prompts, {"features": [feature]}, interventions, other=token_scope)


def test_sticky_state_spans_prefill_chunks(client, model_name, hf_model, saes, tokenizer):
    """A prompt prefilled in several chunks whose sticky condition opens after the first chunk: the
    worker carries it into the later chunks and the generated tokens."""
    story = " ".join(f"Chapter {i}: the travellers crossed river number {i} and counted {i * 7} stones." for i in range(30))
    ids = chat_prompt_ids(tokenizer, f"Summarise this story.\n{story}")
    assert len(ids) > 2 * PREFILL_CHUNK
    # jr feature 31 peaks higher in this prompt's second chunk than anywhere in its first.
    above = threshold_after(hf_model, saes["jr"], 31, [ids], PREFILL_CHUNK)
    feature = {"sae": "jr", "index": 1, "mode": "clamp", "strength": 3.0, "unit": "max_act",
               "when": {"sae": "jr", "index": 31, "above": above, "scope": "sticky"}}  # fmt: skip
    spec, interventions = spec_and_reference(saes, [feature])
    check(client, model_name, hf_model, [ids], spec, interventions)
    # The same request again: the prompt's blocks holding the first firing, now cached by the
    # first, are its own to compute (a sticky request's cache salt is its own), so it opens as before.
    again = server_tokens(client, model_name, ids, N_TOKENS, spec)
    assert again == greedy(hf_model, ids, N_TOKENS, interventions)


def test_sticky_conditions_follow_one_sequence(server, model_name):
    """n > 1 shares a cache salt between choices, which could hide a firing in the prompt: refused."""
    feature = {"sae": "jr", "index": 0, "strength": 1.0, "when": {"sae": "jr", "index": 3, "above": 0.1, "scope": "sticky"}}
    body = {"model": model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 2,
            "steering": {"features": [{"sae": "jr", "index": 1, "strength": 1.0}, feature]}}  # fmt: skip
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=ADMIN, timeout=120)
    assert response.status_code == 400 and response.json()["error"]["param"] == "steering.features[1].when.scope"
    body["n"] = 1
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=ADMIN, timeout=120).status_code == 200


@pytest.mark.parametrize(
    "window",
    [{"tokens": "completion", "after_n": 3, "first_n": 10}, {"tokens": "prompt"}, {"first_n": 4}],
    ids=["completion-after-3-first-10", "prompt-only", "prompt-and-first-4"],
)
def test_token_windows(window, client, model_name, hf_model, saes, prompts):
    spec, interventions = spec_and_reference(saes, [{"sae": "jr", "index": 1, "mode": "clamp", "strength": 4.0, "unit": "max_act", **window}])
    check(client, model_name, hf_model, prompts, spec, interventions)


def test_completion_window_is_prompt_scale_zero(client, model_name, prompts):
    """`tokens: completion` generalises `prompt_scale: 0`: the same tokens."""
    feature = {"sae": "jr", "index": 1, "mode": "clamp", "strength": 4.0, "unit": "max_act"}
    for ids in prompts:
        window = server_tokens(client, model_name, ids, N_TOKENS, {"features": [{**feature, "tokens": "completion"}]})
        assert window == server_tokens(client, model_name, ids, N_TOKENS, {"features": [feature], "prompt_scale": 0.0})


def test_response_echoes_the_gates(client, model_name, saes):
    when = {"sae": "jr", "index": 3, "above": 0.5, "unit": "max_act", "scope": "sticky"}
    reply = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_body={"steering": {"features": [{"sae": "jr", "index": 0, "strength": 1.0, "when": when, "first_n": 5}]}},
    )  # fmt: skip
    echoed = reply.model_extra["steering"]["features"][0]
    assert echoed["when"] == {"sae": "jr", "index": 3, "above": pytest.approx(0.5 * float(saes["jr"].max_act[3])), "unit": "raw", "scope": "sticky"}
    assert echoed["first_n"] == 5 and "tokens" not in echoed
