"""Whether a pretraining run is collapsing, read off the teacher at every step.

Why: self-distillation has two ways to fail that a loss curve alone does not name (Caron et al.
2021, section 5.3; users of the original meet them with small batches or changed recipes,
facebookresearch/dinov2 #298, #143, #479). The teacher's targets go *uniform* (centring beats
sharpening: every image gets the same flat distribution and the DINO loss sits at ``log K``), or
they all pick *one prototype* (sharpening beats centring: the student copies a constant); and in
either case the backbone's image embeddings can shrink towards one point. Three figures per step
tell these apart, from tensors the step computes anyway (no extra forward pass and no host sync of
their own: they are read with the losses):

* ``target_entropy`` = mean over the teacher's CLS targets ``p`` of ``H(p) / log K``: 1 when uniform;
* ``prototypes_used``: how many distinct prototypes the targets pick (their argmax), of at most
  ``min(rows, K)``: 1 when all pick one;
* ``feature_spread`` = ``sqrt(D)`` times the mean over dimensions of the standard deviation, across
  the batch, of the teacher's L2-normalised CLS embeddings: about 1 for embeddings spread evenly
  over the sphere, 0 when every image has the same one.

:class:`CollapseWatch` turns these into a verdict once the teacher's temperature warm-up is over:
a condition that holds for ``patience`` steps in a row is reported once (a warning, an MLflow tag,
the run's summary), and the run goes on: a person decides whether to stop it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

_log = logging.getLogger(__name__)

UNIFORM_ENTROPY = 0.98  # target_entropy above this: the targets are (nearly) uniform
COLLAPSED_SPREAD = 0.02  # feature_spread below this: the embeddings have (nearly) one value
PATIENCE = 20  # steps in a row a condition must hold before it is reported


@torch.no_grad()
def target_health(targets: Tensor, features: Tensor) -> dict[str, Tensor]:
    """The module docstring's three figures, as 0-d device tensors, of the teacher's CLS targets
    ``(rows, K)`` (probabilities: rows sum to 1) and its CLS embeddings ``(rows, D)``."""
    probs = targets.float()
    num_prototypes = probs.shape[-1]
    entropy = torch.special.entr(probs).sum(dim=-1)  # -p ln p, 0 at p = 0
    picked = torch.zeros(num_prototypes, device=probs.device).index_fill_(0, probs.argmax(dim=-1), 1.0)
    unit = F.normalize(features.float(), dim=-1)
    spread = unit.std(dim=0, correction=0).mean() * math.sqrt(unit.shape[-1])
    return {"target_entropy": entropy.mean() / math.log(num_prototypes), "prototypes_used": picked.sum(),
            "feature_spread": spread}


@dataclass
class CollapseWatch:
    """Judges each step's :func:`target_health` figures (host floats) from step ``start`` on (the
    end of the teacher's temperature warm-up: before it the targets are meant to be soft) and
    reports each condition once, when it has held for ``patience`` steps in a row."""

    start: int = 0
    patience: int = PATIENCE
    uniform_entropy: float = UNIFORM_ENTROPY
    collapsed_spread: float = COLLAPSED_SPREAD
    runs: dict[str, int] = field(default_factory=dict)  # condition -> steps in a row it has held
    reported: dict[str, int] = field(default_factory=dict)  # condition -> step it was reported at

    def conditions(self, health: dict[str, float]) -> dict[str, str]:
        """The collapse conditions ``health`` meets: each one's name and its figure, for a person."""
        found = {}
        if health["target_entropy"] > self.uniform_entropy:
            found["uniform teacher targets"] = f"entropy {health['target_entropy']:.3f} of log K"
        if health["prototypes_used"] < 1.5:
            found["every teacher target picks one prototype"] = "1 prototype picked"
        if health["feature_spread"] < self.collapsed_spread:
            found["image embeddings collapsed to one point"] = f"spread {health['feature_spread']:.4f}"
        return found

    def update(self, step: int, health: dict[str, float]) -> list[str]:
        """Record step ``step``'s figures; returns the conditions newly reported at this step
        (``name (figure)``)."""
        if step < self.start:
            return []
        met = self.conditions(health)
        self.runs = {name: self.runs.get(name, 0) + 1 for name in met}
        new = [name for name, count in self.runs.items() if count >= self.patience and name not in self.reported]
        for name in new:
            self.reported[name] = step
            _log.warning("step %d: the run may be collapsing: %s (%s) for %d steps in a row", step, name, met[name],
                         self.patience)
        return [f"{name} ({met[name]})" for name in new]

    def verdict(self) -> str:
        """``ok``, or the conditions reported and the steps they were first reported at."""
        if not self.reported:
            return "ok"
        return "; ".join(f"{name} at step {step}" for name, step in self.reported.items())
