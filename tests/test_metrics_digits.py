"""Digit metrics: the Fréchet distance against closed forms, and that the scores discriminate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentlm.data.digits import DigitsDataset
from latentlm.metrics.digits import DigitsEvaluator
from latentlm.metrics.statistics import frechet_distance, gaussian_statistics


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T + np.eye(5)
    mu = rng.normal(size=5)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    # Diagonal covariances: ‖Δμ‖² + Σ (√a − √b)².
    d1, d2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((mu - 1) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(mu, np.diag(d1), np.ones(5), np.diag(d2)) == pytest.approx(expected, rel=1e-10)
    # Scaled covariance: tr(Σ) (1 + c − 2√c).
    assert frechet_distance(mu, sigma, mu, 4 * sigma) == pytest.approx(np.trace(sigma) * (1 + 4 - 4), rel=1e-8)
    # Singular covariances (fewer samples than features) still give a finite, non-negative value.
    few = rng.normal(size=(3, 8))
    assert 0 <= frechet_distance(*gaussian_statistics(few), *gaussian_statistics(few + 1)) < np.inf
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    train, test = DigitsDataset("train"), DigitsDataset("test")
    # Reference = half of the test set, so the other half is real, held-out data the metric has never seen.
    evaluator = DigitsEvaluator.fit(train.images, train.labels, test.images[::2])
    return evaluator, test.images[1::2], test.labels[1::2]


def test_real_held_out_digits_score_near_the_top(digits):
    evaluator, images, labels = digits
    real = evaluator.score(images, labels)
    assert real.accuracy >= 0.9
    assert 0.5 < real.frechet_ratio < 1.6  # as far from the reference as real training digits are
    assert real.as_dict()["num_images"] == len(images)


def test_noise_and_wrong_labels_score_near_the_bottom(digits):
    evaluator, images, labels = digits
    g = torch.Generator().manual_seed(0)
    noise = evaluator.score(torch.rand(images.shape, generator=g) * 2 - 1, labels)
    assert noise.accuracy < 0.3 and noise.frechet_ratio > 10
    blank = evaluator.score(torch.full_like(images, -1.0), labels)  # an all-background "generator"
    assert blank.accuracy < 0.3 and blank.frechet_ratio > 10
    shuffled = evaluator.score(images, labels.roll(1))  # right images, wrong classes: accuracy collapses
    assert shuffled.accuracy < 0.2
    # Mode collapse (every image the same digit) is caught by the Fréchet distance, not by accuracy per se.
    collapsed = evaluator.score(images[labels == 3][:1].expand_as(images), labels)
    assert collapsed.frechet_ratio > 3
