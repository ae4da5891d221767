"""A backbone as an MLflow model: safetensors weights + architecture config, loadable anywhere.

Why: the registry holds models a user can load with ``mlflow.pyfunc.load_model`` and call on
images without dinoflow's training code paths in mind. The package is an MLflow ``pyfunc``
folder: the weights (``backbone.safetensors``, tensors only: loading never runs pickled code),
``config.json`` (architecture), this module and the model code (``code_paths``), explicit pip
requirements and an input example. ``predict`` takes uint8 images ``(N, H, W)`` or
``(N, 3, H, W)`` and returns the final normalised CLS features ``(N, D)`` float32, exactly as
:func:`evaluators.features.extract_features` computes them; a fine-tuned model packaged with its
classifier (``classifier.safetensors``, its class names in ``config.json`` as ``classes`` and the
transform its evaluation prepared images with as ``eval_transform``, when the classifier records
one: :data:`~trainer.models.classifier.EVAL_TRANSFORMS`) returns the class probabilities
``(N, C)`` instead.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ("torch", "numpy", "safetensors", "pydantic", "pyyaml", "fsspec", "s3fs", "tqdm")


class BackbonePyfunc(mlflow.pyfunc.PythonModel):
    """The package's model (MLflow calls ``load_context`` once, then ``predict``)."""

    def load_context(self, context: Any) -> None:
        from dinoflow.storage import Storage
        from trainer.models.classifier import load_classifier
        from trainer.models.hub import load_backbone

        self.patch_size = json.loads(Path(context.artifacts["config"]).read_text())["patch_size"]
        self.backbone = load_backbone(context.artifacts["weights"], "safetensors").eval()
        classifier = context.artifacts.get("classifier")
        self.classifier = load_classifier(self.backbone, classifier, Storage())[0] if classifier else None

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        return predictions(self.backbone, self.classifier, self.patch_size, model_input)


def predictions(backbone: Any, classifier: Any, patch_size: int, images: Any) -> np.ndarray:
    """What the package returns for uint8 images ``(N, H, W)`` or ``(N, 3, H, W)``: :func:`cls_features`,
    or with a classifier (:class:`trainer.models.classifier.Classifier` around ``backbone``) its
    class probabilities ``(N, C)``."""
    from trainer.models.classifier import class_probabilities

    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
        raise ValueError(f"images must be uint8 (N, H, W) or (N, 3, H, W), got {array.dtype} {array.shape}")
    if classifier is None:
        return cls_features(backbone, patch_size, array)
    return class_probabilities(classifier, array, patch_size)


def cls_features(backbone: Any, patch_size: int, images: np.ndarray) -> np.ndarray:
    """Final normalised CLS features ``(N, D)`` of uint8 images (checked by :func:`predictions`)."""
    import torch

    from evaluators.features import labelled_features

    return labelled_features(backbone, torch.from_numpy(images), patch_size).numpy()


def pinned_requirements() -> list[str]:
    """``name==version`` of what the model needs at load time, as installed here."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]  # no +cpu tags


def save_mlflow_model(weights: str | Path, config: dict[str, Any], path: str | Path,
                      example: np.ndarray, classifier: str | Path | None = None) -> Path:
    """Write the pyfunc folder at ``path`` (must not exist) and return it.

    The model is "from code" (MLflow 3): the package stores this module's entry file, not a
    pickle, so loading it runs only dinoflow's own source.

    Args:
        weights: a backbone ``.safetensors`` written by :func:`trainer.models.hub.save_backbone`.
        config: JSON-able architecture facts; must hold ``patch_size``.
        path: where the folder goes.
        example: a small uint8 image batch stored as the input example.
        classifier: a fine-tuned backbone's ``classifier.safetensors``
            (:func:`trainer.models.classifier.save_classifier`): the model predicts class
            probabilities, its class names written into ``config.json`` as ``classes`` and its
            evaluation transform as ``eval_transform`` (none for a classifier saved before the
            record existed: the server infers it from the classes).
    """
    from mlflow.models import infer_signature

    from dinoflow.storage import Storage
    from trainer.models.classifier import EVAL_TRANSFORM_KEY, load_classifier, saved_eval_transform
    from trainer.models.hub import load_backbone

    if "patch_size" not in config:
        raise ValueError(f"config must hold patch_size, got keys {sorted(config)}")
    path = Path(path)
    inputs = path.parent / f".{path.name}.inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(str(weights), "safetensors").eval()
    model, artifacts = None, {"weights": str(weights)}
    if classifier is not None:
        model, classes = load_classifier(backbone, str(classifier), Storage())
        transform = saved_eval_transform(str(classifier), Storage())
        config = {**config, "classes": list(classes), **({EVAL_TRANSFORM_KEY: transform} if transform else {})}
        artifacts["classifier"] = str(classifier)
    config_file = inputs / "config.json"
    config_file.write_text(json.dumps(config, indent=2))
    signature = infer_signature(example, predictions(backbone, model, config["patch_size"], example))
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(Path(__file__).with_name("mlflow_entry.py")),
        artifacts={**artifacts, "config": str(config_file)},
        code_paths=[str(PACKAGE_ROOT / name) for name in ("trainer", "evaluators", "dinoflow")],
        pip_requirements=pinned_requirements(),
        input_example=example,
        signature=signature,
    )
    return path
