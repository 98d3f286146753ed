"""The SAE's training data: resid_post at one layer for every corpus token, cached on disk.

Token streams are cut into windows of CONTEXT tokens; each window's first position is left out
(the first token of a sequence is the model's attention sink, with a residual norm far from
every other token's). Row r of the cache is window r // (CONTEXT-1), position r % (CONTEXT-1) + 1.
The cache fills window batch by window batch and resumes where an interrupted run stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from features.residuals import ResidualReader

CONTEXT = 512
WINDOWS_PER_BATCH = 8
# A row this many times the median norm is an attention sink too: the model also parks attention
# on a few tokens after the first (0.008% of rows here, at 20-50x the median norm).
SINK_FACTOR = 5.0


def windows(tokens: np.ndarray) -> np.ndarray:
    """[W, CONTEXT] windows of a token stream (the incomplete tail is dropped)."""
    n = len(tokens) // CONTEXT
    return tokens[: n * CONTEXT].reshape(n, CONTEXT)


def token_of_row(row: int) -> int:
    """Position in the token stream of cache row `row`."""
    window, position = divmod(row, CONTEXT - 1)
    return window * CONTEXT + position + 1


def open_cache(path: Path, rows: int, d_model: int, mode: str = "r") -> np.ndarray:
    """Residuals rounded to bfloat16, stored as their uint16 bits (numpy has no bfloat16)."""
    return np.lib.format.open_memmap(path, mode=mode, dtype=np.uint16, shape=(rows, d_model) if mode == "w+" else None)


def collect(reader: ResidualReader, tokens: np.ndarray, path: Path, desc: str) -> np.ndarray:
    """Fill (or finish filling) the cache at `path` with the residuals of `tokens`."""
    batches = windows(tokens)
    rows = len(batches) * (CONTEXT - 1)
    d_model = reader.base.config.hidden_size
    progress = path.with_suffix(".progress.json")
    done = json.loads(progress.read_text())["windows"] if progress.exists() and path.exists() else 0
    cache = open_cache(path, rows, d_model, "r+" if done else "w+")
    bar = tqdm(total=len(batches), initial=done, desc=desc, unit="window")
    for start in range(done, len(batches), WINDOWS_PER_BATCH):
        ids = torch.from_numpy(batches[start : start + WINDOWS_PER_BATCH].astype(np.int64))
        resid = reader(ids)[:, 1:].reshape(-1, d_model)
        cache[start * (CONTEXT - 1) : start * (CONTEXT - 1) + len(resid)] = resid.to(torch.bfloat16).view(torch.uint16).numpy()
        bar.update(len(ids))
        if (start // WINDOWS_PER_BATCH) % 50 == 49 or start + WINDOWS_PER_BATCH >= len(batches):
            cache.flush()
            progress.write_text(json.dumps({"windows": min(start + WINDOWS_PER_BATCH, len(batches))}))
    bar.close()
    return open_cache(path, rows, d_model)


def as_float(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bfloat16).float()


def sink_norm(cache: np.ndarray, sample: int = 100_000) -> float:
    """The norm above which a cached row counts as an attention sink: SINK_FACTOR times the
    median norm of an evenly spaced sample."""
    rows = np.linspace(0, len(cache) - 1, min(sample, len(cache))).astype(int)
    return SINK_FACTOR * float(as_float(cache[rows]).norm(dim=1).median())
