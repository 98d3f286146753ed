"""Every bad steering input gets a 4xx in OpenAI's error format naming the field; serving goes on."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serving import ADMIN, MAX_STEERED

GOOD = {"sae": "jr", "index": 0, "mode": "add", "strength": 1.0}

# name -> (steering value or full-body override, status, param fragment, message fragment)
CASES = {
    "unknown sae": ({"features": [{**GOOD, "sae": "nope"}]}, 400, "features[0].sae", "loaded SAEs"),
    "index out of range": ({"features": [{**GOOD, "index": 256}]}, 400, "features[0].index", "0 <= index < 256"),
    "negative index": ({"features": [{**GOOD, "index": -1}]}, 400, "index", "greater than or equal to 0"),
    "unknown mode": ({"features": [{**GOOD, "mode": "zap"}]}, 400, "mode", "'add', 'clamp', 'ablate', 'scale' or 'cap'"),
    "unknown unit": ({"features": [{**GOOD, "unit": "volts"}]}, 400, "unit", "'raw', 'max_act', 'norm' or 'calibrated'"),
    "nan strength": ({"features": [{**GOOD, "strength": float("nan")}]}, 400, "strength", "finite"),
    "inf strength": ({"features": [{**GOOD, "strength": float("inf")}]}, 400, "strength", "finite"),
    "string strength": ({"features": [{**GOOD, "strength": "strong"}]}, 400, "strength", "number"),
    "strength over cap": ({"features": [{**GOOD, "strength": 1000.5}]}, 400, "features[0].strength", "at most 1000"),
    "too many interventions": ({"features": [GOOD] * 65}, 400, "steering.features", "at most 64"),
    "max_act without statistics": (
        {"features": [{**GOOD, "sae": "relu", "unit": "max_act"}]}, 400, "features[0].unit", "no feature statistics",
    ),
    "norm unit with clamp": ({"features": [{**GOOD, "mode": "clamp", "unit": "norm"}]}, 400, "unit", "'add' only"),
    "steering not an object": ("yes", 400, "steering", "valid dictionary"),
    "unknown steering key": ({"feature": [GOOD]}, 400, "steering.feature", "Extra inputs"),
    "features not a list": ({"features": GOOD}, 400, "features", "valid list"),
    "condition read after it steers": (
        {"features": [{**GOOD, "when": {"sae": "topk", "index": 0, "above": 0.1}}]}, 400, "features[0].when.sae", "earlier layer",
    ),
    "condition scope unknown": (
        {"features": [{**GOOD, "when": {"sae": "jr", "index": 0, "above": 0.1, "scope": "forever"}}]}, 400, "when.scope", "'token' or 'sticky'",
    ),
    "condition without threshold": ({"features": [{**GOOD, "when": {"sae": "jr", "index": 0}}]}, 400, "when.above", "Field required"),
    "condition index out of range": (
        {"features": [{**GOOD, "when": {"sae": "relu", "index": 999, "above": 0.1}}]}, 400, "features[0].when.index", "0 <= index < 256",
    ),
    "first_n zero": ({"features": [{**GOOD, "first_n": 0}]}, 400, "first_n", "greater than or equal to 1"),
    "after_n past any context": ({"features": [{**GOOD, "after_n": 10**400}]}, 400, "after_n", "less than or equal to 16777216"),
    "empty window": ({"features": [{**GOOD, "first_n": 2, "after_n": 5}]}, 400, "features[0].after_n", "must be below first_n"),
    "prompt window counted in generated tokens": (
        {"features": [{**GOOD, "tokens": "prompt", "after_n": 2}]}, 400, "features[0].tokens", "count generated tokens",
    ),
    "unknown token window": ({"features": [{**GOOD, "tokens": "some"}]}, 400, "tokens", "'all', 'prompt' or 'completion'"),
}  # fmt: skip


def _post(server, model_name: str, steering, **extra) -> httpx.Response:
    body = {"model": model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    if steering is not None:
        body["steering"] = steering
    # json.dumps writes NaN/Infinity literals, which is what a careless client sends.
    return httpx.post(f"{server.url}/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json", **ADMIN}, timeout=120)


def _assert_still_serving(server, model_name: str) -> None:
    ok = _post(server, model_name, {"features": [GOOD]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["steering"]["features"][0]["sae"] == "jr"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_steering_is_refused_clearly(name, server, model_name):
    steering, status, param, message = CASES[name]
    response = _post(server, model_name, steering)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["code"] == status
    assert param in error["param"], error
    assert message in error["message"], error
    _assert_still_serving(server, model_name)


def test_reserved_worker_field_cannot_be_smuggled(server, model_name):
    response = _post(server, model_name, None, vllm_xargs={"steerserve": '[["jr", 0, 1e9, 0]]'})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "vllm_xargs.steerserve"
    _assert_still_serving(server, model_name)


def test_steering_slots_exhausted_is_refused_not_run_unsteered(server, model_name):
    response = _post(server, model_name, {"features": [GOOD]}, n=MAX_STEERED + 1)
    assert response.status_code == 429
    assert response.json()["error"]["param"] == "steering"
    _assert_still_serving(server, model_name)
