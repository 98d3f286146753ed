"""Readout: each token's most active SAE features, and listed ones, from the serving forward pass.

Every value is checked against tests/reference.py: a transformers forward over the same tokens
with the same steering hook, the SAE encoded from scratch on the stream after the layer.
"""

from __future__ import annotations

import pytest

from tests.helpers import chat_prompt_ids, spec_and_reference
from tests.reference import feature_activations
from tests.serving import PREFILL_CHUNK

N_TOKENS = 12
PROMPTS = ["Write a short poem about the sea.", "Give me a recipe for dinner."]
CLAMP = [{"sae": "jr", "index": 1, "mode": "clamp", "strength": 4.0, "unit": "max_act"}]
READ = {"sae": "jr", "top_k": 5, "features": [1, 3], "prompt": True}


def _complete(client, model, prompt_ids, readout, steering=None, **kwargs) -> tuple[list[int], dict]:
    extra = {"ignore_eos": True, "return_token_ids": True, "readout": readout, **({"steering": steering} if steering else {})}
    choice = client.completions.create(
        model=model, prompt=prompt_ids, max_tokens=N_TOKENS, temperature=0, extra_body=extra, **kwargs
    ).choices[0]
    return choice.token_ids, choice.model_extra["readout"]


@pytest.mark.parametrize("steered", [False, True])
def test_readout_matches_the_reference(steered, client, model_name, hf_model, tokenizer, saes):
    spec, interventions = spec_and_reference(saes, CLAMP) if steered else (None, [])
    sae, positions, agree, compared = saes["jr"], 0, 0, 0
    for text in PROMPTS:
        prompt = chat_prompt_ids(tokenizer, text)
        generated, readout = _complete(client, model_name, prompt, READ, spec)
        fed = prompt + generated[:-1]  # the last generated token is never fed back in
        assert readout["sae"] == "jr" and readout["layer"] == sae.cfg.layer
        assert [t["position"] for t in readout["tokens"]] == list(range(len(fed))), "every position once, in order"
        after, before = feature_activations(hf_model, fed, sae, interventions)
        for entry, f, f_pre, token in zip(readout["tokens"], after, before, fed):
            assert entry["token"] == tokenizer.decode([token])
            want = f.topk(5)
            got = [t["index"] for t in entry["top"]]
            values = [t["activation"] for t in entry["top"]]
            compared += 1
            # Ties (equal activations, zeros included) may come in either order.
            agree += got == want.indices.tolist() or sorted(values) == sorted(want.values.tolist())
            for t in entry["top"]:
                assert t["activation"] == pytest.approx(float(f[t["index"]]), rel=1e-3, abs=1e-4)
            for index, value in entry["features"].items():
                assert value == pytest.approx(float(f[int(index)]), rel=1e-3, abs=1e-4)
            if steered:
                assert entry["pre_activation"]["1"] == pytest.approx(float(f_pre[1]), rel=1e-3, abs=1e-4)
            else:
                assert "pre_activation" not in entry
        positions += len(fed)
    assert agree >= 0.99 * compared, f"top-5 indices agree at {agree} of {compared} positions"


def test_a_clamped_feature_reads_back_at_its_clamp(client, model_name, tokenizer, saes):
    """Where the feature was active, clamping sets it exactly (this SAE's decoder row is its
    encoder column, unit norm); where it was below its JumpReLU threshold, the clamp adds to its
    pre-activation there, which is under the threshold but not 0."""
    target = 4.0 * float(saes["jr"].max_act[1])
    prompt = chat_prompt_ids(tokenizer, PROMPTS[0])
    _, readout = _complete(client, model_name, prompt, READ, {"features": CLAMP})
    active, read = 0, []
    for entry in readout["tokens"]:
        before, after = entry["pre_activation"]["1"], entry["features"]["1"]
        assert before < 0.5 * target
        if before > 0:
            assert after == pytest.approx(target, rel=1e-4)
            active += 1
        else:
            assert after == pytest.approx(target, rel=0.2)  # the clamp plus a pre-activation under the threshold
        read.append(after)
    assert active, "the feature never fired before the clamp: the exact case went untested"
    assert sorted(read)[len(read) // 2] == pytest.approx(target, rel=0.03)


def test_completion_only_by_default_and_streaming_equals_non_streaming(client, model_name, tokenizer):
    messages = [{"role": "user", "content": PROMPTS[1]}]
    readout = {"sae": "jr", "top_k": 3, "features": [0]}
    extra = {"readout": readout, "ignore_eos": True}
    whole = client.chat.completions.create(model=model_name, messages=messages, max_tokens=N_TOKENS, temperature=0, extra_body=extra)
    prompt_len = whole.usage.prompt_tokens
    tokens = whole.choices[0].model_extra["readout"]["tokens"]
    assert [t["position"] for t in tokens] == list(range(prompt_len, prompt_len + N_TOKENS - 1))
    streamed = []
    for chunk in client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=N_TOKENS, temperature=0, extra_body=extra, stream=True
    ):
        for choice in chunk.choices:
            streamed += (choice.model_extra.get("readout") or {}).get("tokens", [])
    assert streamed == tokens


def test_every_position_once_with_chunked_prefill_and_two_choices(client, model_name, tokenizer):
    """A prompt longer than a prefill chunk, read in pieces, and n = 2 sampled choices that share
    the prompt: each choice's readout holds each of its positions exactly once."""
    prompt = (chat_prompt_ids(tokenizer, "Summarise: " + "the tide comes in and goes out. " * 60))[: PREFILL_CHUNK * 2 + 7]
    assert len(prompt) > PREFILL_CHUNK
    response = client.completions.create(
        model=model_name, prompt=prompt, max_tokens=N_TOKENS, temperature=1.0, n=2, seed=3,
        extra_body={"ignore_eos": True, "return_token_ids": True, "readout": READ},
    )  # fmt: skip
    assert len(response.choices) == 2
    for choice in response.choices:
        positions = [t["position"] for t in choice.model_extra["readout"]["tokens"]]
        assert positions == list(range(len(prompt) + len(choice.token_ids) - 1))


@pytest.mark.parametrize(
    "readout, param",
    [
        ({"sae": "nope"}, "readout.sae"),
        ({"sae": "jr", "top_k": 10**6}, "readout.top_k"),
        ({"sae": "jr", "features": [10**6]}, "readout.features[0]"),
        ({"sae": "jr", "top_k": 0}, "readout"),
    ],
)
def test_bad_readouts_are_refused_naming_the_field(client, model_name, readout, param):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_name, prompt="Hi", max_tokens=2, extra_body={"readout": readout})
    assert caught.value.body["param"] == param
