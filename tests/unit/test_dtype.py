"""`--dtype auto` serves float32 on an x86 CPU without native bfloat16, and vLLM's choice elsewhere."""

from __future__ import annotations

import platform

import pytest
import torch

from server.cli import model_dtype


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(False, False, "float32"), (True, False, "auto"), (False, True, "auto")])
def test_auto_is_float32_only_without_native_bfloat16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert model_dtype("auto") == expected
    assert model_dtype("bfloat16") == "bfloat16"  # an explicit choice is never overridden


def test_other_cpus_keep_vllms_choice(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert model_dtype("auto") == "auto"
