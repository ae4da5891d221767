"""Linear probe: the one-pass grid against separate nn.Linear + SGD runs, and against scikit-learn."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch.overrides import TorchFunctionMode

from evaluators.features import float32_on
from evaluators.linear import (
    DEFAULT_BASE_LEARNING_RATES,
    LinearProbeConfig,
    best_by_val,
    init_classifier_grid,
    linear_probe,
    scale_learning_rates,
    feature_scaling,
    scaled,
    split_train_val,
    train_classifier_grid,
)


def blobs(num_samples: int, dim: int, classes: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class centres (the centres depend on ``dim`` and ``classes`` only)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (num_samples,), generator=generator)
    return centres[labels] + spread * torch.randn(num_samples, dim, generator=generator), labels


def reference_sgd(
    weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, lr: float,
    epochs: int, batch_size: int, seed: int, momentum: float, weight_decay: float,
) -> torch.nn.Linear:
    """One classifier the ordinary way: nn.Linear, autograd, torch SGD, CosineAnnealingLR."""
    linear = torch.nn.Linear(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        linear.weight.copy_(weight.T)  # nn.Linear stores (C, F)
        linear.bias.copy_(bias)
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = -(-len(features) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(features), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(linear(features[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return linear


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_one_pass_grid_equals_separate_sgd_runs(weight_decay: float) -> None:
    features, labels = blobs(70, 6, 4, spread=1.0, seed=0)
    learning_rates = (1e-3, 3e-2, 0.3, 1.0)
    epochs, batch_size, seed = 3, 16, 7  # 5 steps per epoch, the last one of 6 samples
    start = init_classifier_grid(len(learning_rates), 6, 4, torch.Generator().manual_seed(0))
    trained = train_classifier_grid(
        start, features, labels, learning_rates, epochs, batch_size, torch.Generator().manual_seed(seed),
        momentum=0.9, weight_decay=weight_decay,
    )
    for g, lr in enumerate(learning_rates):
        linear = reference_sgd(start.weight[g], start.bias[g], features, labels, lr, epochs, batch_size, seed,
                               0.9, weight_decay)
        torch.testing.assert_close(trained.weight[g], linear.weight.detach().T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trained.bias[g], linear.bias.detach(), atol=1e-5, rtol=1e-5)
    # the check has teeth: training moved the weights far beyond the tolerance
    assert (trained.weight[-1] - start.weight[-1]).abs().max() > 0.1


def test_grid_leaves_its_input_alone() -> None:
    features, labels = blobs(20, 3, 2, spread=1.0, seed=1)
    start = init_classifier_grid(2, 3, 2, torch.Generator().manual_seed(0))
    before = start.clone()
    train_classifier_grid(start, features, labels, [0.1, 0.2], 1, 8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(start.weight, before.weight, rtol=0, atol=0)


def test_rows_and_scaling_train_as_the_standardised_subset_would() -> None:
    """The probe trains on the held-out split's rest and standardises batch by batch (so ImageNet's
    features are held once): exactly what training on the standardised subset gives."""
    features, labels = blobs(90, 5, 3, spread=1.0, seed=2)
    features = features * torch.logspace(-2, 2, 5)
    rows = torch.randperm(90, generator=torch.Generator().manual_seed(3))[:70]
    start = init_classifier_grid(3, 5, 3, torch.Generator().manual_seed(0))
    scaling = feature_scaling(features)
    lazily = train_classifier_grid(start, features, labels, [0.01, 0.1, 1.0], 2, 16, torch.Generator().manual_seed(4),
                                   rows=rows, scaling=scaling)
    standardised = scaled(features, scaling)
    eagerly = train_classifier_grid(start, standardised[rows], labels[rows], [0.01, 0.1, 1.0], 2, 16,
                                    torch.Generator().manual_seed(4))
    torch.testing.assert_close(lazily.weight, eagerly.weight, rtol=0, atol=0)
    rest = torch.tensor(sorted(set(range(90)) - set(rows.tolist())))
    torch.testing.assert_close(lazily.accuracies(features, labels, chunk_size=7, rows=rest, scaling=scaling),
                               eagerly.accuracies(standardised[rest], labels[rest]), rtol=0, atol=0)


def test_default_grid_is_the_originals_extended_and_scaled_by_batch_size() -> None:
    assert len(DEFAULT_BASE_LEARNING_RATES) == 16
    assert DEFAULT_BASE_LEARNING_RATES[0] == 1e-5 and DEFAULT_BASE_LEARNING_RATES[12] == 0.1
    assert DEFAULT_BASE_LEARNING_RATES[-1] == 1.0
    assert LinearProbeConfig().base_learning_rates == DEFAULT_BASE_LEARNING_RATES
    assert scale_learning_rates([1e-3, 0.1], 128) == pytest.approx((5e-4, 0.05))


def test_probe_agrees_with_logistic_regression_on_blobs() -> None:
    train_features, train_labels = blobs(800, 24, 6, spread=1.6, seed=0)
    test_features, test_labels = blobs(400, 24, 6, spread=1.6, seed=1)
    result = linear_probe(
        train_features, train_labels, test_features, test_labels, LinearProbeConfig(batch_size=64, epochs=20)
    )
    sklearn_accuracy = (
        LogisticRegression(max_iter=2000)
        .fit(train_features.numpy(), train_labels.numpy())
        .score(test_features.numpy(), test_labels.numpy())
    )
    assert 0.75 < sklearn_accuracy < 0.99  # neither trivial nor hopeless, so agreement means something
    assert result.test_accuracy > 0.75
    assert abs(result.test_accuracy - sklearn_accuracy) < 0.04
    # the selection is the argmax over the grid, and the grid spans useless to good learning rates
    assert result.val_accuracy == max(result.val_accuracies)
    assert result.best_lr == result.learning_rates[result.val_accuracies.index(result.val_accuracy)]
    assert min(result.val_accuracies) < result.val_accuracy
    assert (result.num_train, result.num_val, result.num_test) == (720, 80, 400)


def test_scaling_matches_scikit_learn_and_uses_train_statistics_only() -> None:
    train = torch.randn(300, 5, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 5.0, 30.0, 1e4]) + 7.0
    test = torch.randn(50, 5, dtype=torch.float64) * 3.0
    scaler = StandardScaler().fit(train.numpy())
    scaling = feature_scaling(train, eps=0.0)
    ours_train, ours_test = scaled(train, scaling), scaled(test, scaling)
    np.testing.assert_allclose(ours_train.numpy(), scaler.transform(train.numpy()), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ours_test.numpy(), scaler.transform(test.numpy()), rtol=1e-9, atol=1e-9)


def test_standardised_probe_ignores_the_feature_scale_and_raw_probe_does_not() -> None:
    train_features, train_labels = blobs(600, 16, 5, spread=1.6, seed=4)
    test_features, test_labels = blobs(300, 16, 5, spread=1.6, seed=5)
    scale = torch.logspace(-4, 1, 16)  # badly conditioned, like small SSL features
    config = LinearProbeConfig(batch_size=64, epochs=5)
    unit = linear_probe(train_features, train_labels, test_features, test_labels, config)
    scaled = linear_probe(train_features * scale, train_labels, test_features * scale, test_labels, config)
    assert scaled.test_accuracy == pytest.approx(unit.test_accuracy, abs=0.01)
    raw = linear_probe(train_features * scale, train_labels, test_features * scale, test_labels,
                       LinearProbeConfig(batch_size=64, epochs=5, standardize=False))
    assert raw.test_accuracy < unit.test_accuracy - 0.05


def test_result_is_seeded_and_json_able() -> None:
    train_features, train_labels = blobs(200, 8, 3, spread=1.5, seed=2)
    test_features, test_labels = blobs(100, 8, 3, spread=1.5, seed=3)
    config = LinearProbeConfig(batch_size=32, epochs=2, refit=False, seed=5)
    first = linear_probe(train_features, train_labels, test_features, test_labels, config)
    second = linear_probe(train_features, train_labels, test_features, test_labels, config)
    assert first == second
    as_dict = json.loads(json.dumps(first.to_dict()))
    assert set(as_dict) >= {"best_lr", "val_accuracy", "test_accuracy", "learning_rates", "val_accuracies"}
    assert len(as_dict["val_accuracies"]) == 16 and as_dict["refit"] is False
    assert np.isclose(as_dict["best_lr"], as_dict["best_base_lr"] * 32 / 256)
    refit = linear_probe(train_features, train_labels, test_features, test_labels,
                         LinearProbeConfig(batch_size=32, epochs=2, refit=True, seed=5))
    assert refit.val_accuracies == first.val_accuracies and refit.best_lr == first.best_lr


def test_feature_variant_is_chosen_on_the_held_out_split_never_on_test() -> None:
    informative, labels = blobs(300, 8, 3, spread=1.0, seed=6)
    test_informative, test_labels = blobs(120, 8, 3, spread=1.0, seed=7)
    noise = torch.randn(300, 8, generator=torch.Generator().manual_seed(8))
    config = LinearProbeConfig(batch_size=32, epochs=3)
    probes = {"noise": linear_probe(noise, labels, torch.randn(120, 8), test_labels, config),
              "blobs": linear_probe(informative, labels, test_informative, test_labels, config)}
    assert best_by_val(probes) == "blobs"
    # a variant with a worse held-out score loses even if its test score were the highest
    swapped = {"a": dataclasses.replace(probes["blobs"], test_accuracy=0.0),
               "b": dataclasses.replace(probes["noise"], test_accuracy=1.0)}
    assert best_by_val(swapped) == "a"
    tie = {"first": probes["blobs"], "second": probes["blobs"]}
    assert best_by_val(tie) == "first"
    with pytest.raises(ValueError, match="no probe results"):
        best_by_val({})


def test_bad_arguments_are_named() -> None:
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="feature widths differ: 4 vs 3"):
        linear_probe(x, y, torch.randn(2, 3), y[:2])
    with pytest.raises(ValueError, match="val_fraction must be in"):
        LinearProbeConfig(val_fraction=0.0)
    with pytest.raises(ValueError, match="2 learning rates for 1 classifiers"):
        train_classifier_grid(init_classifier_grid(1, 4, 2), x, y, [0.1, 0.2], 1, 4, torch.Generator())


def test_features_reach_the_probe_device_a_few_rows_at_a_time() -> None:
    """A probe view (a column slice, not contiguous, maybe of another dtype) arrives as float32
    copied in blocks of rows, equal to a whole copy; float32 already there is not copied."""
    features = torch.randn(10, 12, dtype=torch.float64)
    view = features[:, 4:9]
    moved = float32_on(view, "cpu", chunk_rows=3)
    assert moved.is_contiguous() and torch.equal(moved, view.float())
    same = features.float()[:, 4:9]
    assert float32_on(same, "cpu") is same
    if torch.cuda.is_available():  # the GPU path: the same values on the card
        assert torch.equal(float32_on(view, "cuda", chunk_rows=3).cpu(), view.float())


def test_scores_over_some_classes_take_the_best_of_their_logits() -> None:
    """``classes``: each classifier's prediction is the argmax of those classes' logits (by hand
    here), so a sample of one of them is never scored worse than over every class."""
    generator = torch.Generator().manual_seed(0)
    grid = init_classifier_grid(3, 6, 5, generator)
    grid.weight.normal_(generator=generator)
    features, labels = torch.randn(40, 6, generator=generator), torch.randint(0, 5, (40,), generator=generator)
    kept = torch.tensor([1, 3, 4])
    inside = torch.isin(labels, kept)
    logits = grid.logits(features)  # (G, N, C)
    by_hand = (kept[logits[..., kept].argmax(dim=-1)] == labels).double().mean(dim=1)
    torch.testing.assert_close(grid.accuracies(features, labels, classes=kept, chunk_size=7), by_hand)
    restricted = grid.accuracies(features[inside], labels[inside], classes=kept)
    assert (restricted >= grid.accuracies(features[inside], labels[inside])).all()
    every = grid.accuracies(features, labels, classes=torch.arange(5))
    torch.testing.assert_close(every, grid.accuracies(features, labels))


class MetaDevice(TorchFunctionMode):
    """The meta device (torch's, of shapes without data) standing in for a GPU, which this machine
    lacks: the shape of every host tensor taken in by an operation on it is recorded in ``sent``,
    and a meta tensor read back to the host comes as zeros of its shape, so a probe runs to its end."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu and args[0].is_meta:
            return torch.zeros(args[0].shape, dtype=args[0].dtype)
        out = func(*args, **kwargs)
        tensors = [t for t in (*args, *kwargs.values(), out) if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors):
            self.sent += [tuple(t.shape) for t in tensors if t.device.type == "cpu" and t.ndim]
        return out


def test_the_device_receives_a_batch_of_the_features_at_a_time_never_the_matrix() -> None:
    """The features stay on the host (ImageNet's ViT-g/14 views, ~37 GiB, do not fit beside the
    probe on its GPU): training sends a batch of rows at a time, scoring a chunk of 4096 at most;
    the train set's 5000 rows and the test set's 4500 never cross whole."""
    train, labels = blobs(5000, 8, 3, spread=1.0, seed=11)
    test, test_labels = blobs(4500, 8, 3, spread=1.0, seed=12)
    config = LinearProbeConfig(epochs=1, base_learning_rates=(0.1, 1.0))
    with MetaDevice() as device:
        result = linear_probe(train.double(), labels, test, test_labels, config, device="meta")
    assert result.classifier is not None and result.classifier.weight.is_meta  # it trained there
    assert max(rows for rows, *_ in device.sent) == 4096  # a test chunk: the largest that crossed
    assert device.sent.count((256, 8)) == 4500 // 256 + 5000 // 256  # the grid's whole batches, then the refit's


def test_the_probe_equals_its_steps_on_features_standardised_at_once() -> None:
    """Batch by batch from the host, the probe gives bit for bit what its steps give on the whole
    matrix converted and standardised at once (the former path): same seeds, same batches."""
    train, labels = blobs(300, 12, 3, spread=1.0, seed=9)
    test, test_labels = blobs(80, 12, 3, spread=1.0, seed=10)
    wide = torch.cat([train.double(), torch.randn(300, 4, dtype=torch.float64)], dim=1)
    config = LinearProbeConfig(batch_size=32, epochs=2, seed=3)
    result = linear_probe(wide[:, :12], labels, test.double(), test_labels, config)  # a view, not float32
    generator = torch.Generator().manual_seed(3)
    scaling = feature_scaling(train)
    standardised = scaled(train, scaling)
    fit, val = split_train_val(300, config.val_fraction, generator)
    rates = scale_learning_rates(config.base_learning_rates, config.batch_size)
    grid = train_classifier_grid(init_classifier_grid(len(rates), 12, 3, generator), standardised[fit],
                                 labels[fit], rates, config.epochs, config.batch_size, generator)
    val_accuracies = grid.accuracies(standardised[val], labels[val])
    best = int(val_accuracies.argmax())
    chosen = train_classifier_grid(init_classifier_grid(1, 12, 3, generator), standardised, labels, [rates[best]],
                                   config.epochs, config.batch_size, generator)
    assert result.classifier is not None and result.scaling is not None
    assert result.val_accuracies == tuple(val_accuracies.tolist()) and result.best_lr == rates[best]
    for got, want in ((result.classifier.weight, chosen.weight), (result.classifier.bias, chosen.bias),
                      (result.scaling[0], scaling[0]), (result.scaling[1], scaling[1])):
        assert torch.equal(got, want)
    assert result.test_accuracy == float(chosen.accuracies(scaled(test, scaling), test_labels)[0])
