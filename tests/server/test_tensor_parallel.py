"""Steering under tensor parallelism: every rank steers its replicated residual stream alike.

vLLM's CPU backend runs SmolLM2-135M with 3 ranks (its 9 attention heads rule out 2) once told how
to bind 3 workers to this machine's cores. Each rank installs its own hook and fills its own
tables from the same scheduler output; if one rank steered differently, or not at all, the ranks'
copies of the residual stream would part and the logits would follow neither the steered nor the
unsteered model. Greedy tokens may part from a single-process model after a few tokens (the
all-reduce adds partial sums in another order), so each generated position's log-probabilities
are compared with the transformers reference run on the same context (teacher forcing).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
from openai import OpenAI

from core.local import Server, stop_server
from tests.helpers import chat_prompt_ids, in_one_batch, spec_and_reference
from tests.reference import next_token_logprobs
from tests.serving import start_side_server

MODEL = "SmolLM2-135M-Instruct"
TP = 3
N_TOKENS = 4
TOP = 5
PACE_S = 0.5  # a floor under each engine step; unpaced, no more than one of the four was seen running at once
TOLERANCE = 2e-3  # float32 sums in another order differ by ~1e-5; steering moves log-probabilities by ~1
PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?"]
STEER = [
    {"sae": "jr", "index": 1, "mode": "clamp", "strength": 4.0, "unit": "max_act"},
    {"sae": "topk", "index": 0, "mode": "add", "strength": 3.0, "unit": "max_act"},
]


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory, sae_dirs) -> Server:
    # Three workers on two cores: vLLM's CPU backend binds each worker's OpenMP threads to the cores
    # named here, and refuses more workers than NUMA nodes otherwise.
    server = start_side_server(
        tmp_path_factory, sae_dirs, "tp",
        ["--enforce-eager", "--max-num-seqs", "16",
         "--", "--tensor-parallel-size", str(TP), "--logits-processors", "tests.pacing:Pacer"],
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1|0"},
    )  # fmt: skip
    yield server
    stop_server(server)


def _generate(client: OpenAI, ids: list[int], steering: dict | None) -> tuple[list[int], list[dict[int, float]]]:
    """Greedy token ids and, for each, the top log-probabilities by token id."""
    extra = {"ignore_eos": True, "return_token_ids": True, "return_tokens_as_token_ids": True}
    extra["vllm_xargs"] = {"pace_s": PACE_S}  # tests/pacing.py: requests sent together share steps
    if steering is not None:
        extra["steering"] = steering
    choice = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=N_TOKENS, temperature=0, logprobs=TOP, extra_body=extra
    ).choices[0]
    # with return_tokens_as_token_ids, tokens are named "token_id:<id>"
    top = [{int(name.split(":")[1]): lp for name, lp in step.items()} for step in choice.logprobs.top_logprobs]
    return choice.token_ids, top


def test_every_rank_steers_alike(tp_server, hf_model, tokenizer, saes):
    client = OpenAI(base_url=f"{tp_server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    spec, interventions = spec_and_reference(saes, STEER)
    jobs = [(chat_prompt_ids(tokenizer, p), s) for p in PROMPTS for s in (None, spec)]
    # steered and unsteered in one batch
    answers = in_one_batch(tp_server.url, [partial(_generate, client, *job) for job in jobs])

    moved = 0.0
    for (ids, steering), (tokens, top) in zip(jobs, answers):
        ivs = interventions if steering is not None else []
        for i, (token, served) in enumerate(zip(tokens, top)):
            context = ids + tokens[:i]
            expected = next_token_logprobs(hf_model, context, ivs)
            gaps = {t: abs(lp - float(expected[t])) for t, lp in served.items()}
            assert max(gaps.values()) < TOLERANCE, (steering is not None, i, gaps)
            assert token == max(served, key=served.get)  # greedy took the most likely token
            if steering is not None:
                unsteered = next_token_logprobs(hf_model, context)
                moved = max(moved, float((expected - unsteered).abs().max()))
    assert moved > 0.5 and math.isfinite(moved), "the steering moves the model well past the tolerance"
