"""Logistic regression on frozen features against scikit-learn's (the same objective, its own
L-BFGS), and the sweep's selection, refit and restricted test classes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

import evaluators.logreg as logreg
from evaluators.logreg import ORIGINAL_C_VALUES, LogRegConfig, fit_logistic, logistic_regression, logreg_accuracy
from tests.evaluators.test_linear import blobs


def objective(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              c: float) -> float:
    """``L`` in float64: the mean cross-entropy + ``||W||^2 / (2 C N)``."""
    logits = features.double() @ weight.double() + bias.double()
    return float(F.cross_entropy(logits, labels) + weight.double().square().sum() / (2 * c * len(features)))


@pytest.mark.parametrize("c", [0.05, 1.0, 30.0])
def test_the_fit_is_scikit_learns_minimiser(c: float) -> None:
    """Random features of 5 classes: the objective no higher than at scikit-learn's solution
    (``C sum CE + ||W||^2 / 2``, bias unpenalised), the weights, the bias up to the shift softmax
    ignores and the probabilities equal to its within both solvers' tolerances, at each ``C``; in
    chunks of 37 rows as in one."""
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(300, 12, generator=generator), dim=1)
    labels = torch.randint(0, 5, (300,), generator=generator)
    reference = LogisticRegression(C=c, tol=1e-12, max_iter=20_000).fit(features.numpy(), labels.numpy())
    their_weight, their_bias = torch.from_numpy(reference.coef_).T.float(), torch.from_numpy(reference.intercept_)
    weight, bias = fit_logistic(features, labels, 5, c)
    theirs = objective(features, labels, their_weight, their_bias, c)
    assert objective(features, labels, weight, bias, c) <= theirs + 5e-7
    torch.testing.assert_close(weight, their_weight, atol=2e-3, rtol=0)
    torch.testing.assert_close(bias - bias.mean(), (their_bias - their_bias.mean()).float(), atol=2e-3, rtol=0)
    probabilities = torch.softmax(features @ weight + bias, dim=1)
    torch.testing.assert_close(probabilities, torch.from_numpy(reference.predict_proba(features.numpy())).float(),
                               atol=1e-3, rtol=0)
    original = logreg.CHUNK_ROWS
    try:
        logreg.CHUNK_ROWS = 37
        chunked = fit_logistic(features, labels, 5, c)
    finally:
        logreg.CHUNK_ROWS = original
    assert objective(features, labels, *chunked, c) == pytest.approx(objective(features, labels, weight, bias, c),
                                                                      abs=2e-7)
    torch.testing.assert_close(chunked[0], weight, atol=2e-3, rtol=0)


def test_a_warm_start_ends_at_the_same_minimiser() -> None:
    """The objective equal to the solvers' tolerance, and so the weights near (the objective is
    flat near its minimum: a fp32 sum in another order moved them 1.7e-3 in a CI run)."""
    features, labels = blobs(400, 16, 4, spread=1.5, seed=0)
    features = F.normalize(features, dim=1)
    cold = fit_logistic(features, labels, 4, 10.0)
    warm = fit_logistic(features, labels, 4, 10.0, start=fit_logistic(features, labels, 4, 0.1))
    assert objective(features, labels, *warm, 10.0) == pytest.approx(objective(features, labels, *cold, 10.0),
                                                                      abs=1e-6)
    torch.testing.assert_close(warm[0], cold[0], atol=1e-2, rtol=0)


def test_the_sweep_picks_c_on_the_held_out_split_and_refits() -> None:
    train_x, train_y = blobs(600, 24, 6, spread=1.6, seed=0)
    test_x, test_y = blobs(300, 24, 6, spread=1.6, seed=1)
    config = LogRegConfig(c_values=(1e-6, 1e-2, 1.0, 100.0))
    result = logistic_regression(train_x, train_y, test_x, test_y, config)
    assert (result.num_train, result.num_val, result.num_test, result.num_classes, result.feature_dim) == (
        540, 60, 300, 6, 24)
    assert result.val_accuracy == max(result.val_accuracies)
    assert result.best_c == config.c_values[result.val_accuracies.index(result.val_accuracy)]
    assert result.val_accuracies[0] < 0.5 < result.val_accuracy  # C = 1e-6 shrinks W to nothing
    normalised = F.normalize(train_x, dim=1).numpy()
    reference = LogisticRegression(C=result.best_c, tol=1e-10, max_iter=20_000).fit(normalised, train_y.numpy())
    want = reference.score(F.normalize(test_x, dim=1).numpy(), test_y.numpy())
    assert result.test_accuracy == pytest.approx(want, abs=1 / 300)  # one image at most, at a tie of logits
    assert result.to_dict()["c_values"] == list(config.c_values)


def test_a_restricted_test_set_is_scored_over_its_classes() -> None:
    train_x, train_y = blobs(400, 16, 5, spread=3.0, seed=2)
    test_x, test_y = blobs(200, 16, 5, spread=3.0, seed=3)
    kept = test_y >= 3
    config = LogRegConfig(c_values=(1.0,))
    whole = logistic_regression(train_x, train_y, test_x[kept], test_y[kept], config, num_classes=5)
    restricted = logistic_regression(train_x, train_y, test_x[kept], test_y[kept], config, num_classes=5,
                                     test_classes=torch.tensor([3, 4]))
    assert restricted.test_accuracy > whole.test_accuracy  # confusions with classes 0-2 are ruled out


def test_the_refit_classifier_scores_further_test_sets() -> None:
    """The refit stays on the result, out of its JSON: on the test set it was scored on it gives
    the result's accuracy, on another (scaled features: normalised again) scikit-learn's refit's."""
    train_x, train_y = blobs(400, 16, 5, spread=2.0, seed=4)
    test_x, test_y = blobs(200, 16, 5, spread=2.0, seed=5)
    other_x, other_y = blobs(150, 16, 5, spread=3.0, seed=6)
    result = logistic_regression(train_x, train_y, test_x, test_y, LogRegConfig(c_values=(0.1, 10.0)))
    assert logreg_accuracy(result, test_x, test_y) == result.test_accuracy
    reference = LogisticRegression(C=result.best_c, tol=1e-10, max_iter=20_000).fit(
        F.normalize(train_x, dim=1).numpy(), train_y.numpy())
    want = reference.score(F.normalize(other_x, dim=1).numpy(), other_y.numpy())
    assert logreg_accuracy(result, other_x * 7.0, other_y) == pytest.approx(want, abs=1 / 150)
    kept = other_y >= 3
    restricted = logistic_regression(train_x, train_y, other_x[kept], other_y[kept], LogRegConfig(c_values=(0.1, 10.0)),
                                     test_classes=torch.tensor([3, 4]))
    assert logreg_accuracy(result, other_x[kept], other_y[kept], torch.tensor([3, 4])) == restricted.test_accuracy
    assert "weight" not in result.to_dict() and "bias" not in result.to_dict()
    with pytest.raises(ValueError, match="holds no classifier"):
        logreg_accuracy(dataclasses.replace(result, weight=None), test_x, test_y)


def test_the_default_sweep_is_the_originals_and_bad_settings_are_named() -> None:
    assert len(ORIGINAL_C_VALUES) == 45
    assert ORIGINAL_C_VALUES[0] == pytest.approx(1e-6) and ORIGINAL_C_VALUES[-1] == pytest.approx(1e5)
    assert np.allclose(np.diff(np.log10(ORIGINAL_C_VALUES)), 11 / 44)
    with pytest.raises(ValueError, match="c_values must be ascending"):
        LogRegConfig(c_values=(1.0, 0.1))
    with pytest.raises(ValueError, match="c_values must be positive"):
        LogRegConfig(c_values=(0.0, 1.0))
    with pytest.raises(ValueError, match="features must be"):
        logistic_regression(torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 5), torch.zeros(2))
