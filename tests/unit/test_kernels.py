"""The steering op's kernels (steering/kernels.py) and its tables in the model's dtype.

The Triton kernels are the GPU fast path. Without a GPU they run here in Triton's interpreter
(TRITON_INTERPRET=1, read when a kernel is defined, hence a subprocess), which executes the same
kernel code, indexing and masks included, on CPU tensors; it cannot hold bfloat16, so half
precision is checked in float16. Their speed and CUDA-graph replay need a GPU
(tests/unit/test_cuda_graph.py, benchmarks/op.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from steering import kernels
from steering.hook import SAESteering, TokenIndex
from tests.helpers import route
from tests.saes import ROWS, WIDTH, D, make_sae


def test_triton_kernels_equal_the_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.unit.test_kernels import check_triton_kernels; check_triton_kernels()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def check_triton_kernels() -> None:
    """Run under TRITON_INTERPRET=1: the kernels against the torch reference, alone (widths that
    are not multiples of the blocks, rows in any order, row 0 among them) and inside the hook."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from steering import triton_kernels

    fast = kernels.Kernels(triton_kernels.shrink, triton_kernels.expand)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for n_tokens, k, d in ((7, 5, 200), (33, 20, 130), (4, 16, 128)):
            table = torch.randn(4, k, d, generator=g).to(dtype)
            table[0] = 0  # row 0: no steering
            slots = torch.randint(0, 4, (n_tokens,), generator=g)
            slots[0] = 0
            xin, coef = torch.randn(n_tokens, d, generator=g), torch.randn(n_tokens, k, generator=g)
            for name in ("shrink", "expand"):
                args = (xin if name == "shrink" else coef, table, slots)
                got, want = getattr(fast, name)(*args), getattr(kernels.TORCH, name)(*args)
                assert got.dtype == torch.float32 and got.shape == want.shape, name
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=lambda m, name=name: f"{name} {dtype}: {m}")
                assert torch.equal(got[slots == 0], torch.zeros_like(got[slots == 0])), name

    # The hook's gathered path through them, each architecture, on a mixed batch.
    import tempfile
    from pathlib import Path

    for architecture in ("standard", "jumprelu", "topk"):
        with tempfile.TemporaryDirectory() as tmp:
            sae = make_sae(Path(tmp), architecture, "constant_norm_rescale")
            hook = SAESteering(sae, TokenIndex.zeros(12), ROWS, WIDTH, torch.float16)
            hook.set_row(1, [(3, 2.0, -1.0), (7, 0.0, 0.5)])
            hook.set_row(2, [(1, 4.0, 0.0)])
            route(hook, [(1, 2, 5), (2, 6, 12)])
            x = torch.randn(12, D, generator=g) * 3
            want = hook.delta(x)
            hook.kernels = fast
            torch.testing.assert_close(hook.delta(x), want, rtol=1e-5, atol=1e-5, msg=architecture)
            assert want[2:5].abs().sum() > 0 and want[6:].abs().sum() > 0, "the batch steered nothing"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tables_hold_the_float32_steering(tmp_path, dtype):
    """A half-precision model's d_in-wide tables are in its dtype (half the memory); the delta they
    give stays within that dtype's rounding of the float32 tables' delta. Add-only rows, so no
    feature switches at a threshold (the one way half precision can differ by more)."""
    sae = make_sae(tmp_path, "jumprelu", "none")
    hooks = {dt: SAESteering(sae, TokenIndex.zeros(8), ROWS, WIDTH, dt) for dt in (torch.float32, dtype)}
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(1)) * 3
    deltas = {}
    for dt, hook in hooks.items():
        hook.set_row(1, [(3, 2.0, 0.0), (5, -1.5, 0.0)])
        route(hook, [(1, 1, 4), (1, 5, 8)])
        assert hook.enc.dtype == hook.dec.dtype == dt and hook.c0.dtype == torch.float32
        steered, _ = hook(x.to(dt), torch.zeros_like(x, dtype=dt))
        deltas[dt] = hook.delta(x), steered.float() - x.to(dt).float()
    exact = deltas[torch.float32][0]
    bound = 2 * torch.finfo(dtype).eps * (2.0 * sae.W_dec[3].abs() + 1.5 * sae.W_dec[5].abs())
    for delta in deltas[dtype]:  # the gathered path, then the CPU op (whose output is rounded to dtype too)
        assert ((delta - exact).abs() <= bound + torch.finfo(dtype).eps * 2 * x.to(dtype).float().abs()).all()
    assert not torch.equal(deltas[dtype][0], exact), "the tables were not in half precision"


def test_the_fast_path_is_chosen_for_half_precision_on_a_gpu():
    assert kernels.for_model(torch.device("cpu"), torch.bfloat16) is kernels.TORCH
    assert kernels.for_model(torch.device("cuda"), torch.float32) is kernels.TORCH  # the exact path
    fast = kernels.for_model(torch.device("cuda"), torch.bfloat16)
    assert fast.shrink is torch.ops.steerserve.shrink and fast.expand is torch.ops.steerserve.expand
