"""FID / IS / sFID / precision-recall: closed forms, equality with torch-fidelity, and the refusals.

A random-weight InceptionV3 in torch-fidelity's format stands in for the real weights (no network):
equality with ``torch_fidelity.calculate_metrics`` on the same images and the same weight file is what
is pinned, and it does not depend on the weights being trained.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from latentlm.checkpoint import mark_complete
from latentlm.commands.evaluate import evaluate
from latentlm.commands.reference_stats import reference_stats
from latentlm.config import ConfigError, EvaluateConfig, ReferenceStatsConfig, SamplerConfig
from latentlm.metrics import digits as digits_metrics
from latentlm.metrics.inception import INCEPTION_FILE, InceptionFeatures, load_reference, resolve_inception_weights
from latentlm.metrics.statistics import RunningMoments, frechet_distance, gaussian_statistics
from test_sample_many import make_checkpoint


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """torch-fidelity's InceptionV3 with random weights scaled so activations stay O(1) through the depth."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    # Build the module without its weight download/load (the constructor always loads a state dict).
    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:  # He init keeps the ReLU network's activations from vanishing over ~20 layers
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / p[0].numel()))
            elif name.endswith("bn.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net.state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(random_inception_state(), path)
    return path


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{k:06d}.png")
    return folder


def real_images(n: int = 24, side: int = 8, seed: int = 1) -> np.ndarray:
    """Smooth random colour fields, uint8 (n, side, side, 3)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 2, 2, 3)).astype(np.float64)
    up = base.repeat(side // 2, axis=1).repeat(side // 2, axis=2)
    return np.clip(up + rng.normal(0, 20, up.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def random_gaussian(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(size=(dim, 2 * dim))
    return rng.normal(size=dim), a @ a.T / (2 * dim) + 0.1 * np.eye(dim)


@pytest.mark.parametrize("dim", [8, 256])
def test_frechet_distance_matches_scipy_sqrtm_closed_form(dim):
    rng = np.random.default_rng(dim)
    (mu1, s1), (mu2, s2) = random_gaussian(rng, dim), random_gaussian(rng, dim)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_commuting_covariances_is_the_eigenvalue_formula():
    """Same eigenvectors: FD = ‖Δmu‖² + Σ (√a_i − √b_i)², exactly known without any matrix square root."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    a, b = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_promotes_float32_means_and_refuses_mismatched_shapes():
    mu, sigma = np.ones(4, np.float32), np.eye(4)
    assert frechet_distance(mu, sigma, np.zeros(4), sigma) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu, sigma, np.zeros(3), np.eye(3))


def test_running_moments_equal_numpy_mean_and_cov():
    x = np.random.default_rng(0).normal(5.0, 2.0, size=(103, 16)).astype(np.float32)
    moments = RunningMoments()
    for start in range(0, 103, 10):
        moments.update(torch.from_numpy(x[start:start + 10]))
    mu, sigma = moments.result()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Inception metrics against torch-fidelity
# ---------------------------------------------------------------------------------------------


def test_spatial_features_are_the_first_7_channels_of_mixed_6d_branch1x1_nhwc(weights):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    images = real_images(2)
    inception = InceptionFeatures(weights)
    got = inception(images).spatial  # (2, 2023)
    net = inception.net
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float()
        x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            x = getattr(net, name)(x)
        mixed_6_conv = net.Mixed_6d.branch1x1(x)  # (2, 192, 17, 17)
    assert mixed_6_conv.shape == (2, 192, 17, 17)
    expected = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # ADM: spatial[:, :, :, :7].reshape(N, -1)
    assert torch.equal(got, expected)
    assert got.std() > 0


@pytest.fixture(scope="module")
def reference(weights, tmp_path_factory) -> Path:
    """reference-stats of 6 real images in an ImageFolder (one class)."""
    root = tmp_path_factory.mktemp("real")
    write_pngs(root / "class0", real_images(6))
    ref = root / "ref.npz"
    reference_stats(ReferenceStatsConfig(folder=str(root), out=str(ref), image_size=8, inception_weights=str(weights),
                                         num_workers=0, progress=False))
    return ref


def test_one_command_evaluation_equals_torch_fidelity(weights, reference, tmp_path):
    """Checkpoint -> 6 generated images (+ PNGs) -> FID/IS/sFID/P-R against a reference-stats file of 6 real
    images, compared with torch-fidelity's calculate_metrics on the PNG folders with the same weight file."""
    import torch_fidelity

    ckpt = make_checkpoint(tmp_path / "run")
    cfg = EvaluateConfig(checkpoint=str(ckpt), out=str(tmp_path / "samples.npz"), png_dir=str(tmp_path / "png"),
                         per_class=2, images_per_shard=4, batch_size=4, sampler=SamplerConfig(num_steps=2),
                         device="cpu", progress=False, reference=str(reference), inception_weights=str(weights),
                         isc_splits=3)
    results = evaluate(cfg)
    ours = results["metrics"]

    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "png"), input2=str(reference.parent / "class0"), cuda=False, isc=True, fid=True,
        prc=True, feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights), isc_splits=3,
        batch_size=64, cache=False, save_cpu_ram=True, verbose=False)
    assert ours["inception_score"] == theirs["inception_score_mean"]
    assert ours["inception_score_std"] == theirs["inception_score_std"]
    # The reference side went through reference-stats' streaming float64 moments, torch-fidelity's through np.cov.
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["precision"] == theirs["precision"] and ours["recall"] == theirs["recall"]
    assert ours["fid"] > 0 and ours["sfid"] > 0 and math.isfinite(ours["sfid"])

    assert results["generation"]["checkpoint_step"] == 7 and results["generation"]["num_images"] == 6
    assert results["generation"]["sampler"]["num_steps"] == 2 and results["generation"]["weights"] == "ema"
    assert results["reference"]["sha256"] == load_reference(reference).sha256
    assert results["samples"]["num_images"] == 6 and results["inception"]["official"] is False
    assert json.loads((tmp_path / "samples.eval.json").read_text()) == results


@pytest.mark.slow  # ~10 s idle but ~50 s when the 2 cores are shared (two 2048-d eigenproblems)
def test_reference_against_itself_scores_zero_fid_and_full_precision_recall(weights, reference, tmp_path):
    """The reference-stats file as samples: its images (arr_0) against its own mu/sigma and mu_s/sigma_s."""
    with np.load(reference) as data:
        assert data["arr_0"].shape == (6, 8, 8, 3) and data["mu_s"].shape == (2023,)
    metrics = evaluate(EvaluateConfig(out=str(reference), reference=str(reference), inception_weights=str(weights),
                                      progress=False, isc_splits=2, results=str(tmp_path / "self.json")))["metrics"]
    assert abs(metrics["fid"]) < 1e-4 and abs(metrics["sfid"]) < 1e-4
    assert metrics["precision"] == metrics["recall"] == 1.0


def test_digits_checkpoint_is_scored_by_the_digit_classifier(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run", num_classes=10, image_size=16)
    config = ckpt / "config.json"
    config.write_text(config.read_text().replace('"kind": "folder"', '"kind": "digits"'))
    mark_complete(ckpt, 7, 1)  # the marker records the sha256 of the edited file
    cfg = EvaluateConfig(checkpoint=str(ckpt), out=str(tmp_path / "digits.npz"), per_class=3, batch_size=30,
                         sampler=SamplerConfig(num_steps=2), device="cpu", progress=False)
    train_classifier = digits_metrics.train_digit_classifier
    with mock.patch.object(digits_metrics, "train_digit_classifier",  # 1 epoch: this tests the wiring
                           lambda *a, **k: train_classifier(*a, **{**k, "epochs": 1})):
        metrics = evaluate(cfg)["metrics"]
    assert set(metrics) == {"digits"}
    assert set(metrics["digits"]) >= {"accuracy", "frechet", "frechet_floor"} and metrics["digits"]["num_images"] == 30


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def good_reference(tmp_path) -> Path:
    path = tmp_path / "stats.npz"
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048))
    return path


def test_fewer_images_than_requested_is_refused(tmp_path, good_reference, weights):
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=real_images(5))
    with pytest.raises(ConfigError, match="holds 5 images but 50000 were requested"):
        evaluate(EvaluateConfig(out=str(samples), reference=str(good_reference), inception_weights=str(weights),
                                eval_images=50_000))


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((4, 8, 8, 3), np.float32), "arr_0 is float32, expected uint8"),
    (np.zeros((4, 3, 8, 8), np.uint8), r"shape \(4, 3, 8, 8\), expected \(N, H, W, 3\)"),
    (np.zeros((8, 8, 3), np.uint8), "expected \\(N, H, W, 3\\)"),
])
def test_non_uint8_or_wrong_shape_samples_are_refused(tmp_path, good_reference, weights, array, message):
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=array)
    with pytest.raises(ConfigError, match=message):
        evaluate(EvaluateConfig(out=str(samples), reference=str(good_reference), inception_weights=str(weights)))


def test_reference_without_mu_sigma_or_with_bad_shapes_is_refused(tmp_path):
    images_only = tmp_path / "images.npz"
    np.savez(images_only, arr_0=real_images(4))
    with pytest.raises(ConfigError, match="no 'mu'/'sigma'.*reference-stats"):
        load_reference(images_only)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ConfigError, match=r"mu is float64 \(64,\), expected float \(2048,\)"):
        load_reference(wrong)
    bad_images = tmp_path / "bad_images.npz"
    np.savez(bad_images, arr_0=np.zeros((2, 8, 8, 3), np.float64), mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ConfigError, match="expected uint8"):
        load_reference(bad_images)
    with pytest.raises(ConfigError, match="does not exist"):
        load_reference(tmp_path / "missing.npz")


def test_missing_inception_weights_fail_at_once_naming_the_file(tmp_path, monkeypatch, good_reference):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE
    with pytest.raises(ConfigError, match=f"no Inception weights at {expected}.*never downloads.*github.com"):
        resolve_inception_weights(None)
    with pytest.raises(ConfigError, match="--inception-weights /nowhere.pth: no such file"):
        resolve_inception_weights("/nowhere.pth")
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=real_images(4))
    with mock.patch("latentlm.commands.evaluate.InceptionFeatures") as network, \
            pytest.raises(ConfigError, match=INCEPTION_FILE):
        evaluate(EvaluateConfig(out=str(samples), reference=str(good_reference)))
    network.assert_not_called()


def test_inception_file_that_is_not_a_plain_state_dict_is_refused(tmp_path):
    pickled = tmp_path / "pickled.pth"
    torch.save(Path("not a tensor"), pickled)  # an arbitrary object: needs unpickling of a class
    with pytest.raises(ConfigError, match="not a plain tensor state dict"):
        resolve_inception_weights(str(pickled))
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ConfigError, match="not an InceptionV3 state dict"):
        resolve_inception_weights(str(other))


def test_evaluate_without_reference_or_samples_is_refused(tmp_path, good_reference):
    with pytest.raises(ConfigError, match="--reference is required"):
        evaluate(EvaluateConfig(out=str(tmp_path / "s.npz")))
    with pytest.raises(ConfigError, match="do not exist: pass --checkpoint"):
        evaluate(EvaluateConfig(out=str(tmp_path / "s.npz"), reference=str(good_reference),
                                inception_weights="/nowhere.pth"))


def test_gaussian_statistics_are_torch_fidelitys():
    from torch_fidelity.metric_fid import fid_features_to_statistics

    x = torch.randn(50, 10)
    (mu, sigma), theirs = gaussian_statistics(x), fid_features_to_statistics(x)
    # Our one estimator (shifted float64 sums) is torch-fidelity's np.mean / np.cov, without its float32 mean.
    np.testing.assert_allclose(mu, theirs["mu"], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(sigma, theirs["sigma"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mu, x.double().numpy().mean(axis=0), rtol=1e-12, atol=1e-15)
