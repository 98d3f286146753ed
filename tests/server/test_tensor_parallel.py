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
from tests.helpers import chat_prompt_ids, in_one_batch, logprob_gaps, served_logprobs, spec_and_reference
from tests.reference import feature_activations
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


def test_every_rank_steers_alike(tp_server, hf_model, tokenizer, saes):
    client = OpenAI(base_url=f"{tp_server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    spec, interventions = spec_and_reference(saes, STEER)
    jobs = [(chat_prompt_ids(tokenizer, p), s) for p in PROMPTS for s in (None, spec)]
    # steered and unsteered in one batch; tests/pacing.py makes requests sent together share steps
    calls = [partial(served_logprobs, client, MODEL, ids, N_TOKENS, TOP, s, PACE_S) for ids, s in jobs]
    answers = in_one_batch(tp_server.url, calls)

    moved = 0.0
    for (ids, steering), (tokens, top) in zip(jobs, answers):
        gap, moved_here = logprob_gaps(hf_model, ids, tokens, top, interventions if steering is not None else [])
        assert gap < TOLERANCE, (steering is not None, gap)
        moved = max(moved, moved_here)
    assert moved > 0.5 and math.isfinite(moved), "the steering moves the model well past the tolerance"


def test_the_readout_comes_once_from_the_ranks(tp_server, hf_model, tokenizer, saes):
    """Rank 0 sends the readout: each position once, its values the reference's on the same tokens."""
    client = OpenAI(base_url=f"{tp_server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    spec, interventions = spec_and_reference(saes, STEER)
    ids = chat_prompt_ids(tokenizer, PROMPTS[0])
    choice = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=N_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True, "steering": spec,
                    "readout": {"sae": "jr", "top_k": 3, "features": [1], "prompt": True}},
    ).choices[0]  # fmt: skip
    fed = ids + choice.token_ids[:-1]
    tokens = choice.model_extra["readout"]["tokens"]
    assert [t["position"] for t in tokens] == list(range(len(fed)))
    after, _ = feature_activations(hf_model, fed, saes["jr"], interventions)
    for entry, f in zip(tokens, after):
        assert entry["features"]["1"] == pytest.approx(float(f[1]), rel=1e-3, abs=1e-3)
