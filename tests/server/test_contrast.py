"""POST /v1/vectors/contrast on the session server (inline vectors at layer 15): the streams it
reads through the engine against a transformers forward over the same tokens, a kept vector
steering at once as the reference does, and its refusals.

The session server prefills in chunks of PREFILL_CHUNK tokens, so an example's sum is gathered
over several engine steps.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from features.contrast import contrast
from tests.helpers import chat_prompt_ids
from tests.reference import VectorEdit, greedy
from tests.serving import ADMIN_KEY

LAYER = 15
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
POSITIVE = [
    "The Golden Gate Bridge spans the strait at the mouth of San Francisco Bay.",
    "We walked across the bridge in the fog and watched the ships pass under it.",
    [{"role": "user", "content": "Tell me about the suspension bridge in San Francisco."}],
    [{"role": "user", "content": "Why is the Golden Gate Bridge painted orange?"}],
]
NEGATIVE = [
    "The recipe calls for two cups of flour and a pinch of salt.",
    "She finished her homework before dinner and went to bed early.",
    [{"role": "user", "content": "How do I keep my houseplants alive?"}],
    [{"role": "user", "content": "What is a good name for a cat?"}],
]


def _ids(tokenizer, example) -> list[int]:
    if isinstance(example, str):
        return tokenizer(example).input_ids
    return tokenizer.apply_chat_template(example, add_generation_prompt=True, tokenize=True, return_dict=False)


@torch.no_grad()
def _reference_streams(hf_model, tokenizer, examples: list, positions: str) -> torch.Tensor:
    """Each example's stream after decoder layer LAYER, averaged over the positions past the
    prefix all examples share (and past position 0), or at its last position."""
    ids = [_ids(tokenizer, e) for e in examples]
    shared = next((i for i in range(min(map(len, ids))) if len({x[i] for x in ids}) > 1), min(map(len, ids)))
    out = []
    for x in ids:
        stream = hf_model(torch.tensor([x]), output_hidden_states=True).hidden_states[LAYER + 1][0].float()
        first = min(max(1, shared), len(x) - 1)
        out.append(stream[first:].mean(0) if positions == "mean" else stream[-1])
    return torch.stack(out)


def _derive(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/vectors/contrast", json={"layer": LAYER, **body}, headers=HEADERS, timeout=600)


@pytest.mark.parametrize(("method", "positions"), [("mean_diff", "mean"), ("pca", "last")])
def test_the_vector_is_the_reference_contrast(server, hf_model, tokenizer, method, positions):
    reply = _derive(server, positive=POSITIVE, negative=NEGATIVE, method=method, positions=positions)
    assert reply.status_code == 200, reply.text
    got = reply.json()
    streams = _reference_streams(hf_model, tokenizer, POSITIVE + NEGATIVE, positions)
    want = contrast(streams[:4], streams[4:], method)
    vector = torch.tensor(got["vector"])
    assert vector.shape == want.vector.shape
    assert torch.allclose(vector, want.vector, rtol=1e-3, atol=1e-3 * float(want.vector.abs().max())), (
        f"max difference {float((vector - want.vector).abs().max()):.3g} of {float(want.vector.abs().max()):.3g}"
    )
    assert got["norm"] == pytest.approx(float(want.vector.norm()), rel=1e-3)
    assert got["stream_norm"] == pytest.approx(want.stream_norm, rel=1e-3)
    assert got["accuracy"] == want.accuracy
    assert (got["layer"], got["method"], got["positions"], got["id"]) == (LAYER, method, positions, None)


def test_a_kept_vector_steers_at_once_as_the_reference(server, client, model_name, hf_model, tokenizer):
    reply = _derive(server, positive=POSITIVE, negative=NEGATIVE, name="bridge-test")
    assert reply.status_code == 200, reply.text
    vector = torch.tensor(reply.json()["vector"])
    listed = httpx.get(f"{server.url}/v1/vectors", headers=HEADERS, timeout=60).json()["data"]
    assert {"id": "bridge-test", "source": "contrast", "layers": [LAYER]}.items() <= next(v for v in listed if v["id"] == "bridge-test").items()
    prompt = chat_prompt_ids(tokenizer, "Write a sentence about breakfast.")
    strength = 4.0
    steering = {"features": [{"vector": "bridge-test", "mode": "add", "strength": strength, "unit": "raw"}]}
    steered = client.completions.create(
        model=model_name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"steering": steering, "ignore_eos": True, "return_token_ids": True}
    ).choices[0]  # fmt: skip
    plain = client.completions.create(
        model=model_name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True}
    ).choices[0]  # fmt: skip
    want = greedy(hf_model, prompt, 12, vectors=[VectorEdit(LAYER, vector, "add", strength, "raw")])
    assert steered.token_ids == want
    assert steered.token_ids != plain.token_ids, "the vector changed nothing: the test could not tell it apart"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"layer": 3}, "layer"),  # no inline vectors there
        ({"method": "pca", "negative": NEGATIVE[:3]}, "negative"),  # pca pairs the examples
        ({"positive": ["bridge"]}, "positive[0]"),  # one token: position 0 only, never read
        ({"positive": []}, "positive"),
        ({"name": "no spaces allowed"}, "name"),
        ({"positions": "first"}, "positions"),
        ({"model": "no-such-model"}, "model"),
    ],
)
def test_bad_contrasts_are_refused_naming_the_field(server, client, model_name, body, param):
    reply = _derive(server, **{"positive": POSITIVE, "negative": NEGATIVE, **body})
    assert reply.status_code in (400, 404), reply.text
    error = reply.json()["error"]
    assert param in (error["param"] or "") or param in error["message"], error
    assert client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices


def _derive_as(server, key: str, **body) -> httpx.Response:
    body = {"positive": POSITIVE[:2], "negative": NEGATIVE[:2], "layer": LAYER, **body}
    return httpx.post(f"{server.url}/v1/vectors/contrast", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=600)


def test_keys_that_may_not_derive_or_replace_a_name_are_refused(server):
    assert _derive_as(server, ADMIN_KEY, name="kept-by-admin").status_code == 200
    for key, rule in (("sk-test-presets", "raw_features"), ("sk-test-guarded", "protected")):
        refused = _derive_as(server, key)
        assert refused.status_code == 403 and refused.json()["error"]["param"] == rule, refused.text
    taken = _derive_as(server, "sk-test-capped", name="kept-by-admin")
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "name", taken.text
    assert _derive_as(server, "sk-test-capped", name="kept-by-capped").status_code == 200
    assert _derive_as(server, ADMIN_KEY, name="kept-by-admin").status_code == 200, "its keeper may derive it again"
