"""Monitors: a feature watched as the model reads and writes, flagged where it fires, or the
answer stopped there; attached by the request, a preset or the caller's key.

Thresholds are chosen from a readout of the same greedy answer, so each test knows where its
monitor must fire.
"""

from __future__ import annotations

import time
from functools import partial

import httpx
import pytest
from openai import OpenAI

from tests.helpers import chat_prompt_ids, in_one_batch, server_tokens
from tests.pacing import paced
from tests.serving import ADMIN, PRESETS

N = 16
PROMPTS = ["Write a short poem about the sea.", "Give me a recipe for dinner.", "Tell me about your favourite animal."]
PACE_S = 0.05


def _run(client, model, ids, monitors=None, readout=None, pace_s=0.0) -> tuple[list[int], dict]:
    extra = {"ignore_eos": True, "return_token_ids": True, **paced(pace_s),
             **({"monitors": monitors} if monitors else {}), **({"readout": readout} if readout else {})}  # fmt: skip
    choice = client.completions.create(model=model, prompt=ids, max_tokens=N, temperature=0, extra_body=extra).choices[0]
    return choice.token_ids, {"finish_reason": choice.finish_reason, **choice.model_extra}


def _trigger(client, model, ids) -> tuple[list[int], int, int, float]:
    """The greedy answer, and a feature of jr, a completion position a few tokens in and a
    threshold that the feature first crosses there (the clearest such crossing)."""
    tokens, out = _run(client, model, ids, readout={"sae": "jr", "top_k": 0, "features": list(range(64))})
    rows = out["readout"]["tokens"]
    best = None
    for feature in range(64):
        values = [t["features"][str(feature)] for t in rows]
        for n in range(3, len(rows) - 2):
            margin = values[n] - max(values[:n])
            if best is None or margin > best[0]:
                best = (margin, feature, rows[n]["position"], (values[n] + max(values[:n])) / 2)
    margin, feature, position, above = best
    assert margin > 0.5, "no feature crosses a threshold mid-answer clearly"
    return tokens, feature, position, above


def test_flag_reports_the_first_position_the_readout_shows(client, model_name, tokenizer):
    ids = chat_prompt_ids(tokenizer, PROMPTS[0])
    tokens, feature, position, above = _trigger(client, model_name, ids)
    readout = {"sae": "jr", "top_k": 0, "features": [feature], "prompt": True}
    for scope in ("completion", "all", "prompt"):
        monitor = {"sae": "jr", "index": feature, "above": above, "action": "flag", "scope": scope}
        flagged, out = _run(client, model_name, ids, [monitor], readout)
        assert flagged == tokens, "a flag changes nothing"
        in_scope = [t for t in out["readout"]["tokens"] if {"prompt": t["position"] < len(ids),
                    "completion": t["position"] >= len(ids), "all": True}[scope]]  # fmt: skip
        first = next((t for t in in_scope if t["features"][str(feature)] > above), None)
        if first is None:
            assert out["monitors"] == [], scope
            continue
        # The monitor reads one feature, the readout encodes all of them: the same sum in another order.
        value = pytest.approx(first["features"][str(feature)], rel=1e-5)
        assert out["monitors"] == [{"sae": "jr", "index": feature, "position": first["position"], "token": first["token"],
                                    "activation": value, "action": "flag"}], scope  # fmt: skip
        assert out["finish_reason"] == "length"
    assert position >= len(ids)


def test_stop_ends_the_answer_at_the_firing_and_spares_the_batch(server, client, model_name, tokenizer):
    """Each stopped answer is its unmonitored answer up to the token where the feature fired,
    finished as content_filter; unmonitored requests in the same batch answer as alone."""
    cases = []
    for text in PROMPTS:
        ids = chat_prompt_ids(tokenizer, text)
        tokens, feature, position, above = _trigger(client, model_name, ids)
        cases.append((ids, tokens[: position - len(ids) + 1], feature, above))
    bystander = chat_prompt_ids(tokenizer, "List three colours.")
    alone = server_tokens(client, model_name, bystander, N)
    calls = [partial(_run, client, model_name, ids, [{"sae": "jr", "index": feature, "above": above, "action": "stop"}],
                     None, PACE_S) for ids, _, feature, above in cases]  # fmt: skip
    calls += [partial(server_tokens, client, model_name, bystander, N, None, PACE_S)] * 2
    results = in_one_batch(server.url, calls)
    eos = tokenizer.eos_token_id
    for (ids, expected, _, _), (tokens, out) in zip(cases, results[: len(cases)]):
        assert [t for t in tokens if t != eos] == expected, "ends at the token where the feature fired"
        assert out["finish_reason"] == "content_filter"
        assert [m["position"] for m in out["monitors"]] == [len(ids) + len(expected) - 1]
    assert results[len(cases) :] == [alone, alone]


def _names(server) -> list[str]:
    return [p["name"] for p in httpx.get(f"{server.url}/v1/presets", headers=ADMIN).json()["data"]]


def test_guardrails_from_a_preset_and_a_key_cannot_be_removed(server, presets_file, client, model_name, tokenizer):
    ids = chat_prompt_ids(tokenizer, PROMPTS[1])
    tokens, feature, position, above = _trigger(client, model_name, ids)
    guard = f"""\
  - name: test-guard
    model: SmolLM2-135M-Instruct
    monitors: [{{sae: jr, index: {feature}, above: {above}, action: stop}}]
"""
    try:
        presets_file.write_text(PRESETS + guard)
        deadline = time.monotonic() + 30
        while "test-guard" not in _names(server) and time.monotonic() < deadline:
            time.sleep(0.25)
        stopped, out = _run(client, "test-guard", ids, monitors=[])  # asking for no monitors removes none
        assert out["finish_reason"] == "content_filter"
        assert [t for t in stopped if t != tokenizer.eos_token_id] == tokens[: position - len(ids) + 1]
    finally:
        presets_file.write_text(PRESETS)
        deadline = time.monotonic() + 30  # later tests expect the session's presets back
        while "test-guard" in _names(server) and time.monotonic() < deadline:
            time.sleep(0.25)
    assert "test-guard" not in _names(server)
    watched = OpenAI(base_url=f"{server.url}/v1", api_key="sk-test-watched", max_retries=0, timeout=300)
    flagged, out = _run(watched, model_name, ids, monitors=[])
    assert flagged == tokens and [m["action"] for m in out["monitors"]] == ["flag"], "the key's monitor is attached"
    metrics = httpx.get(f"{server.url}/metrics").text
    for source, action in (("preset:test-guard", "stop"), ("policy:watched", "flag")):
        line = f'steerserve_monitor_firings_total{{action="{action}",source="{source}"}}'
        assert line in metrics, line
    assert f"monitor jr/{feature} (preset:test-guard, stop) fired" in server.log_text()


@pytest.mark.parametrize(
    "monitors, param",
    [
        ([{"sae": "nope", "index": 0, "above": 1.0}], "monitors[0].sae"),
        ([{"sae": "jr", "index": 10**6, "above": 1.0}], "monitors[0].index"),
        ([{"sae": "relu", "index": 0, "above": 1.0, "unit": "max_act"}], "monitors[0].unit"),
        ([{"sae": "jr", "index": 0, "above": 1.0}] * 17, "monitors"),
    ],
)
def test_bad_monitors_are_refused_naming_the_field(client, model_name, monitors, param):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_name, prompt="Hi", max_tokens=2, extra_body={"monitors": monitors})
    assert caught.value.body["param"] == param
