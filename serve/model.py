"""A served backbone: loaded from an MLflow model URI or a weight file, and its features.

Why one decode path: the service, the index builder, the training data loaders and the evaluations
must turn the same bytes into the same pixels, so images are decoded by
:func:`trainer.data.datasets.read_image` (RGB, upright as their EXIF orientation says, shorter side
resized bicubic, the centre square kept) and prepared as the k-NN, linear and fine-tuned
classifiers' scores were (:mod:`evaluators.classification`): decoded at ``image_size / 0.875``
(256 px for 224), the centre ``image_size`` square kept (:func:`decode_upload`); a classifier whose
fine-tuning scored whole images resized to ``image_size`` (Fashion-MNIST's 28 px ones: its recorded
``eval_transform`` is ``whole``, :attr:`ServedModel.whole_images`) has its uploads decoded at
``image_size``, uncropped. The features are the library's: the CLS feature is
:func:`evaluators.features.extract_features` (``layers=1``) on :func:`to_model_input` of those
pixels. Unlike ``decode_image``, a bad image raises :class:`ImageError` with the reason, because
the reason goes back to the client.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import UnidentifiedImageError
from torch import Tensor

from dinoflow.registry import CHAMPION, answered, parse_registry_uri, registry_client, registry_store
from dinoflow.run_files import BACKBONE_FILE, CLASSIFIER_FILE
from dinoflow.storage import Storage
from evaluators.classification import CROP_RATIO, eval_load_size
from evaluators.features import to_model_input
from trainer.data.datasets import (
    DECODE_ERRORS,
    DECODE_FORMATS,
    TooManyPixels,
    read_image,
)
from trainer.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES

FEATURE_KINDS = ("cls", "pooled", "patch")
# the pixels :func:`decode_upload` makes (centre-cropped, or whole), recorded in an index (serve.index): one
# built otherwise is refused
PIXEL_TRANSFORM = f"upright (EXIF), shorter side to round(image_size / {CROP_RATIO}), centre image_size square"
WHOLE_TRANSFORM = "upright (EXIF), shorter side to image_size, centre image_size square"


class ImageError(ValueError):
    """An upload that is not a decodable image within the limits; the message says why."""


@dataclass
class ServedModel:
    """A backbone in eval mode with the facts the service needs.

    Attributes:
        backbone: a :class:`~trainer.models.vit.DinoVisionTransformer` (eval mode, CPU or GPU).
        patch_size: its patch side.
        image_size: the side of the centre square the model sees (a multiple of patch_size):
            :func:`decode_upload`.
        name: where it came from (URI), shown by ``/healthz``.
        version: the registry version for ``models:/`` URIs (an alias resolved when loading), else None.
        classifier: a fine-tuned model's :class:`~trainer.models.classifier.Classifier` around
            ``backbone`` (its class probabilities are served), else None.
        classes: the classifier's class names.
        whole_images: the model's evaluation scored whole images resized to ``image_size`` (its
            classifier's recorded ``eval_transform`` is ``whole``, as Fashion-MNIST's are:
            :meth:`~evaluators.classification.FashionMnistImages.test_batches`), so uploads are
            decoded at ``image_size``; else, as class folders' images were, at ``image_size / 0.875``
            with the centre ``image_size`` square kept (:func:`load_size`).
    """

    backbone: Any
    patch_size: int
    image_size: int
    name: str
    version: str | None = None
    classifier: Any = None
    classes: tuple[str, ...] = ()
    whole_images: bool = False

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    @property
    def transform(self) -> str:
        """The pixels :func:`decode_upload` makes for this model, in words (an index records them)."""
        return WHOLE_TRANSFORM if self.whole_images else PIXEL_TRANSFORM

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def embed(self, pixels: Tensor) -> dict[str, Tensor]:
        """Features of uint8 images ``(B, 3, S, S)``: ``cls`` ``(B, D)``, ``pooled`` ``(B, D)`` (mean of the
        normalised patch tokens, registers excluded) and ``patch`` ``(B, h*w, D)``, float32 on the CPU;
        with a classifier also ``probabilities`` ``(B, C)``, its softmax over the classes (from the
        same forward pass: the classifier reads the CLS token and the mean patch token).

        ``cls`` equals ``extract_features(backbone, to_model_input(pixels), layers=1)``; ``pooled`` is the
        ``with_patch_mean`` part of the same function.
        """
        device = next(self.backbone.parameters()).device
        inputs = to_model_input(pixels.to(device), patch_size=self.patch_size)  # (B, 3, S, S) float, made there
        with torch.inference_mode():
            blocks = self.backbone.get_intermediate_layers(inputs, n=1, return_class_token=True)
            patch, cls = blocks[-1]  # (B, h*w, D), (B, D): the last block through the final norm
            pooled = patch.mean(dim=1)
            outputs = {"cls": cls.float().cpu(), "pooled": pooled.float().cpu(), "patch": patch.float().cpu()}
            if self.classifier is not None:
                outputs["probabilities"] = self.classifier.logits(cls, pooled).float().softmax(dim=-1).cpu()
        return outputs

    def attention(self, pixels: Tensor) -> dict[str, Tensor]:
        """Where the backbone looks in uint8 images ``(B, 3, S, S)``: ``maps`` ``(B, heads, h, w)``
        (the last block's CLS attention over the patches), ``high_norm`` ``(B, h, w)`` (each image's
        high-norm patch tokens), ``masks`` ``(B, h, w)`` (the mean map's attention mask) and
        ``on_patches`` ``(B,)`` (the CLS attention mass on the patches), on the CPU:
        :func:`evaluators.attention.attention_summary`, per image."""
        from evaluators.attention import attention_summary

        with torch.inference_mode():
            summary = attention_summary(self.backbone, to_model_input(pixels, patch_size=self.patch_size))
        return {name: summary[name] for name in ("maps", "high_norm", "masks", "on_patches")}


def centre_crop(pixels: Tensor, size: int) -> Tensor:
    """The centre ``size`` square of images ``(..., S, S)``, at the evaluations' offset."""
    offset = (pixels.shape[-1] - size) // 2
    return pixels[..., offset:offset + size, offset:offset + size]


def load_size(image_size: int, whole_images: bool) -> int:
    """The side an image is decoded at (its shorter side resized, the centre square kept) before its
    centre ``image_size`` square is kept: ``image_size`` itself for a model scored on whole images
    (:attr:`ServedModel.whole_images`), else the evaluations' ``image_size / 0.875``."""
    return image_size if whole_images else eval_load_size(image_size)


def decode_upload(data: bytes, image_size: int, max_pixels: int, whole_images: bool = False) -> Tensor:
    """Encoded image bytes -> uint8 ``(3, image_size, image_size)``, the evaluations' input (module
    docstring; ``whole_images``: :attr:`ServedModel.whole_images`); :class:`ImageError` says why not."""
    if not data:
        raise ImageError("empty file: expected a JPEG, PNG, WebP, GIF or BMP image")
    try:
        return centre_crop(read_image(data, load_size(image_size, whole_images), max_pixels), image_size)
    except TooManyPixels as err:
        raise ImageError(f"image is {err.width}x{err.height} = {err.width * err.height} pixels; "
                         f"the limit is {err.max_pixels}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image ({len(data)} bytes): allowed formats are {', '.join(DECODE_FORMATS)}") from None
    except DECODE_ERRORS as err:
        raise ImageError(f"broken image ({type(err).__name__}: {err})") from None


def split_frames(uploads: list[bytes], max_frames: int, max_pixels: int) -> list[bytes]:
    """Each upload as its frames, in order: an animated GIF, PNG or WebP gives one PNG per frame
    (each composited as a viewer shows it); any other upload stays as it is (:func:`decode_upload`
    then says what is wrong with it). :class:`ImageError` when there are more than ``max_frames``
    frames in all, or an animated file has more than ``max_pixels`` pixels per frame.
    """
    from PIL import Image, ImageSequence

    from trainer.data.datasets import to_rgb

    frames: list[bytes] = []
    for data in uploads:
        try:
            image = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
        except DECODE_ERRORS:
            frames.append(data)
            continue
        with image:
            count = getattr(image, "n_frames", 1)
            if len(frames) + count > max_frames:
                raise ImageError(f"{len(frames) + count} frames in one request; the limit is {max_frames}")
            if count == 1:
                frames.append(data)
                continue
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"animated image is {width}x{height} = {width * height} pixels per frame; "
                                 f"the limit is {max_pixels}")
            try:
                for frame in ImageSequence.Iterator(image):
                    buffer = io.BytesIO()
                    to_rgb(frame).save(buffer, format="PNG")
                    frames.append(buffer.getvalue())
            except DECODE_ERRORS as err:
                raise ImageError(f"broken animated image ({type(err).__name__}: {err})") from None
    return frames


def resolve_alias(name: str, alias: str) -> str:
    """The version the registry alias points at now, in :func:`~dinoflow.registry.registry_store`'s store."""
    return str(registry_client().get_model_version_by_alias(name, alias).version)


def is_mlflow_model(uri: str) -> bool:
    """Whether ``uri`` names an MLflow model: ``models:/...``, ``runs:/...`` or a folder with ``MLmodel``."""
    return uri.startswith(("models:/", "runs:/")) or (Path(uri) / "MLmodel").is_file()


def load_served_model(uri: str, image_size: int | None = None, device: str = "cpu",
                      storage: Storage | None = None) -> ServedModel:
    """Load ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/<name>`` (its
    champion), ``runs:/...``, an MLflow model folder, or backbone weights (path or URI) in any layout
    :func:`~trainer.models.hub.locate_weights` finds from the path: a ``.safetensors`` file, a run
    folder, Meta's released ``.pth``, a Hugging Face folder.

    MLflow models are loaded through ``mlflow.pyfunc.load_model`` (a ``models:/`` or ``runs:/`` URI
    fetched from :func:`~dinoflow.registry.registry_store`'s store, as every command resolves one)
    and unwrapped to dinoflow's :class:`~trainer.models.packaging.BackbonePyfunc`. An alias is
    resolved to its version first and that exact version is loaded, so :attr:`ServedModel.version`
    is the one served even if the alias moves meanwhile. ``image_size`` defaults to the package's
    ``config.json`` ``image_size``, else the backbone's own ``img_size``. ``storage`` reads weight
    files (S3 settings); MLflow reads its artifacts itself. A fine-tuned model comes with its
    classifier: a package made with one, or a ``classifier.safetensors`` beside the
    ``backbone.safetensors`` of a fine-tuning run's folder. Its uploads are prepared as its
    evaluation prepared images, as recorded when it was saved (:func:`served_whole_images`).
    """
    from trainer.models.classifier import (EVAL_TRANSFORM_KEY, checked_eval_transform, load_classifier,
                                           saved_eval_transform)
    from trainer.models.hub import load_backbone, locate_weights

    config: dict[str, Any] = {}
    version, classifier, classes, transform = None, None, (), None
    if is_mlflow_model(uri):
        import mlflow.artifacts
        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import ErrorCode

        load_uri = uri
        try:
            if uri.startswith(("models:/", "runs:/")):  # fetched through our store, not MLflow's default ./mlflow.db
                store = registry_store()
                if uri.startswith("models:/"):  # models:/<name> is its champion, as for every command
                    name, alias, version = parse_registry_uri(uri) or (uri.removeprefix("models:/"), CHAMPION, None)
                    version = version or resolve_alias(name, alias or "")
                    load_uri = registry_client(store).get_model_version_download_uri(name, version)
                load_uri = mlflow.artifacts.download_artifacts(load_uri, tracking_uri=store, registry_uri=store)
            package = mlflow.pyfunc.load_model(load_uri)
        except MlflowException as err:  # no such model, version or alias: the registry's words, in one line
            message = f"{uri}: {' '.join(err.message.split())}"
            if not answered(err):  # the store did not answer: the CLI's one line for an endpoint (exit 1)
                raise MlflowException(message, error_code=ErrorCode.Value(err.error_code)) from None
            raise ValueError(message) from None
        wrapped = package.unwrap_python_model()
        if not hasattr(wrapped, "backbone"):
            raise ValueError(f"{uri}: not a dinoflow backbone package (found {type(wrapped).__name__})")
        backbone, patch_size = wrapped.backbone, wrapped.patch_size
        # the package's config.json (image_size); MLflow keeps the load context on its wrapper
        context = getattr(getattr(package, "_model_impl", None), "context", None)
        config_file = getattr(context, "artifacts", {}).get("config")
        if config_file and Path(config_file).is_file():
            config = json.loads(Path(config_file).read_text())
        classifier, classes = getattr(wrapped, "classifier", None), tuple(config.get("classes", ()))
        if EVAL_TRANSFORM_KEY in config:
            transform = checked_eval_transform(config[EVAL_TRANSFORM_KEY], f"{uri}: config.json")
    else:
        storage = storage or Storage()
        located, source = locate_weights(uri, storage)
        backbone = load_backbone(located, source, storage)
        patch_size = backbone.patch_size
        beside = located.removesuffix(BACKBONE_FILE) + CLASSIFIER_FILE
        if located.endswith(f"/{BACKBONE_FILE}") and storage.exists(beside):  # a fine-tuning run's
            classifier, classes = load_classifier(backbone, beside, storage)
            transform = saved_eval_transform(beside, storage)
    size = image_size or int(config.get("image_size") or backbone.arch_kwargs["img_size"])
    if size <= 0 or size % patch_size:
        raise ValueError(f"image_size {size} is not a positive multiple of the patch size {patch_size}")
    if classifier is not None:
        classifier = classifier.to(device).eval()  # (its backbone is ``backbone``)
    return ServedModel(backbone=backbone.to(device).eval(), patch_size=int(patch_size), image_size=size, name=uri,
                       version=version, classifier=classifier, classes=classes,
                       whole_images=served_whole_images(transform, classes))


def served_whole_images(eval_transform: str | None, classes: tuple[str, ...]) -> bool:
    """Whether a classifier's uploads are served whole (:attr:`ServedModel.whole_images`): as its
    recorded ``eval_transform`` says (:data:`~trainer.models.classifier.EVAL_TRANSFORMS`, checked
    where it is read), ``whole`` for a fine-tuning run's Fashion-MNIST evaluation.

    Legacy path, for a classifier saved before the record existed (``eval_transform`` None): inferred
    from its class names, Fashion-MNIST's whole and any other centre-cropped, which misjudges a
    folder classifier whose classes are named as Fashion-MNIST's; a backbone without a classifier
    has no classes and is centre-cropped."""
    from trainer.models.classifier import WHOLE

    if eval_transform is None:
        return classes == FASHION_MNIST_CLASSES
    return eval_transform == WHOLE
