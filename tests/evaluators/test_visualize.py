"""The dense prediction pictures (a colour per class however many there are, ignored pixels black,
either task drawn alone) and the probes' sweeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluators.visualize import class_colours, mask_rgb, save_dense_predictions


@pytest.mark.parametrize("classes", [3, 19, 21, 150])
def test_every_class_has_a_colour_of_its_own(classes: int) -> None:
    colours = class_colours(classes)
    assert colours.shape == (classes, 3) and colours.min() >= 0 and colours.max() <= 1
    assert len({tuple(np.round(c, 6)) for c in colours}) == classes
    assert not (colours == 0).all(axis=1).any()  # black is the ignored pixels'


def test_masks_are_coloured_by_class_and_ignored_pixels_black() -> None:
    mask = np.array([[0, 1], [149, 255]], dtype=np.uint8)
    rgb = mask_rgb(mask, 150)
    colours = class_colours(150)
    np.testing.assert_array_equal(rgb[0, 0], colours[0])
    np.testing.assert_array_equal(rgb[1, 0], colours[149])
    np.testing.assert_array_equal(rgb[1, 1], [0, 0, 0])


def test_either_task_is_drawn_alone_or_both_together(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 3, 16, 16), dtype=np.uint8)
    masks = rng.integers(0, 150, (3, 16, 16)).astype(np.uint8)
    depths = rng.uniform(0, 10, (3, 16, 16)).astype(np.float32)
    seg = {"masks": masks, "predicted_masks": masks[::-1], "num_classes": 150}
    depth = {"depths": depths, "predicted_depths": depths + 1}
    sizes = {}
    for name, drawn in (("seg", seg), ("depth", depth), ("both", {**seg, **depth})):
        path = save_dense_predictions(images, tmp_path / f"{name}.png", **drawn)
        with Image.open(path) as picture:
            sizes[name] = picture.size
    assert sizes["seg"] == sizes["depth"] and sizes["both"][0] > sizes["seg"][0]  # 3 columns, or 5
    assert sizes["both"][1] == sizes["seg"][1]  # a row per image either way
    with pytest.raises(ValueError, match="give the masks"):
        save_dense_predictions(images, tmp_path / "none.png")


def test_a_sweep_is_drawn_with_its_pick_marked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One panel per sweep; the picked value (the first best) is the one named in its legend."""
    from evaluators import visualize

    drawn = []
    save = visualize._save
    monkeypatch.setattr(visualize, "_save", lambda figure, path: (drawn.append(figure), save(figure, path))[1])
    path = visualize.save_sweeps({"linear probe": ("learning rate", [1e-3, 1e-2, 1e-1], [0.5, 0.8, 0.8], "top-1"),
                                  "logistic regression": ("C", [1e-6, 1.0, 1e5], [0.1, 0.9, 0.7], "mAP")},
                                 tmp_path / "sweeps.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    axes = drawn[0].axes
    assert [a.get_title() for a in axes] == ["linear probe", "logistic regression"]
    labels = [a.get_legend().get_texts()[0].get_text() for a in axes]
    assert labels == ["picked: learning rate = 0.01, 80.0 %", "picked: C = 1, 90.0 %"]
    assert [a.get_ylabel() for a in axes] == ["held-out top-1 (%)", "held-out mAP (%)"]
