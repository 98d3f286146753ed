"""A compiled graph can never run without the hooks it was traced with.

vLLM reuses compiled graphs by a hash of its config; steerserve's engine settings (SAE file
digests, table sizes, a digest of the steering code torch.compile traces) ride in
`additional_config`, which that hash covers.
"""

from __future__ import annotations

import argparse
import shutil

import pytest
from vllm.config import VllmConfig

from features.sae import ARCHITECTURES
from features.vectors import DirectionSAE
from server.cli import build_parser
from server.startup import steering_settings
from steering import kernels, triton_kernels
from steering.hook import SAESteering
from steering.wire import EngineSettings, code_digest, traced_files
from steering.worker import _steer_layer_output
from tests.saes import make_sae


def _settings(model_dir, *argv: str) -> EngineSettings:
    args: argparse.Namespace = build_parser().parse_args(["serve", *argv])
    return steering_settings(model_dir, args)[0]


def _compile_key(settings: EngineSettings) -> str:
    return VllmConfig(additional_config=settings.additional_config()).compute_hash()


@pytest.fixture
def jr(tmp_path):
    """A JumpReLU SAE that fits the default model."""
    return make_sae(tmp_path, "jumprelu", "none", d_in=576).path


def test_compile_cache_key_follows_saes_and_tables(model_dir, jr, tmp_path):
    base = _settings(model_dir, "--sae", f"jr={jr}")
    assert _compile_key(base) == _compile_key(_settings(model_dir, "--sae", f"jr={jr}"))
    assert _compile_key(base) != VllmConfig().compute_hash(), "a plain vLLM graph is never reused"

    changed = tmp_path / "jr"
    shutil.copytree(jr, changed)
    weights = changed / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    assert _compile_key(_settings(model_dir, "--sae", f"jr={changed}")) != _compile_key(base), "SAE weights"
    assert _compile_key(_settings(model_dir, "--sae", f"jr={jr}", "--max-features-per-sae", "8")) != _compile_key(base)


def test_the_digest_covers_every_traced_function():
    """Everything the compiled graph runs of ours lives in a file the digest reads: the hook's
    two paths (the CPU op's body too, though opaque to tracing) and their kernels, the layer
    callback, and every registered architecture's input pipeline and activation."""
    traced = [SAESteering.forward, SAESteering.delta, SAESteering.steer_spans, _steer_layer_output]
    traced += [kernels.for_model, *kernels.TORCH, triton_kernels.shrink, triton_kernels.expand]
    for cls in (*ARCHITECTURES.values(), DirectionSAE):
        traced += [cls.input_norm, cls.sae_in, cls.activation, cls.selected_activations]
    files = {str(path) for path in traced_files()}
    uncovered = [fn.__qualname__ for fn in traced if fn.__code__.co_filename not in files]
    assert not uncovered, uncovered


def test_changing_a_traced_function_gives_a_new_cache_entry(model_dir, jr, tmp_path):
    """The settings carry the digest of the code as it is; edit one traced function (a JumpReLU
    activation, in a copy of the files) and the key changes."""
    base = _settings(model_dir, "--sae", f"jr={jr}")
    assert base.code_digest == code_digest()
    copies = []
    for n, path in enumerate(traced_files()):
        copy = tmp_path / f"{n}-{path.name}"
        shutil.copy(path, copy)
        copies.append(copy)
    assert code_digest(copies) == base.code_digest
    sae_file = next(c for c in copies if c.name.endswith("-sae.py"))
    source = sae_file.read_text()
    assert 'return torch.relu(pre) * (pre > params["threshold"])' in source
    sae_file.write_text(source.replace('torch.relu(pre) * (pre > params["threshold"])', 'torch.relu(pre) * (pre >= params["threshold"])'))
    edited = base.model_copy(update={"code_digest": code_digest(copies)})
    assert edited.code_digest != base.code_digest
    assert _compile_key(edited) != _compile_key(base), "hook code"
