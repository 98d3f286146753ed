"""A steering vector from two sets of examples: the direction that separates their residual streams.

Each example is one vector (its stream at a layer, averaged over its positions or taken at its
last), and the direction is derived from the two stacks, `positive` [n, d_in] and `negative` [m, d_in]:

- `mean_diff`: mean(positive) - mean(negative), the difference of means (ActAdd, CAA, Arditi et
  al.'s refusal direction);
- `pca`: the examples paired in order (n = m), the first principal direction of the differences
  positive_i - negative_i, uncentred (the direction that carries most of the pairs' differences,
  as repeng's `pca_diff`, which centres them), signed to agree with the difference of means and as
  long as that difference's projection on it, so `raw` strengths mean the same for both methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Method = Literal["mean_diff", "pca"]


@dataclass(frozen=True)
class Contrast:
    vector: torch.Tensor  # [d_in] float32: the direction, at the length of the difference it stands for
    accuracy: float  # share of the examples on their own side of the midpoint between the two means, along it
    stream_norm: float  # the mean norm of the examples' (pooled) streams: a scale for strengths in `norm` units


def contrast(positive: torch.Tensor, negative: torch.Tensor, method: Method = "mean_diff") -> Contrast:
    positive, negative = positive.double(), negative.double()
    difference = positive.mean(0) - negative.mean(0)
    if method == "mean_diff":
        vector = difference
    else:
        if positive.shape != negative.shape:
            raise ValueError(f"pca pairs the examples in order: {len(positive)} positive and {len(negative)} negative")
        top = torch.linalg.svd(positive - negative, full_matrices=False).Vh[0]
        along = float(difference @ top)
        vector = top * along  # signed toward the positive examples, as long as the difference along it
    if not vector.norm() > 0:
        raise ValueError("the two sets have the same mean stream here: there is no direction between them")
    unit = vector / vector.norm()
    midpoint = float((positive.mean(0) + negative.mean(0)) @ unit) / 2
    right = int(((positive @ unit) > midpoint).sum() + ((negative @ unit) <= midpoint).sum())
    norm = float(torch.cat([positive, negative]).norm(dim=-1).mean())
    return Contrast(vector.float(), right / (len(positive) + len(negative)), norm)
