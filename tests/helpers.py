"""Small helpers shared by the server tests."""

from __future__ import annotations

from features.sae import SAE
from tests.reference import Intervention


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False).input_ids


def server_tokens(client, model: str, prompt_ids: list[int], max_tokens: int, steering: dict | None = None) -> list[int]:
    """Greedy token ids from the server's completions endpoint, ignoring EOS like the reference."""
    extra = {"ignore_eos": True, "return_token_ids": True}
    if steering is not None:
        extra["steering"] = steering
    response = client.completions.create(
        model=model, prompt=prompt_ids, max_tokens=max_tokens, temperature=0, extra_body=extra
    )
    choice = response.choices[0]
    assert len(choice.token_ids) == max_tokens
    return choice.token_ids


def spec_and_reference(saes: dict[str, SAE], features: list[dict]) -> tuple[dict, list[Intervention]]:
    """A request's steering spec, and the same interventions in raw units for the reference."""
    interventions = []
    for f in features:
        sae = saes[f["sae"]]
        strength = f.get("strength", 0.0)
        if f.get("unit") == "max_act":
            strength *= float(sae.max_act[f["index"]])
        interventions.append(Intervention(sae, f["index"], f["mode"], strength))
    return {"features": features}, interventions


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
