"""Pictures a person would rather look at than read: image grids, confusion matrices, PCA and
attention maps, training curves, the probes' sweeps.

Why: numbers in MLflow say how well a model does; these PNGs show where. Written with the
non-interactive Agg backend so they work on headless machines and in pods.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import hsv_to_rgb  # noqa: E402
import numpy as np  # noqa: E402


MAX_CONFUSION_CLASSES = 30  # above, a confusion matrix is too dense to read (and slow to draw): none is drawn


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``(C, C)``: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def save_image_grid(
    images: np.ndarray, titles: Sequence[str], path: str | Path, columns: int = 8
) -> Path:
    """Save grayscale ``(N, H, W)`` or RGB ``(N, H, W, 3)`` images in a titled grid."""
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.6), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title in zip(axes.flat, images, titles):
        axis.imshow(image, cmap="gray" if image.ndim == 2 else None)
        axis.set_title(title, fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def save_confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Save a row-normalised confusion matrix with the counts' percentages written in."""
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(7, 6))
    shown = axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(class_names)), class_names, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    for (row, col), rate in np.ndenumerate(rates):
        axis.text(col, row, f"{100 * rate:.0f}", ha="center", va="center", fontsize=7,
                  color="white" if rate > 0.5 else "black")
    figure.colorbar(shown, ax=axis, fraction=0.046)
    figure.tight_layout()
    return _save(figure, path)


def pca_components(patches: np.ndarray, count: int = 3) -> np.ndarray:
    """Projections ``(N, h, w, count)`` of patch features ``(N, D, h, w)`` on their first principal
    axes (computed over all patches of all images, so colours mean the same across images)."""
    n, d, h, w = patches.shape
    flat = patches.transpose(0, 2, 3, 1).reshape(-1, d).astype(np.float64)
    flat -= flat.mean(axis=0)
    _, _, axes = np.linalg.svd(flat, full_matrices=False)
    return (flat @ axes[:count].T).reshape(n, h, w, count)


def pca_rgb(patches: np.ndarray) -> np.ndarray:
    """The first three principal components as RGB in [0, 1] ``(N, h, w, 3)``, each stretched
    between its 1st and 99th percentile (DINOv2's feature pictures)."""
    components = pca_components(patches, 3)
    low, high = np.percentile(components, [1, 99], axis=(0, 1, 2))
    return np.clip((components - low) / np.maximum(high - low, 1e-12), 0, 1)


def save_pca_maps(images: np.ndarray, patches: np.ndarray, path: str | Path, columns: int = 8) -> Path:
    """Save each image above the RGB picture of its patch features' first three components."""
    colours = pca_rgb(patches)
    count = min(len(images), columns)
    figure, axes = plt.subplots(2, count, figsize=(count * 1.5, 3.2), squeeze=False)
    for column in range(count):
        image = images[column]
        axes[0, column].imshow(image.transpose(1, 2, 0) if image.ndim == 3 and image.shape[0] == 3 else image,
                               cmap="gray" if image.ndim == 2 else None)
        axes[1, column].imshow(colours[column], interpolation="nearest")
        for axis in axes[:, column]:
            axis.axis("off")
    figure.tight_layout()
    return _save(figure, path)


def attention_rgb(maps: np.ndarray) -> np.ndarray:
    """CLS attention maps ``(N, heads, h, w)`` as RGB in [0, 1] ``(N, h, w, 3)``: the mean over
    heads, each image's map stretched from its smallest weight to its largest (a briefly trained
    model's attention is nearly flat; the stretch shows where it leans), in ``inferno`` colours."""
    mean = maps.mean(axis=1)
    low = mean.min(axis=(1, 2), keepdims=True)
    scaled = (mean - low) / np.maximum(mean.max(axis=(1, 2), keepdims=True) - low, 1e-12)
    return matplotlib.colormaps["inferno"](scaled)[..., :3]


def attention_rows(maps: np.ndarray, per_head: bool = False) -> list[np.ndarray]:
    """:func:`attention_rgb` of ``maps`` ``(N, heads, h, w)``: one ``(N, h, w, 3)`` array of the
    heads' mean, or with ``per_head`` one per head, each head's map stretched alone."""
    groups = [maps[:, head:head + 1] for head in range(maps.shape[1])] if per_head else [maps]
    return [attention_rgb(group) for group in groups]


def save_attention_maps(images: np.ndarray, maps: np.ndarray, high_norm: np.ndarray, path: str | Path,
                        columns: int = 8, per_head: bool = False, masks: np.ndarray | None = None) -> Path:
    """Save each image (uint8 ``(3, H, W)`` or ``(H, W)``) above its CLS attention ``maps``
    ``(heads, h, w)`` (:func:`attention_rows`: the heads' mean, or with ``per_head`` a row per head,
    each stretched alone), and below that the image with its high-norm patch tokens ``high_norm``
    ``(h, w)`` boxed in red (:mod:`evaluators.attention`); ``masks`` ``(h, w)`` bool (the attention
    masks, :func:`~evaluators.attention.attention_masks`) are tinted and outlined in cyan on the top image."""
    count = min(len(images), columns)
    colours = attention_rows(maps[:count], per_head)  # a row each: (count, h, w, 3)
    rows_shown = 2 + len(colours)
    figure, axes = plt.subplots(rows_shown, count, figsize=(count * 1.5, 1.6 * rows_shown), squeeze=False)
    for column in range(count):
        image = images[column]
        shown = image.transpose(1, 2, 0) if image.ndim == 3 and image.shape[0] == 3 else image
        cmap = "gray" if shown.ndim == 2 else None
        height, width = shown.shape[:2]
        rows, cols = high_norm[column].shape
        axes[0, column].imshow(shown, cmap=cmap)
        if masks is not None and masks[column].any() and not masks[column].all():
            pixels = np.kron(masks[column].astype(float), np.ones((height // rows, width // cols)))
            tint = np.zeros((*pixels.shape, 4))
            tint[pixels > 0] = (0.0, 1.0, 1.0, 0.3)  # the inside tinted, so the outline has a side
            axes[0, column].imshow(tint, interpolation="nearest")
            axes[0, column].contour(pixels, levels=[0.5], colors="cyan", linewidths=0.8)
        for row, colour in enumerate(colours, start=1):
            axes[row, column].imshow(colour[column], interpolation="nearest")
        axes[-1, column].imshow(shown, cmap=cmap)
        for row, col in zip(*np.nonzero(high_norm[column])):
            axes[-1, column].add_patch(plt.Rectangle((col * width / cols - 0.5, row * height / rows - 0.5),
                                                     width / cols, height / rows, fill=False, color="red", lw=1))
        for axis in axes[:, column]:
            axis.axis("off")
    flagged = f"high-norm tokens (red): {int(high_norm[:count].sum())} of {high_norm[:count].size}"
    middle = [f"CLS attention, head {head}" for head in range(len(colours))] if per_head else ["CLS attention"]
    first = "image, attention mask (cyan)" if masks is not None else "image"
    for axis, title in zip(axes[:, 0], [first, *middle, flagged]):
        axis.set_title(title, fontsize=7, loc="left")
    figure.tight_layout()
    return _save(figure, path)


def class_colours(num_classes: int) -> np.ndarray:
    """``(C, 3)`` RGB in [0, 1], one colour per class: matplotlib's ``tab10``/``tab20`` up to 20
    classes, else hues spread by the golden ratio (ADE20K's 150 classes stay apart from their
    neighbours in index, where a 10-colour map repeats every tenth)."""
    if num_classes <= 20:
        return np.asarray(plt.get_cmap("tab10" if num_classes <= 10 else "tab20").colors)[:num_classes]
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    values = 0.65 + 0.35 * (np.arange(num_classes) % 2)
    return hsv_to_rgb(np.stack([hues, np.full(num_classes, 0.75), values], axis=1))


def mask_rgb(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """A class-index mask ``(H, W)`` as RGB ``(H, W, 3)``: each class its colour, ignored pixels
    (255, or any index outside the classes) black."""
    colours = np.vstack([class_colours(num_classes), np.zeros((256 - num_classes, 3))])
    return colours[np.asarray(mask, dtype=np.uint8)]


def save_dense_predictions(images: np.ndarray, path: str | Path, masks: np.ndarray | None = None,
                           predicted_masks: np.ndarray | None = None, num_classes: int = 0,
                           depths: np.ndarray | None = None, predicted_depths: np.ndarray | None = None) -> Path:
    """One row per image ``(3, H, W)`` uint8: the image, then its mask and the predicted one (when
    ``masks`` are given: class indices below ``num_classes``, 255 ignored, drawn black), then its
    depth and the predicted one (when ``depths`` are given, one colour scale; 0 = unknown)."""
    seg, depth = masks is not None, depths is not None
    if not seg and not depth:
        raise ValueError("give the masks (and predicted masks), the depths (and predicted depths), or both")
    titles = ["image", *(["mask", "predicted mask"] if seg else []), *(["depth", "predicted depth"] if depth else [])]
    figure, axes = plt.subplots(len(images), len(titles), figsize=(1.5 * len(titles), 1.6 * len(images)),
                                squeeze=False)
    high = float(max(depths.max(), predicted_depths.max())) if depth else 0.0
    for row in range(len(images)):
        axes[row, 0].imshow(images[row].transpose(1, 2, 0))
        column = 1
        if seg:
            for mask in (masks[row], predicted_masks[row]):
                axes[row, column].imshow(mask_rgb(mask, num_classes), interpolation="nearest")
                column += 1
        if depth:
            for depth_map in (depths[row], predicted_depths[row]):
                axes[row, column].imshow(depth_map, cmap="magma_r", vmin=0, vmax=high)
                column += 1
        for index, axis in enumerate(axes[row]):
            axis.axis("off")
            if row == 0:
                axis.set_title(titles[index], fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


COLLAPSE_FIGURES = ("health_target_entropy", "health_feature_spread")  # both in [0, 1]: one axis
EVALUATION_SKIPPED = ("step", "train_minutes", "images_seen")  # an evaluation row's bookkeeping


def save_training_curves(curves: Sequence[dict[str, float]], evaluations: Sequence[dict[str, float]],
                         path: str | Path) -> Path:
    """A run's curves against its steps, a panel each: every ``loss_*`` of ``curves`` (rows with
    ``step``: :meth:`trainer.checkpoints.TrainState.record`); the collapse figures (``health_*``,
    :mod:`trainer.health`) when there are any, the prototypes picked on a second axis; the learning
    rate; and, when the run was evaluated, each score of ``evaluations`` (rows with ``step``)."""
    steps = [row["step"] for row in curves]
    scores = sorted({k for row in evaluations for k in row if k not in EVALUATION_SKIPPED})
    panels = ["losses", *(["teacher"] if any(k in curves[0] for k in COLLAPSE_FIGURES) else []), "lr",
              *(["evaluations"] if scores else [])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        axis.set_xlabel("step")
        if panel == "losses":
            for key in sorted(k for k in curves[0] if k.startswith("loss_")):
                axis.plot(steps, [row[key] for row in curves], label=key.removeprefix("loss_"), lw=1)
            axis.set_title("losses", fontsize=9)
        elif panel == "teacher":
            for key in COLLAPSE_FIGURES:
                axis.plot(steps, [row[key] for row in curves], label=key.removeprefix("health_"), lw=1)
            axis.set_ylim(0, 1.05)
            picked = axis.twinx()
            picked.plot(steps, [row["health_prototypes_used"] for row in curves], color="grey", lw=0.8, ls="--")
            picked.set_ylabel("prototypes picked (dashed)", fontsize=7)
            axis.set_title("teacher: collapse figures", fontsize=9)
        elif panel == "lr":
            axis.plot(steps, [row["lr"] for row in curves], lw=1, label="lr")
            axis.set_title("learning rate", fontsize=9)
        else:
            for key in scores:
                kept = [(row["step"], row[key]) for row in evaluations if key in row]
                axis.plot(*zip(*kept), marker="o", lw=1, label=key)
            axis.set_title("evaluations", fontsize=9)
        axis.legend(fontsize=6)
    figure.tight_layout()
    return _save(figure, path)


def save_sweeps(sweeps: dict[str, tuple[str, Sequence[float], Sequence[float], str]], path: str | Path) -> Path:
    """A held-out score against a hyper-parameter on a log scale, a panel per sweep (``title ->
    (the parameter's name, its values, the scores, the score's name)``: top-1, or mAP), the value
    picked (the first best) marked: a best at the sweep's edge says the sweep was too narrow."""
    figure, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.2), squeeze=False)
    for axis, (title, (name, values, scores, score)) in zip(axes[0], sweeps.items()):
        best = int(np.argmax(scores))
        axis.plot(values, [100 * a for a in scores], marker="o", lw=1, markersize=3)
        axis.plot([values[best]], [100 * scores[best]], marker="*", markersize=12, color="tab:red",
                  label=f"picked: {name} = {values[best]:.3g}, {100 * scores[best]:.1f} %")
        axis.set_xscale("log")
        axis.set_xlabel(name)
        axis.set_ylabel(f"held-out {score} (%)")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=6)
    figure.tight_layout()
    return _save(figure, path)


def save_corruption_errors(errors: dict[str, dict[str, dict[str, float]]], path: str | Path) -> Path:
    """Top-1 error (%) against severity, a line per corruption, a panel per classifier
    (``classifier -> corruption -> severity -> error``): which corruptions a backbone fails on,
    and how fast, at a glance where the mCE is one number."""
    figure, axes = plt.subplots(1, len(errors), figsize=(4.6 * len(errors), 3.6), squeeze=False, sharey=True)
    for axis, (classifier, by_corruption) in zip(axes[0], errors.items()):
        for corruption, by_severity in sorted(by_corruption.items()):
            severities = sorted(by_severity, key=int)
            axis.plot([int(s) for s in severities], [100 * by_severity[s] for s in severities], marker="o", lw=1,
                      markersize=3, label=corruption)
        axis.set_xlabel("severity")
        axis.set_title(classifier, fontsize=9)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 error (%)")
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
