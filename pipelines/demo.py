"""The demo job: the ``full`` pipeline on this machine, on Fashion-MNIST, with the embedded defaults.

Why: the README's first command must run the platform's real parts end to end. The demo config
(``configs/demo.yaml``) names the recipe, the training budget and where things go; this module
turns it into the pipeline's parameters and checks the recipe before any task starts, so a bad
override fails in a second with nothing written.
"""

from __future__ import annotations

from typing import Any

from components.pretrain import pretrain_config
from dinoflow.config import DemoConfig


def demo_params(config: DemoConfig) -> dict[str, Any]:
    """Parameters of the ``full`` pipeline for the demo (run root and tracking come separately)."""
    return {
        "experiment": config.tracking.experiment,
        "data_source": config.data.source,
        "preset": config.pretrain_preset,
        "overrides": [f"device={config.device}", *config.pretrain_overrides],
        "max_minutes": config.pretrain_minutes,
        "seed": config.seed,
        "train_limit": config.eval_train_limit,
        "test_limit": config.eval_test_limit,
        "knn_k": config.data.knn_k,
        "knn_temperature": config.data.knn_temperature,
        "model_name": config.model_name,
        "metric": f"knn_top1_k{config.data.knn_k}",
        "margin": config.gate_margin,
    }


def check_recipe(config: DemoConfig) -> None:
    """Validate the pretraining recipe the pipeline will build (raises ``ConfigError``)."""
    params = demo_params(config)
    pretrain_config(params["preset"], params["overrides"], "fashion_mnist", params["data_source"],
                    params["max_minutes"], params["seed"])
