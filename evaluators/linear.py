"""Linear probe on frozen features: a grid of learning rates trained in one pass (DINOv2's protocol).

The original (``dinov2/eval/linear.py``) trains one ``nn.Linear`` per learning rate side by side on
the same mini-batches, then keeps the best. Here the backbone has already been run
(:func:`evaluators.features.extract_features`), so the probe trains on precomputed features:

* **Grid.** The original's 13 base learning rates ``1e-5 ... 0.1`` and three more up to ``1.0``
  (standardised features want larger steps than the original's), each multiplied by
  ``batch_size / 256``. All
  ``G`` classifiers are one weight tensor ``(G, F, C)`` and bias ``(G, C)``; each step runs one
  einsum over the batch and updates all of them. The loss is the sum over classifiers of the
  batch-mean cross-entropy, so each classifier gets exactly the gradient it would get alone.
* **Optimiser.** SGD, momentum 0.9 (torch's rule: ``buf = m * buf + g``, ``p -= lr * buf``),
  weight decay 0 by default (applied to weights and biases, like the original's param groups);
  cosine decay to 0 over all steps, ``lr_t = lr * (1 + cos(pi t / T)) / 2``, as torch's
  ``CosineAnnealingLR(T_max=T)`` stepped after every step.
* **Init.** Weights ``normal(0, 0.01)``, biases 0, as the original's ``LinearClassifier``.
* **Data order.** Each epoch visits every training sample once in the order
  ``torch.randperm(N, generator=...)`` of a seeded CPU generator, in batches of ``batch_size``
  (the last one may be smaller). The original samples a fixed number of iterations with random
  crops and flips; on fixed features there is no augmentation, so epochs are plain passes.
* **Standardised features** (``standardize=True``, the default): each feature dimension is shifted
  and scaled by the train set's mean and standard deviation, i.e. MAE's linear probe (a BatchNorm
  without affine before the classifier, frozen at eval); batch by batch, as the features are read,
  so they are held once (neither a standardised copy nor the held-out split's rest is made). The
  original feeds raw features; on small SSL features the raw scale is badly conditioned for SGD,
  and 10 epochs of it stayed 6-7 points below a converged logistic regression on the same
  features (71.2 % vs 78.0 % on a tiny Fashion-MNIST backbone), while standardised features came
  within one point. ``False`` restores the original's raw input.
* **Memory.** The features stay where the caller holds them (the host, for ImageNet's: ViT-g/14's
  probe views of 1.28M images are ~37 GiB, more than the probe's GPU should hold beside the grid);
  each mini-batch (and each chunk scored) is gathered there and moved to the probe's device, so the
  device holds a batch of them, never the matrix. Same seeds, same batches: the results are those of
  the features moved at once (on a GPU but for the last bits of the standardisation's mean and
  std, now taken on the host).

**Selection.** The original picks the best classifier on ImageNet-val, the set it also reports.
Here a seeded random ``val_fraction`` (10 %) of the train set is held out, the grid is trained on
the rest, and the learning rate with the best held-out accuracy wins (ties: the smallest). With
``refit=True`` (the default, as scikit-learn's ``GridSearchCV``) one classifier is then retrained
at that learning rate on the whole train set, with the same recipe, and that one is scored on test;
with ``refit=False`` the selected grid member itself (trained on 90 %) is scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor

from dinoflow.progress import progress
from evaluators.features import float32_on

DEFAULT_BASE_LEARNING_RATES: tuple[float, ...] = (
    1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1, 1.0,
)
REFERENCE_BATCH_SIZE = 256  # learning rates are given for this batch size and scaled linearly
INIT_STD = 0.01
Scaling = tuple[Tensor, Tensor]  # per feature: the train set's mean, and its std + eps


def scale_learning_rates(base_learning_rates: Sequence[float], batch_size: int) -> tuple[float, ...]:
    """The linear scaling rule: ``lr * batch_size / 256`` for each base learning rate."""
    return tuple(lr * batch_size / REFERENCE_BATCH_SIZE for lr in base_learning_rates)


def cosine_factor(step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): ``(1 + cos(pi step / T)) / 2``."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


@dataclass
class ClassifierGrid:
    """``G`` linear classifiers over ``F`` features and ``C`` classes, stored together."""

    weight: Tensor  # (G, F, C)
    bias: Tensor  # (G, C)

    def logits(self, features: Tensor) -> Tensor:
        """Features ``(B, F)`` -> logits ``(G, B, C)``."""
        # b: batch, f: feature, g: classifier, c: class
        return torch.einsum("bf,gfc->gbc", features, self.weight) + self.bias[:, None, :]

    def predict(self, features: Tensor, classes: Tensor | None = None) -> Tensor:
        """Each classifier's class for each row of ``(B, F)`` features, ``(G, B)``; ``classes``: the
        best of these classes' logits, the others left out."""
        logits = self.logits(features)  # (G, B, C)
        return logits.argmax(dim=-1) if classes is None else classes[logits[..., classes].argmax(dim=-1)]

    def accuracies(self, features: Tensor, labels: Tensor, chunk_size: int = 4096, rows: Tensor | None = None,
                   scaling: Scaling | None = None, classes: Tensor | None = None) -> Tensor:
        """Top-1 accuracy of each classifier ``(G,)`` on ``(N, F)`` features and ``(N,)`` labels
        (``rows``: on those rows only; ``scaling``: each chunk standardised as it is read;
        ``classes``: the prediction is the best of these classes' logits, the others left out)."""
        count = len(features) if rows is None else len(rows)
        correct = torch.zeros(len(self.weight), dtype=torch.long, device=self.weight.device)
        kept = None if classes is None else classes.to(self.weight.device)
        for start in range(0, count, chunk_size):
            index = slice(start, start + chunk_size) if rows is None else rows[start : start + chunk_size].cpu()
            x = scaled(features[index].to(self.weight), scaling)
            y = labels[index].to(self.weight.device)
            correct += (self.predict(x, kept) == y).sum(dim=1)  # (G,)
        return correct.double().cpu() / max(count, 1)

    def clone(self) -> ClassifierGrid:
        return ClassifierGrid(self.weight.clone(), self.bias.clone())


def init_classifier_grid(
    num_classifiers: int,
    feature_dim: int,
    num_classes: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> ClassifierGrid:
    """Weights ``normal(0, 0.01)``, biases 0 (drawn on the CPU, so any device gets the same values)."""
    weight = torch.randn(num_classifiers, feature_dim, num_classes, generator=generator, dtype=dtype) * INIT_STD
    bias = torch.zeros(num_classifiers, num_classes, dtype=dtype)
    return ClassifierGrid(weight.to(device), bias.to(device))


def epoch_batches(num_samples: int, batch_size: int, epochs: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index batches: per epoch one ``torch.randperm(num_samples, generator=generator)``, cut in order."""
    for _ in range(epochs):
        order = torch.randperm(num_samples, generator=generator)
        yield from order.split(batch_size)


@torch.no_grad()
def train_classifier_grid(
    grid: ClassifierGrid,
    features: Tensor,
    labels: Tensor,
    learning_rates: Sequence[float],
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    rows: Tensor | None = None,
    scaling: Scaling | None = None,
) -> ClassifierGrid:
    """SGD with momentum and cosine decay on all classifiers at once; returns a trained copy.

    Args:
        grid: the starting classifiers (not modified), one per learning rate.
        features: ``(N, F)`` training features, on any device: each batch is gathered there and moved
            to the grid's, never the whole matrix (ImageNet's ViT-g/14 views: ~37 GiB on the host).
        labels: ``(N,)`` int class indices, on any device (gathered as the features are).
        learning_rates: ``G`` peak learning rates (already scaled for the batch size).
        epochs: passes over the data; the cosine runs over ``epochs * ceil(N / batch_size)`` steps.
        batch_size: samples per step.
        generator: CPU generator drawing each epoch's order.
        momentum, weight_decay: SGD's.
        rows: train on these rows of ``features`` only (the held-out split's rest), picked batch by
            batch: no copy of the features is made.
        scaling: standardise each batch as it is read (:func:`feature_scaling`): the features stay
            as given, one copy in memory (ImageNet's ViT-L/14 probe views: 26 GB).
    """
    num_classifiers = len(grid.weight)
    if len(learning_rates) != num_classifiers:
        raise ValueError(f"{len(learning_rates)} learning rates for {num_classifiers} classifiers")
    if len(features) != len(labels) or len(features) == 0 or (rows is not None and len(rows) == 0):
        raise ValueError(f"need as many labels as features (> 0): {len(features)} vs {len(labels)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    device, dtype = grid.weight.device, grid.weight.dtype
    peak = torch.tensor(learning_rates, dtype=dtype, device=device)  # (G,)
    weight, bias = grid.weight.clone(), grid.bias.clone()
    weight_buffer, bias_buffer = torch.zeros_like(weight), torch.zeros_like(bias)
    count = len(features) if rows is None else len(rows)
    rows = None if rows is None else rows.cpu()  # (CPU indices gather from a tensor on any device)
    total_steps = epochs * math.ceil(count / batch_size)

    batches = epoch_batches(count, batch_size, epochs, generator)
    for step, index in enumerate(progress(batches, desc="linear probe", total=total_steps, unit="step")):
        index = index if rows is None else rows[index]
        x = scaled(features[index].to(device=device, dtype=dtype), scaling)  # (B, F): a batch crosses
        y = labels[index].to(device=device, dtype=torch.long)  # (B,)
        logits = torch.einsum("bf,gfc->gbc", x, weight) + bias[:, None, :]  # (G, B, C)
        # d(mean cross-entropy)/d(logits) = (softmax - one_hot) / B, for each classifier
        grad_logits = logits.softmax(dim=-1)
        grad_logits[:, torch.arange(len(y), device=device), y] -= 1.0
        grad_logits /= len(y)
        grad_weight = torch.einsum("bf,gbc->gfc", x, grad_logits)  # (G, F, C)
        grad_bias = grad_logits.sum(dim=1)  # (G, C)
        if weight_decay:
            grad_weight += weight_decay * weight
            grad_bias += weight_decay * bias
        weight_buffer.mul_(momentum).add_(grad_weight)
        bias_buffer.mul_(momentum).add_(grad_bias)
        lr = peak * cosine_factor(step, total_steps)  # (G,)
        weight -= lr[:, None, None] * weight_buffer
        bias -= lr[:, None] * bias_buffer
    return ClassifierGrid(weight, bias)


@dataclass(frozen=True)
class LinearProbeConfig:
    """How the probe trains and selects; the defaults follow the original where it applies.

    Args:
        base_learning_rates: the grid, for batch size 256 (scaled by ``batch_size / 256``).
        batch_size: samples per SGD step.
        epochs: passes over the training features.
        momentum, weight_decay: SGD's.
        val_fraction: share of the train set held out to pick the learning rate.
        refit: retrain at the best learning rate on the whole train set before testing.
        standardize: scale each feature by the train set's mean and standard deviation first.
        seed: seeds the split, the initial weights and the data order.
    """

    base_learning_rates: tuple[float, ...] = DEFAULT_BASE_LEARNING_RATES
    batch_size: int = 256
    epochs: int = 10
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    refit: bool = True
    standardize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.base_learning_rates or min(self.base_learning_rates) <= 0:
            raise ValueError(f"base_learning_rates must be positive and non-empty, got {self.base_learning_rates}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self.batch_size} and {self.epochs}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class LinearProbeResult:
    """Outcome of :func:`linear_probe`; accuracies are fractions in [0, 1]."""

    best_lr: float  # the scaled learning rate that won on the held-out split
    best_base_lr: float  # the same, before batch-size scaling
    val_accuracy: float  # held-out accuracy of the winner (trained without the held-out part)
    test_accuracy: float  # of the refit classifier when refit, else of the winner itself
    learning_rates: tuple[float, ...]  # the scaled grid, in order
    val_accuracies: tuple[float, ...]  # held-out accuracy per grid entry
    refit: bool
    num_train: int  # samples the grid was trained on
    num_val: int
    num_test: int
    num_classes: int
    feature_dim: int
    config: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    # the classifier tested and the train set's scaling it reads through: the same trained probe
    # scores further test sets (ImageNet-C's 75 folders, :func:`probe_accuracy`) without retraining
    classifier: ClassifierGrid | None = field(default=None, repr=False, compare=False)
    scaling: Scaling | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """A JSON-able dict (the config nested under ``"config"``; the classifier and scaling left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("classifier", "scaling")}
        out["config"] = asdict(self.config)
        out["learning_rates"] = list(self.learning_rates)
        out["val_accuracies"] = list(self.val_accuracies)
        out["config"]["base_learning_rates"] = list(self.config.base_learning_rates)
        return out


def split_train_val(num_samples: int, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Seeded random split of ``range(num_samples)``: ``(train_index, val_index)``, val has
    ``round(val_fraction * N)`` samples (at least 1, and at least 1 left to train on)."""
    num_val = max(1, round(val_fraction * num_samples))
    if num_val >= num_samples:
        raise ValueError(f"cannot hold out {val_fraction:.0%} of {num_samples} samples and still train")
    order = torch.randperm(num_samples, generator=generator)
    return order[num_val:], order[:num_val]


def feature_scaling(train: Tensor, eps: float = 1e-6) -> Scaling:
    """Per feature, the mean and (biased) std + ``eps`` of ``train``: :func:`scaled`'s shift and scale."""
    return train.mean(dim=0), train.std(dim=0, unbiased=False) + eps


def scaled(x: Tensor, scaling: Scaling | None) -> Tensor:
    """``(x - mean) / (std + eps)`` per feature with ``scaling`` from :func:`feature_scaling`; ``x`` when None."""
    return x if scaling is None else (x - scaling[0]) / scaling[1]


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    config: LinearProbeConfig = LinearProbeConfig(),
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    test_classes: Tensor | None = None,
) -> LinearProbeResult:
    """Train the learning-rate grid on frozen features, pick on a held-out split, score on test.

    Args:
        train_features, test_features: ``(N, F)`` and ``(M, F)`` raw features.
        train_labels, test_labels: ``(N,)`` and ``(M,)`` int class indices.
        config: the recipe (see :class:`LinearProbeConfig`).
        num_classes: C; None means ``1 + the largest label`` seen in train or test.
        device: where training runs; the features stay where they are, a batch at a time moved there.
        test_classes: score the test set over these classes' logits only (ImageNet-A and -R's
            protocol: 200 of the 1000 classes); the probe trains and is picked on all of them.
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be (N, F): got train {tuple(train_features.shape)}, test {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: {train_features.shape[1]} vs {test_features.shape[1]}")
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("features and labels must have the same length")
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    feature_dim = train_features.shape[1]
    generator = torch.Generator().manual_seed(config.seed)
    learning_rates = scale_learning_rates(config.base_learning_rates, config.batch_size)
    # the train features where the caller holds them (a float32 copy there only when they are not
    # float32), standardised batch by batch: the held-out split and the standardised values are
    # never materialised, and the device receives a batch at a time (the test features a chunk)
    features = float32_on(train_features, train_features.device)
    labels = train_labels.long()
    scaling = None
    if config.standardize:
        mean, std = feature_scaling(features)
        scaling = mean.to(device), std.to(device)

    fit_index, val_index = split_train_val(len(features), config.val_fraction, generator)
    grid = init_classifier_grid(len(learning_rates), feature_dim, classes, generator, device=device)
    grid = train_classifier_grid(
        grid, features, labels, learning_rates, config.epochs, config.batch_size,
        generator, config.momentum, config.weight_decay, rows=fit_index, scaling=scaling,
    )
    val_accuracies = grid.accuracies(features, labels, rows=val_index, scaling=scaling)  # (G,)
    best = int(val_accuracies.argmax())  # first maximum: the smallest learning rate among ties

    if config.refit:
        chosen = init_classifier_grid(1, feature_dim, classes, generator, device=device)
        chosen = train_classifier_grid(
            chosen, features, labels, [learning_rates[best]], config.epochs, config.batch_size,
            generator, config.momentum, config.weight_decay, scaling=scaling,
        )
    else:
        # copies: the result keeps one classifier, not the whole grid's storage behind a view of it
        chosen = ClassifierGrid(grid.weight[best : best + 1].clone(), grid.bias[best : best + 1].clone())
    test_accuracy = float(chosen.accuracies(test_features, test_labels, scaling=scaling, classes=test_classes)[0])

    return LinearProbeResult(
        best_lr=learning_rates[best],
        best_base_lr=config.base_learning_rates[best],
        val_accuracy=float(val_accuracies[best]),
        test_accuracy=test_accuracy,
        learning_rates=learning_rates,
        val_accuracies=tuple(float(a) for a in val_accuracies),
        refit=config.refit,
        num_train=len(fit_index),
        num_val=len(val_index),
        num_test=len(test_features),
        num_classes=classes,
        feature_dim=feature_dim,
        config=config,
        classifier=chosen,
        scaling=scaling,
    )


def probe_accuracy(result: LinearProbeResult, features: Tensor, labels: Tensor,
                   test_classes: Tensor | None = None) -> float:
    """Top-1 accuracy of ``result``'s tested classifier on another test set's ``(M, F)`` features
    (the same view as it trained on, raw: standardised here by the train set's scaling) and ``(M,)``
    labels; ``test_classes``: over these classes' logits only, as :func:`linear_probe`'s. Why: a
    robustness benchmark (ImageNet-C) scores the probe trained on the clean train set, not a new one.
    The features go to the classifier's device a chunk at a time."""
    if result.classifier is None:
        raise ValueError("this probe result holds no classifier (made without linear_probe)")
    return float(result.classifier.accuracies(features, labels, scaling=result.scaling, classes=test_classes)[0])


def probe_predictions(result: LinearProbeResult, features: Tensor, chunk_size: int = 4096) -> Tensor:
    """The class ``result``'s tested classifier predicts for each row of raw ``(M, F)`` features
    (standardised here by the train set's scaling, as :func:`probe_accuracy` reads them), ``(M,)``:
    what a score other than top-1 accuracy needs (ImageNet-ReaL's sets of right classes)."""
    if result.classifier is None:
        raise ValueError("this probe result holds no classifier (made without linear_probe)")
    classifier, out = result.classifier, []
    for start in range(0, len(features), chunk_size):
        out.append(classifier.predict(scaled(features[start:start + chunk_size].to(classifier.weight),
                                             result.scaling))[0].cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def best_by_val(results: Mapping[str, LinearProbeResult]) -> str:
    """The name of the feature variant whose probe won on the held-out split (ties: the first).

    The original's linear evaluation trains classifiers on several views of the same frozen
    backbone at once (the CLS token of the last 1 or 4 blocks, with or without the mean patch
    token) and reports the one that is best on validation; this applies that rule to probes run
    on each view, so the choice never looks at test accuracy.
    """
    if not results:
        raise ValueError("no probe results to choose from")
    return max(results, key=lambda name: results[name].val_accuracy)
