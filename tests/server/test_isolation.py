"""Requests in one batch never see each other's steering, nor each other's steered KV cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.helpers import chat_prompt_ids, server_tokens, spec_and_reference
from tests.reference import greedy

N = 24
STRONG_A = {"features": [{"sae": "jr", "index": 0, "mode": "add", "strength": 4.0, "unit": "max_act"}]}
STRONG_B = {"features": [{"sae": "topk", "index": 1, "mode": "clamp", "strength": 5.0, "unit": "max_act"}]}


def _concurrently(client, model_name, jobs: list[tuple[list[int], dict | None]]) -> list[list[int]]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(server_tokens, client, model_name, ids, N, spec) for ids, spec in jobs]
        return [f.result() for f in futures]


def test_unsteered_request_unaffected_by_steered_batchmates(client, model_name, tokenizer):
    ids = chat_prompt_ids(tokenizer, "Tell me about your favourite animal.")
    other = chat_prompt_ids(tokenizer, "List three colours.")
    alone = server_tokens(client, model_name, ids, N)
    steered_alone = server_tokens(client, model_name, ids, N, STRONG_A)
    assert steered_alone != alone
    jobs = [(ids, None), (ids, STRONG_A), (other, STRONG_B), (ids, STRONG_B), (other, STRONG_A), (ids, None)]
    results = _concurrently(client, model_name, jobs)
    assert results[0] == alone and results[5] == alone
    assert results[1] == steered_alone
    assert results[3] == server_tokens(client, model_name, ids, N, STRONG_B)


def test_different_steering_sharing_a_prompt_prefix(client, model_name, tokenizer, hf_model, saes):
    prefix = "You are a careful assistant. " * 20
    a = chat_prompt_ids(tokenizer, prefix + "Describe a city at night.")
    b = chat_prompt_ids(tokenizer, prefix + "Describe a forest at dawn.")
    results = _concurrently(client, model_name, [(a, STRONG_A), (b, STRONG_B), (a, None), (b, STRONG_A)])
    for (ids, spec), got in zip([(a, STRONG_A), (b, STRONG_B), (a, None), (b, STRONG_A)], results):
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
