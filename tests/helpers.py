"""Small helpers shared by the tests: chat prompts, the server's greedy tokens, and a stand-in model
for the worker's routing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from hypothesis import strategies as st
from torch import nn

from benchmarks.soak import engine_metrics
from features.sae import SAE
from steering import wire
from steering.hook import SMALL_SPAN, SAESteering, TokenIndex
from steering.spec import FeatureIntervention, SteeringLimits, SteeringSpec, resolve
from steering.wire import CONFIG_KEY
from tests.pacing import paced
from tests.reference import Intervention, When, next_token_logprobs, steered_residual
from tests.saes import D_SAE, ROWS, WIDTH


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False).input_ids


def server_tokens(
    client, model: str, prompt_ids: list[int], max_tokens: int, steering: dict | None = None, pace_s: float = 0.0
) -> list[int]:
    """Greedy token ids from the server's completions endpoint, ignoring EOS like the reference.
    `pace_s` (a server started with tests.pacing:Pacer) adds that much to each step it is in."""
    extra = {"ignore_eos": True, "return_token_ids": True, **paced(pace_s), **({"steering": steering} if steering else {})}
    response = client.completions.create(
        model=model, prompt=prompt_ids, max_tokens=max_tokens, temperature=0, extra_body=extra
    )
    choice = response.choices[0]
    assert len(choice.token_ids) == max_tokens
    return choice.token_ids


def served_logprobs(
    client, model: str, prompt_ids: list[int], max_tokens: int, top: int, steering: dict | None = None, pace_s: float = 0.0
) -> tuple[list[int], list[dict[int, float]]]:
    """Greedy token ids and, at each position, the server's top log-probabilities by token id."""
    extra = {"ignore_eos": True, "return_token_ids": True, "return_tokens_as_token_ids": True, **paced(pace_s),
             **({"steering": steering} if steering else {})}  # fmt: skip
    choice = client.completions.create(
        model=model, prompt=prompt_ids, max_tokens=max_tokens, temperature=0, logprobs=top, extra_body=extra
    ).choices[0]
    # with return_tokens_as_token_ids, tokens are named "token_id:<id>"
    return choice.token_ids, [{int(name.split(":")[1]): lp for name, lp in step.items()} for step in choice.logprobs.top_logprobs]


def logprob_gaps(
    hf_model, prompt_ids: list[int], tokens: list[int], top: list[dict[int, float]], interventions: list[Intervention]
) -> tuple[float, float]:
    """Teacher-forced on the served tokens: the largest gap between the served top log-probabilities
    and the transformers reference's, and (steered) the most the steering moves the reference's.
    Also that greedy took the served most likely token at every position."""
    gap = moved = 0.0
    for i, (token, served) in enumerate(zip(tokens, top)):
        context = prompt_ids + tokens[:i]
        expected = next_token_logprobs(hf_model, context, interventions)
        gap = max(gap, *(abs(lp - float(expected[t])) for t, lp in served.items()))
        assert token == max(served, key=served.get), "greedy took the most likely token"
        if interventions:
            moved = max(moved, float((expected - next_token_logprobs(hf_model, context)).abs().max()))
    return gap, moved


T = TypeVar("T")


def in_one_batch(url: str, calls: list[Callable[[], T]]) -> list[T]:
    """Every call made at once, each from its own thread, and their results in order; fails unless
    the engine at `url` had all of them running at the same time.

    Requests sent together can reach the engine steps apart, and one that finished before its
    batchmates arrived says nothing about isolation. vLLM's `vllm:num_requests_running` gauge (the
    scheduler's running requests, set after every engine step) is read from /metrics until the
    last answer is in; it must have reached the number of calls. Nothing else may use the engine
    meanwhile. A missed reading can only fail the check, never pass it.
    """
    done, peak = threading.Event(), [0.0]

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], engine_metrics(url)["vllm:num_requests_running"])

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(call) for call in calls]
            results = [f.result() for f in futures]
    finally:
        done.set()
        sampler.join()
    assert peak[0] >= len(calls), f"the engine ran at most {peak[0]:.0f} of the {len(calls)} requests at once"
    return results


def spec_and_reference(saes: dict[str, SAE], features: list[dict]) -> tuple[dict, list[Intervention]]:
    """A request's steering spec, and the same interventions in raw units for the reference."""
    def raw(value: float, unit: str | None, sae: SAE, index: int) -> float:
        return value * float(sae.max_act[index]) if unit == "max_act" else value

    interventions = []
    for f in features:
        sae, when, tokens = saes[f["sae"]], f.get("when"), f.get("tokens", "all")
        interventions.append(Intervention(
            sae, f["index"], f["mode"], raw(f.get("strength", 0.0), f.get("unit"), sae, f["index"]),
            when=When(saes[when["sae"]], when["index"], raw(when["above"], when.get("unit"), saes[when["sae"]], when["index"]),
                      when.get("scope") == "sticky") if when else None,
            prompt=tokens != "completion", after_n=f.get("after_n", 0), first_n=0 if tokens == "prompt" else f.get("first_n"),
        ))  # fmt: skip
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


def request(sae, index: int | None, prompt_scale: float = 1.0) -> dict | None:
    """A request's SamplingParams.extra_args as the API process writes them: feature `index` of SAE
    "t" added (None: unsteered)."""
    if index is None:
        return None
    spec = SteeringSpec(features=[FeatureIntervention(sae="t", index=index, mode="add", strength=1.0)], prompt_scale=prompt_scale)
    return {CONFIG_KEY: wire.encode(resolve(spec, {"t": sae}, SteeringLimits()))}


# Mixed batches for the hook: up to ROWS - 1 steered requests, each up to WIDTH distinct features
# in any mode, and a weight per token (a request's prompt_scale on its prompt tokens).
feature = st.tuples(
    st.integers(0, D_SAE - 1), st.sampled_from(["add", "clamp", "ablate", "scale"]), st.floats(-5, 5, width=32)
)
mixed_batches = st.lists(
    st.lists(feature, min_size=1, max_size=WIDTH, unique_by=lambda f: f[0]), min_size=1, max_size=ROWS - 1
)
token_weights = st.lists(st.sampled_from([1.0, 0.0, 0.5, 3.0]), min_size=64, max_size=64)


def route(hook: SAESteering, spans: list[tuple[int, int, int]]) -> None:
    """Route a step's tokens as the worker does, in both forms the hook reads: each steered
    request's (row, first token, end token) into the per-token index and into the host-side spans."""
    hook.slot_of_token.zero_()
    for row, start, end in spans:
        hook.slot_of_token[start:end] = row
    hook.routing.spans = spans


def assert_hook_matches_reference(
    sae: SAE, requests: list[list[tuple[int, str, float]]], weights: list[float], seed: int, tokens_per_request: int = 3
) -> None:
    """One batch through the table-fed hook: an unsteered request (row 0), then each of `requests`
    in a row of its own; every token's output must equal the reference's, weighted, by the CPU
    op (`forward` here) in both its ways and by the gathered path."""
    weight_of_token = torch.tensor(weights)
    hook = SAESteering(sae, TokenIndex.zeros(64, weight=weight_of_token), ROWS, WIDTH, torch.float32)
    x = torch.randn(tokens_per_request * (len(requests) + 1), sae.cfg.d_in, generator=torch.Generator().manual_seed(seed)) * 3
    expected, spans = [x[:tokens_per_request]], []
    for r, features in enumerate(requests, start=1):
        spec = SteeringSpec(features=[FeatureIntervention(sae="t", index=i, mode=m, strength=s) for i, m, s in features])
        resolved = resolve(spec, {"t": sae}, SteeringLimits())
        hook.set_row(r, [(f.index, f.c0, f.c1) for f in resolved.features])
        tokens = slice(r * tokens_per_request, (r + 1) * tokens_per_request)
        spans.append((r, tokens.start, tokens.stop))
        xs, w = x[tokens], weight_of_token[tokens, None]
        expected.append(xs + w * (steered_residual(xs, [Intervention(sae, i, m, s) for i, m, s in features]) - xs))
    route(hook, spans)
    steered = {"gathered path": x + hook.delta(x)}
    for small_span in (0, SMALL_SPAN):  # the CPU op with every span a pass of its own; gathered together
        hook.small_span = small_span
        hidden, residual = x * 0.25, x * 0.75  # vLLM's fused layout: stream = hidden + residual
        out_hidden, out_residual = hook(hidden, residual)
        assert out_hidden is hidden and out_residual is residual, "on CPU the op steers in place"
        steered[f"CPU op, small_span={small_span}"] = out_hidden + out_residual
    for path, out in steered.items():
        torch.testing.assert_close(out, torch.cat(expected), rtol=1e-4, atol=1e-4, msg=lambda m, path=path: f"{path}: {m}")
