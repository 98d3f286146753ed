"""Steering on vLLM's own scale-out: two API processes (`--api-server-count 2`), and two
data-parallel engines (`--data-parallel-size 2`, which vLLM gives two API processes too).

Each API process loads its own presets, policy and steering gate, and each engine its own hooks
and tables. Requests go out on fresh connections, which the kernel spreads over the API
processes' shared port (the chance that 16 all reach one of two is 2^-15); a process that did
not steer, had not reloaded its presets or ignored the policy would fail the request it got.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from benchmarks.soak import engine_metrics
from core.local import Server, stop_server
from tests.helpers import chat_prompt_ids, spec_and_reference
from tests.reference import greedy
from tests.serving import ADMIN, ADMIN_KEY, POLICY, PRESETS, start_side_server

MODEL = "SmolLM2-135M-Instruct"
N_TOKENS = 8
REQUESTS = 16
PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?", "Give me a recipe for dinner."]
STEER = [{"sae": "jr", "index": 1, "mode": "clamp", "strength": 4.0, "unit": "max_act"}]
ADDED = """\
  - name: added-later
    model: SmolLM2-135M-Instruct
    features:
      - {sae: jr, index: 0, mode: add, strength: 3.0, unit: max_act}
"""
LAYOUTS = {
    "api-server-count-2": (["--api-server-count", "2"], {}),
    # one core for each engine's worker: the CPU backend refuses two workers on one NUMA node otherwise
    "data-parallel-2": (["--data-parallel-size", "2"], {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def scaled(request, tmp_path_factory, sae_dirs):
    vllm_flags, env = LAYOUTS[request.param]
    files = tmp_path_factory.mktemp("scale-out-files")
    (files / "presets.yaml").write_text(PRESETS)
    (files / "policy.yaml").write_text(POLICY)
    server = start_side_server(
        tmp_path_factory, sae_dirs, request.param,
        ["--enforce-eager", "--max-num-seqs", str(REQUESTS), "--max-steered-requests", str(REQUESTS),
         "--presets", str(files / "presets.yaml"), "--policy", str(files / "policy.yaml"), "--api-key", ADMIN_KEY,
         "--", *vllm_flags],
        env=env,
    )  # fmt: skip
    yield request.param, server, files
    stop_server(server)


def _post(server: Server, body: dict, key: str = ADMIN_KEY) -> httpx.Response:
    # a new connection per request, so the kernel chooses an API process each time
    return httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def _all_at_once(server: Server, bodies: list[dict], key: str = ADMIN_KEY) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: _post(server, body, key), bodies))


def test_steering_presets_policy_and_metrics_hold_in_every_process(scaled, hf_model, tokenizer, saes):
    layout, server, files = scaled
    spec, interventions = spec_and_reference(saes, STEER)
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    expected = {i: greedy(hf_model, ids, N_TOKENS, interventions) for i, ids in enumerate(prompts)}
    body = {"model": MODEL, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    before = engine_metrics(server.url, ADMIN)

    # Steering: every steered answer equals the transformers reference, whichever process and engine ran it.
    answers = _all_at_once(server, [{**body, "prompt": prompts[i % 3], "steering": spec} for i in range(REQUESTS)])
    for i, response in enumerate(answers):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == expected[i % 3], (layout, i)

    # Metrics: the counters of every API process add up, and no steering slot is left held.
    after = engine_metrics(server.url, ADMIN)
    assert after["steerserve_requests_total"] - before.get("steerserve_requests_total", 0) == REQUESTS
    assert after["steerserve_steered_in_flight"] == 0
    if layout == "data-parallel-2":
        engines = {s.labels.get("engine") for s in _samples(server, "vllm:request_success_total") if s.value > 0}
        assert len(engines) == 2, f"both engines served requests: {engines}"

    # Policy: a presets-only key is refused raw features by every process.
    refused = _all_at_once(server, [{**body, "prompt": "Hi", "steering": spec}] * REQUESTS, key="sk-test-presets")
    assert {r.status_code for r in refused} == {403}

    # Presets: a preset added to the file is served by every process once each has reloaded it.
    (files / "presets.yaml").write_text(PRESETS + ADDED)
    deadline = time.monotonic() + 60
    while not all(r.status_code == 200 for r in _all_at_once(server, [{**body, "model": "added-later", "prompt": "Hi"}] * 4)):
        assert time.monotonic() < deadline, "every API process reloads the presets file within 60 s"
        time.sleep(1)
    again = _all_at_once(server, [{**body, "model": "added-later", "prompt": "Hi"}] * REQUESTS)
    assert [r.status_code for r in again] == [200] * REQUESTS


def _samples(server: Server, name: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", headers=ADMIN, timeout=30).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]
