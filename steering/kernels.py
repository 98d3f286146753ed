"""The steering op's two products over per-token table rows, behind one interface (as vLLM's LoRA
path has punica's shrink and expand): a torch reference, exact in float32, and Triton kernels,
the fast path on a GPU.

    shrink(xin, table, slots)[t, k] = xin[t] . table[slots[t], k]        xin [T, d_in] float32
    expand(coef, table, slots)[t]   = sum_k coef[t, k] * table[slots[t], k]   coef [T, K] float32

`table` is [rows, K, d_in] in the model's dtype, `slots` [T] int64; both results are float32.
Row 0 is all zeros ("no steering"), so both products are 0 there.

The reference gathers each token's row, a [T, K, d_in] transient. The kernels read each token's
row in place, accumulating in float32, and return at once for a token on row 0: transients are
the [T, K] and [T, d_in] results, and a step nobody steers costs T programs that each read one
index. They take fixed shapes and no host sync, so a CUDA graph replays them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch


class Kernels(NamedTuple):
    shrink: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    expand: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _shrink(xin: torch.Tensor, table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return torch.einsum("td,tkd->tk", xin, table[slots].float())


def _expand(coef: torch.Tensor, table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return torch.einsum("tk,tkd->td", coef, table[slots].float())


TORCH = Kernels(_shrink, _expand)


def for_model(device: torch.device, dtype: torch.dtype) -> Kernels:
    """The kernels a hook on `device` for a model in `dtype` uses: the Triton ones on a GPU in half
    precision, where Triton is installed; else the reference (the exact float32 path, and CPU)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _triton() is not None:
        return Kernels(torch.ops.steerserve.shrink, torch.ops.steerserve.expand)
    return TORCH


@functools.cache
def _triton() -> object | None:
    """steering.triton_kernels, registering its ops, or None where Triton is not installed."""
    try:
        from steering import triton_kernels
    except ImportError:
        return None

    # Custom ops, so that torch.compile sees an opaque call of fixed shape (as vLLM's LoRA ops).
    @torch.library.custom_op("steerserve::shrink", mutates_args=(), device_types="cuda")
    def shrink(xin: torch.Tensor, table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return triton_kernels.shrink(xin, table, slots)

    @shrink.register_fake
    def _(xin: torch.Tensor, table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return xin.new_empty(xin.shape[0], table.shape[1])

    @torch.library.custom_op("steerserve::expand", mutates_args=(), device_types="cuda")
    def expand(coef: torch.Tensor, table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return triton_kernels.expand(coef, table, slots)

    @expand.register_fake
    def _(coef: torch.Tensor, table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return coef.new_empty(coef.shape[0], table.shape[2])

    return triton_kernels
