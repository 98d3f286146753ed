"""Requests in one batch never see each other's steering, nor each other's steered KV cache."""

from __future__ import annotations

from functools import partial

from tests.helpers import chat_prompt_ids, in_one_batch, server_tokens, spec_and_reference
from tests.reference import greedy

N = 24
# Added to every step of a batch (tests/pacing.py): on a fast machine 24 unpaced tokens took less
# time than one /metrics reading, and in_one_batch could not see the requests meet.
PACE_S = 0.05
STRONG_A = {"features": [{"sae": "jr", "index": 0, "mode": "add", "strength": 4.0, "unit": "max_act"}]}
STRONG_B = {"features": [{"sae": "topk", "index": 1, "mode": "clamp", "strength": 5.0, "unit": "max_act"}]}


def _concurrently(server, client, model_name, jobs: list[tuple[list[int], dict | None]]) -> list[list[int]]:
    """Each job's greedy tokens, the engine running all the jobs in one batch."""
    calls = [partial(server_tokens, client, model_name, ids, N, spec, PACE_S) for ids, spec in jobs]
    return in_one_batch(server.url, calls)


def test_unsteered_request_unaffected_by_steered_batchmates(server, client, model_name, tokenizer):
    prompts = {
        "animal": chat_prompt_ids(tokenizer, "Tell me about your favourite animal."),
        "colour": chat_prompt_ids(tokenizer, "List three colours."),
    }
    specs = {"none": None, "A": STRONG_A, "B": STRONG_B}
    alone = {(p, s): server_tokens(client, model_name, prompts[p], N, specs[s]) for p in prompts for s in specs}
    for p in prompts:  # each steering changes each answer: one run with a batchmate's steering would show
        assert len({tuple(alone[(p, s)]) for s in specs}) == len(specs), f"{p}: steering too weak to test"
    jobs = [("animal", "none"), ("animal", "A"), ("colour", "B"), ("animal", "B"), ("colour", "A"), ("animal", "none")]
    results = _concurrently(server, client, model_name, [(prompts[p], specs[s]) for p, s in jobs])
    assert results == [alone[job] for job in jobs]


def test_different_steering_sharing_a_prompt_prefix(server, client, model_name, tokenizer, hf_model, saes):
    prefix = "You are a careful assistant. " * 20
    a = chat_prompt_ids(tokenizer, prefix + "Describe a city at night.")
    b = chat_prompt_ids(tokenizer, prefix + "Describe a forest at dawn.")
    jobs = [(a, STRONG_A), (b, STRONG_B), (a, None), (b, STRONG_A)]
    results = _concurrently(server, client, model_name, jobs)
    for (ids, spec), got in zip(jobs, results):
        _, interventions = spec_and_reference(saes, spec["features"]) if spec else ({}, [])
        assert got == greedy(hf_model, ids, N, interventions)


def test_steered_kv_cache_never_served_to_unsteered(client, model_name, tokenizer, hf_model):
    """A steered request caches its prompt first; the unsteered one after it must not reuse those blocks."""
    ids = chat_prompt_ids(tokenizer, "Explain how tides work, in detail, for a curious child. " * 6)
    steered_first = server_tokens(client, model_name, ids, N, STRONG_A)
    unsteered_after = server_tokens(client, model_name, ids, N)
    assert unsteered_after == greedy(hf_model, ids, N)
    assert steered_first != unsteered_after
    assert server_tokens(client, model_name, ids, N, STRONG_A) == steered_first
