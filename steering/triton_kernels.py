"""Triton kernels for steering/kernels.py's shrink and expand (see there for their semantics).

One program per (token, block of features) for shrink and per (token, block of d_in) for
expand; each reads its token's row index first and stops there on row 0. Products accumulate in
float32 whatever the table's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 16
BLOCK_D = 128


@triton.jit
def _shrink_kernel(x_ptr, table_ptr, slot_ptr, out_ptr, D, K, sx, sr, sk, so, BK: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot != 0:
        ks = tl.program_id(1) * BK + tl.arange(0, BK)
        acc = tl.zeros((BK,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            x = tl.load(x_ptr + t * sx + ds, mask=ds < D, other=0.0)
            w = tl.load(
                table_ptr + slot * sr + ks[:, None] * sk + ds[None, :],
                mask=(ks[:, None] < K) & (ds[None, :] < D),
                other=0.0,
            )
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(out_ptr + t * so + ks, acc, mask=ks < K)


@triton.jit
def _expand_kernel(c_ptr, table_ptr, slot_ptr, out_ptr, D, K, sc, sr, sk, so, BK: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot != 0:
        ds = tl.program_id(1) * BD + tl.arange(0, BD)
        acc = tl.zeros((BD,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            c = tl.load(c_ptr + t * sc + ks, mask=ks < K, other=0.0)
            w = tl.load(
                table_ptr + slot * sr + ks[:, None] * sk + ds[None, :],
                mask=(ks[:, None] < K) & (ds[None, :] < D),
                other=0.0,
            )
            acc += tl.sum(c[:, None] * w.to(tl.float32), axis=0)
        tl.store(out_ptr + t * so + ds, acc, mask=ds < D)


def shrink(xin: torch.Tensor, table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[T, K] float32: xin [T, d_in] float32 against table [rows, K, d_in] at slots [T]."""
    (n, d), k = xin.shape, table.shape[1]
    assert table.stride(2) == 1 and xin.stride(1) == 1, "rows are read as contiguous d_in vectors"
    out = torch.zeros(n, k, dtype=torch.float32, device=xin.device)
    grid = (n, triton.cdiv(k, BLOCK_K))
    _shrink_kernel[grid](xin, table, slots, out, d, k, xin.stride(0), table.stride(0), table.stride(1), k, BK=BLOCK_K, BD=BLOCK_D)
    return out


def expand(coef: torch.Tensor, table: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[T, d_in] float32: coef [T, K] float32 times table [rows, K, d_in] at slots [T]."""
    (n, k), d = coef.shape, table.shape[2]
    assert table.stride(2) == 1 and coef.stride(1) == 1, "rows are read as contiguous d_in vectors"
    out = torch.zeros(n, d, dtype=torch.float32, device=coef.device)
    grid = (n, triton.cdiv(d, BLOCK_D))
    _expand_kernel[grid](coef, table, slots, out, d, k, coef.stride(0), table.stride(0), table.stride(1), d, BK=BLOCK_K, BD=BLOCK_D)
    return out
