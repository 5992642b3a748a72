"""The embedded default's metric: a small CNN trained in seconds on the real training digits scores
generated digits by

* **class accuracy** — how often the classifier recognises an image as the class it was
  generated for;
* **Fréchet distance** in the classifier's feature space between generated images and the real
  test images, printed beside the **floor**: the same distance for real training images with the
  same label histogram and count (so sample-size bias is the same on both sides). A ratio
  frechet / floor near 1 means "as close to the test set as real digits are".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentlm.metrics.statistics import frechet_distance, gaussian_statistics
from latentlm.progress import progress_bar

# ---------------------------------------------------------------------------------------------
# Digit classifier
# ---------------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """Small CNN for digit images (N, C, S, S) in [-1, 1], any C (channels are averaged to gray).

    conv 3x3 (32) -> ReLU -> max-pool 2 -> conv 3x3 (64) -> ReLU -> adaptive avg-pool 4x4
    -> Linear (feature_dim) = features -> ReLU -> Linear (num_classes) = logits. Features are taken
    before the ReLU so no unit is constant zero (a well-conditioned covariance for the Fréchet distance).
    """

    def __init__(self, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(64 * 16, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) penultimate pre-activations, the space of the Fréchet distance."""
        return self.body(images.float().mean(dim=1, keepdim=True))  # gray (N, 1, S, S) -> (N, F)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (N, num_classes) logits


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills in). (N, C, S, S)."""
    n, _, side, _ = images.shape
    padded = F.pad(images, [max_shift] * 4, value=-1.0)  # (N, C, S + 2m, S + 2m)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    rows = offsets[0] + torch.arange(side)  # (N, S)
    cols = offsets[1] + torch.arange(side)  # (N, S)
    batch = torch.arange(n)[:, None, None]
    shifted = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, S, S, C)
    return shifted.permute(0, 3, 1, 2)


def train_digit_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 20, batch_size: int = 64,
                           lr: float = 2e-3, seed: int = 0, feature_dim: int = 64,
                           progress: bool = False) -> DigitClassifier:
    """Fit a ``DigitClassifier`` on real digits (N, C, S, S) in [-1, 1] with labels (N,); CPU, seconds.

    Random shifts of up to S/16 pixels make it judge shape rather than exact position. Returns the
    classifier in eval mode. Deterministic for a given ``seed`` on a given machine.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier(feature_dim=feature_dim, num_classes=int(labels.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(labels) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    max_shift = max(1, images.shape[-1] // 16)
    model.train()
    for _ in progress_bar(range(epochs), desc="classifier", disable=not progress):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            idx = order[start:start + batch_size]
            x = _random_shift(images[idx].float(), max_shift, generator)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def classify(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 512
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted labels (N,), features (N, F))`` for images (N, C, S, S) in [-1, 1]."""
    preds, feats = [], []
    for start in range(0, len(images), batch_size):
        f = classifier.features(images[start:start + batch_size].cpu())
        feats.append(f)
        preds.append(classifier.head(f).argmax(dim=1))
    return torch.cat(preds), torch.cat(feats)


# ---------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------


@dataclass
class DigitsScore:
    """Scores of one set of images; ``frechet_ratio`` = frechet / frechet_floor (1 = as good as real data)."""

    accuracy: float  # fraction classified as the class requested for them
    frechet: float  # Fréchet distance to the real test images in classifier-feature space
    frechet_floor: float  # same distance for as many real training digits with the same labels
    num_images: int

    @property
    def frechet_ratio(self) -> float:
        return self.frechet / max(self.frechet_floor, 1e-12)

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "frechet": self.frechet, "frechet_floor": self.frechet_floor,
                "frechet_ratio": self.frechet_ratio, "num_images": self.num_images}


class DigitsEvaluator:
    """Class accuracy and Fréchet distance of digit images, against a fixed real reference set.

    Args:
        classifier: a trained ``DigitClassifier``.
        train_images, train_labels: real training digits (N, C, S, S), (N,) — the floor's source.
        reference_images: real images (M, C, S, S) the Fréchet distance measures against (the test set).
        seed: picks the training digits of the floor.
    """

    def __init__(self, classifier: DigitClassifier, train_images: torch.Tensor, train_labels: torch.Tensor,
                 reference_images: torch.Tensor, seed: int = 0) -> None:
        self.classifier = classifier.eval()
        _, self.train_features = classify(classifier, train_images)  # (N, F)
        self.train_labels = train_labels.cpu()
        _, ref_features = classify(classifier, reference_images)  # (M, F)
        self.reference_stats = gaussian_statistics(ref_features)
        self.seed = seed

    @classmethod
    def fit(cls, train_images: torch.Tensor, train_labels: torch.Tensor, reference_images: torch.Tensor,
            seed: int = 0, epochs: int = 20, progress: bool = False) -> DigitsEvaluator:
        """Train the classifier on ``train_images`` for ``epochs`` and build the evaluator."""
        classifier = train_digit_classifier(train_images, train_labels, epochs=epochs, seed=seed, progress=progress)
        return cls(classifier, train_images, train_labels, reference_images, seed=seed)

    def floor(self, labels: torch.Tensor) -> float:
        """Fréchet distance to the reference of real training digits with the histogram of ``labels`` (N,)."""
        generator = torch.Generator().manual_seed(self.seed)
        picks = []
        for c, count in zip(*torch.unique(labels.cpu(), return_counts=True), strict=True):
            pool = torch.nonzero(self.train_labels == c).flatten()
            picks.append(pool[torch.randperm(len(pool), generator=generator)[: int(count)]])
        return frechet_distance(*gaussian_statistics(self.train_features[torch.cat(picks)]), *self.reference_stats)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> DigitsScore:
        """Score images (N, C, S, S) in [-1, 1] generated for ``labels`` (N,)."""
        if len(images) != len(labels) or len(images) < 2:
            raise ValueError(f"{len(images)} images and {len(labels)} labels: need equal counts, at least 2")
        preds, features = classify(self.classifier, images)
        accuracy = (preds == labels.cpu()).float().mean().item()
        frechet = frechet_distance(*gaussian_statistics(features), *self.reference_stats)
        return DigitsScore(accuracy=accuracy, frechet=frechet, frechet_floor=self.floor(labels),
                           num_images=len(images))


def digits_evaluator(image_size: int, seed: int = 0) -> DigitsEvaluator:
    """The evaluator of generated digits of side ``image_size``: the classifier fitted on the real training
    digits, the real test digits as the reference."""
    from latentlm.data.digits import DigitsDataset

    train, test = DigitsDataset("train", image_size=image_size), DigitsDataset("test", image_size=image_size)
    return DigitsEvaluator.fit(train.images, train.labels, test.images, seed=seed)


def digits_metrics(samples: Path, num_images: int, evaluator: DigitsEvaluator) -> dict[str, float]:
    """The digit-classifier metrics of the first ``num_images`` generated digits of an ADM ``.npz``
    (``arr_0`` images, ``arr_1`` their classes): class accuracy and the Fréchet distance to the real
    test digits beside its floor. ``ConfigError`` when the file has no labels."""
    from latentlm.config import ConfigError
    from latentlm.io import npz_keys

    if "arr_1" not in npz_keys(samples):
        raise ConfigError(f"{samples} has no arr_1 (labels): the digits metrics score images against their class")
    with np.load(samples, allow_pickle=False) as data:
        images = torch.from_numpy(data["arr_0"][:num_images]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, S, S)
        labels = torch.from_numpy(data["arr_1"][:num_images]).long()  # (N,)
    return evaluator.score(images, labels).as_dict()
