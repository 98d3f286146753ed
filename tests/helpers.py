"""Small helpers shared by the tests: chat prompts, the server's greedy tokens, and a stand-in model
for the worker's routing."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from features.sae import SAE
from steering.spec import FeatureIntervention, SteeringLimits, SteeringSpec, resolve
from steering.worker import CONFIG_KEY
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


# A stand-in for vLLM's model: a stack of decoder layers in the fused-residual layout.
class Layer(nn.Module):
    def forward(self, h, r):
        return h, r


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(5))
        self.weight = nn.Parameter(torch.zeros(1))


def request(sae, index: int | None, prompt_scale: float = 1.0):
    if index is None:
        return SimpleNamespace(sampling_params=SimpleNamespace(extra_args=None))
    spec = SteeringSpec(features=[FeatureIntervention(sae="t", index=index, mode="add", strength=1.0)], prompt_scale=prompt_scale)
    wire = resolve(spec, {"t": sae}, SteeringLimits()).wire()
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args={CONFIG_KEY: wire}))
