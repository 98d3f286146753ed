"""The load test knows when steering was skipped. Plain vLLM accepts the `steering` field and
ignores it, as an engine that silently skips steering would: against it the load test's steering
checks fail; against steerserve they hold. A benchmark run that fails them exits non-zero."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.harness import MODEL, PROMPTS, steered_outputs_differing
from benchmarks.loadtest import Result, Scenario, random_spec, run
from benchmarks.report import steering_checks
from core.local import Server, ensure_default_model, free_port, start_server, stop_server
from tests.serving import ADMIN_KEY

SAMPLED = 8


@pytest.fixture(scope="module")
def plain_vllm(tmp_path_factory) -> Server:
    import sys

    log = tmp_path_factory.mktemp("plain-vllm") / "server.log"
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.plain_vllm", "--model", str(ensure_default_model()), "--served-model-name", MODEL,
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(2**28),
               "--port", str(port)]  # fmt: skip
    server = start_server(command, port, log)
    yield server
    stop_server(server)


def _steered_run(server: Server, spec, api_key: str) -> Result:
    result = asyncio.run(run(server.url, MODEL, PROMPTS, Scenario("steered", 4, 8, 8, spec), api_key=api_key))
    result.labels = {"target": "steerserve", "group": "headline"}  # as the report would label it
    assert result.errors == 0, result.error_kinds
    return result


def test_checks_hold_when_steered_and_fail_when_skipped(server, plain_vllm, saes):
    spec = random_spec({"jr": saes["jr"].cfg.d_sae}, 4)
    steered = steering_checks([_steered_run(server, spec, ADMIN_KEY)], steered_outputs_differing(server, spec, SAMPLED, api_key=ADMIN_KEY), SAMPLED)
    skipped = steering_checks([_steered_run(plain_vllm, spec, "unused")], steered_outputs_differing(plain_vllm, spec, SAMPLED), SAMPLED)
    assert all(c["met"] for c in steered), steered
    assert not any(c["met"] for c in skipped), skipped
    assert skipped[0]["value"] == f"0 of {SAMPLED}" and skipped[1]["value"].startswith("8 of")
