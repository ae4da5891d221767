"""Logistic regression on frozen features: the original's second classification protocol.

The original (``dinov2/eval/log_regression.py``) fits a multinomial logistic regression with
L-BFGS (cuML's) on the L2-normalised final CLS features, sweeps the inverse regularisation ``C``
over 45 values ``10^p``, ``p`` evenly spaced in ``[-6, 5]``, at most 1,000 iterations each, keeps
the ``C`` that does best on a held-out split and refits it on the whole train set. Here the same
with torch's L-BFGS (strong-Wolfe line search), full-batch on the features' device, minimising
scikit-learn's and cuML's objective ``||W||^2 / 2 + C sum_i CE(W x_i + b, y_i)`` divided by ``C N``:

    L(W, b) = (1 / N) sum_i CE(W x_i + b, y_i) + ||W||^2 / (2 C N)

(the bias unpenalised): the same minimiser, and a loss of the scale of a cross-entropy at every
``C``, so one gradient tolerance fits the whole sweep.

Why beside the linear probe (:mod:`evaluators.linear`): it has no learning rate, batch or epoch
count; at convergence its accuracy is a property of the features alone, which is how backbones
are compared on small transfer sets (the paper's fine-grained benchmarks use it).

Why the sweep runs ``C`` upwards, each fit starting from the last one's solution: the objective
is strictly convex in ``W``, so a warm start changes where the solver ends only within its
tolerance, and fits at large ``C`` (weak regularisation, slow to converge from zero) start near
their optimum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinoflow.progress import progress
from evaluators.features import float32_on
from evaluators.linear import split_train_val

ORIGINAL_C_VALUES: tuple[float, ...] = tuple(float(10.0 ** p) for p in np.linspace(-6, 5, 45))
CHUNK_ROWS = 65_536  # rows of logits made at a time (ImageNet's 1.28M x 1000 classes would be 5 GB at once)
HISTORY = 20  # L-BFGS's curvature pairs: each a copy of W (1024 x 1000 floats for ViT-L on ImageNet)
GRAD_TOLERANCE = 1e-6  # on the largest gradient entry of L, a cross-entropy-sized loss
CHANGE_TOLERANCE = 1e-10


@dataclass(frozen=True)
class LogRegConfig:
    """The sweep: ``c_values`` (inverse regularisation, ascending), at most ``max_iter`` L-BFGS
    iterations per fit, ``val_fraction`` of the train set held out (seeded by ``seed``) to pick ``C``."""

    c_values: tuple[float, ...] = ORIGINAL_C_VALUES
    max_iter: int = 1000
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.c_values or min(self.c_values) <= 0:
            raise ValueError(f"c_values must be positive and non-empty, got {self.c_values}")
        if list(self.c_values) != sorted(self.c_values):
            raise ValueError(f"c_values must be ascending (each fit starts from the last), got {self.c_values}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class LogRegResult:
    """Outcome of :func:`logistic_regression`; accuracies are fractions in [0, 1]."""

    best_c: float
    val_accuracy: float  # of the fit at best_c on the held-out split (trained without it)
    test_accuracy: float  # of the refit on the whole train set
    c_values: tuple[float, ...]
    val_accuracies: tuple[float, ...]  # per C
    num_train: int  # samples the sweep was fit on
    num_val: int
    num_test: int
    num_classes: int
    feature_dim: int
    # the refit classifier tested, (F, C) and (C,): the same fit scores further test sets
    # (ImageNet-C's folders, :func:`logreg_accuracy`) without the sweep again
    weight: Tensor | None = field(default=None, repr=False, compare=False)
    bias: Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """A JSON-able dict (the classifier left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("weight", "bias")}
        out["c_values"], out["val_accuracies"] = list(self.c_values), list(self.val_accuracies)
        return out


def multinomial_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``sum_i CE(logits_i, y_i)``: the multinomial regression's data term, ``labels`` ``(N,)`` class indices."""
    return F.cross_entropy(logits, labels, reduction="sum")


def fit_logistic(features: Tensor, labels: Tensor, num_classes: int, c: float, max_iter: int = 1000,
                 start: tuple[Tensor, Tensor] | None = None,
                 loss: Callable[[Tensor, Tensor], Tensor] = multinomial_loss) -> tuple[Tensor, Tensor]:
    """The minimiser ``(W (F, C), b (C,))`` of the module's ``L`` on ``features`` ``(N, F)`` and
    ``labels`` (rows of ``labels`` go with rows of ``features``), from ``start`` (else zeros), by
    full-batch L-BFGS on the features' device; ``loss``: the data term summed over a chunk of rows
    (the cross-entropy; :func:`evaluators.multilabel.one_vs_rest_loss` for one binary problem per class)."""
    rows, dim = features.shape
    weight = (features.new_zeros(dim, num_classes) if start is None else start[0].clone()).requires_grad_()
    bias = (features.new_zeros(num_classes) if start is None else start[1].clone()).requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=HISTORY,
                                  tolerance_grad=GRAD_TOLERANCE, tolerance_change=CHANGE_TOLERANCE,
                                  line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        """``L`` with its gradient accumulated chunk by chunk (no ``(N, C)`` logits at once)."""
        optimizer.zero_grad()
        penalty = weight.square().sum() / (2 * c * rows)
        penalty.backward()
        total = penalty.detach()
        for first in range(0, rows, CHUNK_ROWS):
            logits = features[first:first + CHUNK_ROWS] @ weight + bias
            part = loss(logits, labels[first:first + CHUNK_ROWS]) / rows
            part.backward()
            total = total + part.detach()
        return total

    with torch.enable_grad():
        optimizer.step(objective)
    return weight.detach(), bias.detach()


def sweep_c(fit: tuple[Tensor, Tensor], held_out: tuple[Tensor, Tensor], width: int, config: LogRegConfig,
            score: Callable[[Tensor, Tensor, Tensor, Tensor], float],
            loss: Callable[[Tensor, Tensor], Tensor] = multinomial_loss,
            ) -> tuple[int, tuple[Tensor, Tensor], list[float]]:
    """Fits on ``fit`` (features, labels) at each of ``config.c_values`` in turn (warm-started), each
    scored on ``held_out`` by ``score(features, labels, W, b)``: the index of the best (ties: the
    smallest ``C``), its solution and every score."""
    scores: list[float] = []
    solution: tuple[Tensor, Tensor] | None = None
    for c in progress(config.c_values, desc="logistic regression: C", unit="C"):
        solution = fit_logistic(*fit, width, c, config.max_iter, solution, loss)
        scores.append(score(*held_out, *solution))
        if scores[-1] > max(scores[:-1], default=-float("inf")):  # the first best: the smallest C among ties
            best, picked = len(scores) - 1, solution
    return best, picked, scores


def predict(features: Tensor, weight: Tensor, bias: Tensor, classes: Tensor | None = None) -> Tensor:
    """Each row's class (among ``classes`` only, if given), chunk by chunk."""
    out = []
    for first in range(0, len(features), CHUNK_ROWS):
        logits = features[first:first + CHUNK_ROWS] @ weight + bias
        out.append(logits.argmax(1) if classes is None else classes[logits[:, classes].argmax(1)])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=features.device)


def normalized(features: Tensor, device: str | torch.device) -> Tensor:
    """The features L2-normalised per row as float32 on ``device`` (the original's input)."""
    return F.normalize(float32_on(features, device), dim=1)


def logistic_regression(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                        config: LogRegConfig = LogRegConfig(), num_classes: int | None = None,
                        device: str | torch.device = "cpu", test_classes: Tensor | None = None) -> LogRegResult:
    """The sweep over ``C`` on the L2-normalised features, picked on the held-out split (ties: the
    smallest ``C``), refit on the whole train set, scored on test (over ``test_classes`` only, if
    given: ImageNet-A and -R's 200 of 1,000)."""
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (N, F) of one width: got train {tuple(train_features.shape)}, "
                         f"test {tuple(test_features.shape)}")
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("features and labels must have the same length")
    classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    features, test_x = normalized(train_features, device), normalized(test_features, device)
    labels, test_y = train_labels.to(device, torch.long), test_labels.to(device, torch.long)
    split = split_train_val(len(features), config.val_fraction, torch.Generator().manual_seed(config.seed))
    fit_rows, val_rows = (rows.to(device) for rows in split)

    def accuracy(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> float:
        return float((predict(x, weight, bias) == y).double().mean())

    best, picked, val_accuracies = sweep_c((features[fit_rows], labels[fit_rows]),
                                           (features[val_rows], labels[val_rows]), classes, config, accuracy)
    weight, bias = fit_logistic(features, labels, classes, config.c_values[best], config.max_iter, picked)
    test_classes = None if test_classes is None else test_classes.to(device)
    test_accuracy = float((predict(test_x, weight, bias, test_classes) == test_y).double().mean())
    return LogRegResult(best_c=config.c_values[best], val_accuracy=val_accuracies[best], test_accuracy=test_accuracy,
                        c_values=tuple(config.c_values), val_accuracies=tuple(val_accuracies),
                        num_train=len(fit_rows), num_val=len(val_rows), num_test=len(test_x), num_classes=classes,
                        feature_dim=features.shape[1], weight=weight, bias=bias)


def logreg_predictions(result: LogRegResult, features: Tensor, test_classes: Tensor | None = None) -> Tensor:
    """Each row's class under ``result``'s refit classifier, on the classifier's device, from another
    test set's ``(M, F)`` final CLS features (raw: L2-normalised here, as its train set's were);
    ``test_classes``: among these classes only, as :func:`logistic_regression`'s."""
    if result.weight is None or result.bias is None:
        raise ValueError("this logistic regression result holds no classifier (made without logistic_regression)")
    device = result.weight.device
    classes = None if test_classes is None else test_classes.to(device)
    return predict(normalized(features, device), result.weight, result.bias, classes)


def logreg_accuracy(result: LogRegResult, features: Tensor, labels: Tensor,
                    test_classes: Tensor | None = None) -> float:
    """Top-1 accuracy of :func:`logreg_predictions` against ``(M,)`` ``labels``. Why: a robustness
    benchmark (ImageNet-C) scores the classifier fit on the clean train set, not a new sweep."""
    predicted = logreg_predictions(result, features, test_classes)
    return float((predicted == labels.to(predicted.device, torch.long)).double().mean()) if len(labels) else 0.0
