"""Every vLLM internal steerserve touches still exists in the installed vLLM.

steerserve wraps private runner methods and reads private engine state under an exact pin; when a
vLLM upgrade removes or renames one of them, this test names it, before any server fails in a
stranger way.
"""

from __future__ import annotations

import re

import pytest
import vllm

from core.vllm_internals import TOUCHPOINTS, VLLM_PIN, Touchpoint, resolve


def test_installed_vllm_is_the_pinned_one():
    assert vllm.__version__.split("+")[0] == VLLM_PIN


@pytest.mark.parametrize("point", TOUCHPOINTS, ids=lambda p: p.symbol)
def test_touchpoint_exists(point):
    resolve(point)


@pytest.mark.parametrize(
    "point",
    [
        Touchpoint("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs_renamed", "a method gone"),
        Touchpoint("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "an attribute gone", sets="self.input_batch_v2"),
        Touchpoint("vllm.v1.worker.no_such_module", "GPUModelRunner", "a module gone"),
    ],
    ids=lambda p: p.symbol,
)
def test_a_missing_touchpoint_is_named(point):
    with pytest.raises(LookupError, match=re.escape(point.symbol)):
        resolve(point)


def test_every_vllm_import_goes_through_a_touchpoint():
    """Modules outside core/ import from vLLM only what TOUCHPOINTS lists (or vLLM's public
    protocol and config types), so the list is the whole surface."""
    from pathlib import Path

    root = Path(__file__).parents[2]
    listed = {(p.module, p.path.split(".")[0]) for p in TOUCHPOINTS}
    public = {"vllm.engine.protocol", "vllm.v1.engine.exceptions", "vllm.config", "vllm.platforms", "vllm.logger",
              "vllm.utils.argparse_utils", "vllm.entrypoints.serve.utils.api_utils", "vllm.entrypoints.launchers.cli_args",
              "vllm.entrypoints.openai.chat_completion.protocol", "vllm.entrypoints.openai.completion.protocol",
              "vllm", "vllm.inputs"}  # fmt: skip  # the engine's own inputs: SamplingParams, TokensPrompt
    unlisted = []
    for package in ("server", "steering", "features", "benchmarks"):
        for path in (root / package).rglob("*.py"):
            for module, names in re.findall(r"from (vllm[\w.]*) import ([^\n(]+)", path.read_text()):
                for name in (n.split(" as ")[0].strip() for n in names.split(",")):
                    if module not in public and (module, name) not in listed:
                        unlisted.append(f"{path.relative_to(root)}: from {module} import {name}")
    assert not unlisted, unlisted
