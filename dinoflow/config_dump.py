"""A validated config written down: as YAML (the run's ``config.yaml``) and as MLflow's flat params.

Why a module of its own: tracking writes every run's config, and the stages that only evaluate
ship tracking without the schemas and preset readers of :mod:`dinoflow.config` (a stage's code
travels in its command line, 120 KiB at most).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel


def to_yaml(config: BaseModel) -> str:
    """The resolved config as YAML; loading it back gives an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(config: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted ``section.field -> value`` pairs, as logged to MLflow params."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat
