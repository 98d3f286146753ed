"""features/contrast.py against numpy, written from the methods' definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features.contrast import contrast


def _sets(seed: int, n: int = 12, m: int = 12, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shift = rng.normal(size=d) * 2
    return rng.normal(size=(n, d)) + shift, rng.normal(size=(m, d))


def test_mean_diff_is_the_difference_of_means_and_separates_the_sets():
    positive, negative = _sets(0, n=12, m=7)
    got = contrast(torch.tensor(positive), torch.tensor(negative), "mean_diff")
    want = positive.mean(0) - negative.mean(0)
    np.testing.assert_allclose(got.vector.numpy(), want, rtol=1e-5)
    unit = want / np.linalg.norm(want)
    middle = (positive.mean(0) + negative.mean(0)) @ unit / 2
    right = (positive @ unit > middle).sum() + (negative @ unit <= middle).sum()
    assert got.accuracy == pytest.approx(right / 19)
    assert got.accuracy > 0.9  # the sets are shifted apart
    assert got.stream_norm == pytest.approx(np.linalg.norm(np.concatenate([positive, negative]), axis=1).mean(), rel=1e-6)


def test_pca_is_the_top_direction_of_the_paired_differences_signed_and_scaled():
    positive, negative = _sets(1)
    got = contrast(torch.tensor(positive), torch.tensor(negative), "pca").vector.numpy()
    differences = positive - negative
    # The top eigenvector of the uncentred second moment of the differences.
    values, vectors = np.linalg.eigh(differences.T @ differences)
    top = vectors[:, -1]
    mean = positive.mean(0) - negative.mean(0)
    top = top if top @ mean > 0 else -top
    np.testing.assert_allclose(got, top * (top @ mean), rtol=1e-4, atol=1e-6)
    assert got @ mean > 0


def test_pca_needs_pairs_and_a_direction_needs_a_difference():
    positive, negative = _sets(2, n=5, m=4)
    with pytest.raises(ValueError, match="pairs"):
        contrast(torch.tensor(positive), torch.tensor(negative), "pca")
    same = torch.tensor(positive)
    with pytest.raises(ValueError, match="no direction"):
        contrast(same, same.clone(), "mean_diff")
