"""bfloat16, which `steerserve serve` (like vLLM) serves by default wherever the CPU or GPU has it
natively. Every other test server runs float32 (this machine has no native bfloat16, and the
exact-equality tests need float32's batch invariance), so this one checks the users' dtype
against the float32 transformers reference: at each generated position, teacher-forced on the
served tokens, the served top-5 log-probabilities, steered and unsteered, are within TOLERANCE of
the reference's, and the steering moves the reference's far beyond it.
"""

from __future__ import annotations

import math

import pytest
from openai import OpenAI

from core.local import Server, stop_server
from tests.helpers import chat_prompt_ids, logprob_gaps, served_logprobs, spec_and_reference
from tests.serving import start_side_server

MODEL = "SmolLM2-135M-Instruct"
N_TOKENS = 4
TOP = 5
# bfloat16 keeps 8 bits of mantissa: each weight and activation is off by up to 0.4%, and over
# 30 layers log-probabilities drift by a few tenths of a nat; steering moves them by several nats.
TOLERANCE = 0.5
STEER = [
    {"sae": "jr", "index": 1, "mode": "clamp", "strength": 4.0, "unit": "max_act"},
    {"sae": "topk", "index": 0, "mode": "add", "strength": 3.0, "unit": "max_act"},
]
PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def bf16_server(tmp_path_factory, sae_dirs) -> Server:
    server = start_side_server(tmp_path_factory, sae_dirs, "bf16", ["--dtype", "bfloat16", "--max-num-seqs", "8"])
    yield server
    stop_server(server)


def test_bfloat16_follows_the_reference_steered_and_unsteered(bf16_server, hf_model, tokenizer, saes):
    client = OpenAI(base_url=f"{bf16_server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    spec, interventions = spec_and_reference(saes, STEER)
    moved, gaps = 0.0, []
    for prompt in PROMPTS:
        ids = chat_prompt_ids(tokenizer, prompt)
        for steering, ivs in ((None, []), (spec, interventions)):
            tokens, top = served_logprobs(client, MODEL, ids, N_TOKENS, TOP, steering)
            gap, moved_here = logprob_gaps(hf_model, ids, tokens, top, ivs)
            gaps.append(gap)
            moved = max(moved, moved_here)
    print(f"bfloat16 gaps {gaps}, steering moved {moved}")
    assert max(gaps) < TOLERANCE, gaps
    assert math.isfinite(moved) and moved > 2 * TOLERANCE, f"the steering moves the model far past the tolerance: {moved}"
