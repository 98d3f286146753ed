"""The server tier's set-up: the session server's presets, policy and keys, and how a test starts a
steerserve of its own."""

from __future__ import annotations

import os
from pathlib import Path

from core.local import Server, start_steerserve

MAX_STEERED = 16
ADMIN_KEY = "sk-test-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PRESETS = """\
# Presets for the test session's SAEs (see TEST_SAES in tests/conftest.py).
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
  - name: watched
    key: sk-test-watched
    monitors:
      - {sae: jr, index: 0, above: -1.0, action: flag, scope: all}  # fires on the first token
""" % __import__("hashlib").sha256(b"sk-test-guarded").hexdigest()
PREFILL_CHUNK = 256  # small token budget per step, so long prompts are prefilled in several chunks


def sae_args(sae_dirs: dict[str, Path]) -> list[str]:
    return [a for sae_id, path in sae_dirs.items() for a in ("--sae", f"{sae_id}={path}")]


def start_side_server(tmp_path_factory, sae_dirs, name: str, extra: list[str], env: dict[str, str] | None = None) -> Server:
    """A float32 steerserve with the test SAEs, its own compile cache and a small KV cache, for tests
    that need a differently configured server beside the session's."""
    logs = tmp_path_factory.mktemp(name)
    env = {**os.environ, "VLLM_CACHE_ROOT": str(logs / "vllm-cache"), **(env or {})}
    args = [*sae_args(sae_dirs), "--dtype", "float32", "--kv-cache-gib", "0.25", *extra]
    return start_steerserve(args, logs / "server.log", env)
