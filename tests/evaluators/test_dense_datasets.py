"""Dense adapters read small fixtures written in each data set's own on-disk format."""

from __future__ import annotations

import shutil

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoflow.storage import Storage
from evaluators.dense_datasets import (JITTER_BRIGHTNESS, DenseSplit, Fit, garg_crop, load_ade20k, load_cityscapes,
                                       load_kitti, load_nyu, load_voc)


def _whole(split: DenseSplit) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of a split decoded, stacked: images and labels; each label also decoded alone."""
    images, labels = zip(*(split[i] for i in range(len(split))))
    alone = np.stack([split.label(i).numpy() for i in range(len(split))])
    np.testing.assert_array_equal(alone, np.stack(labels))
    return np.stack(images), alone


def _jpg(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _png(path: Path, labels: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, (i * 7) % 256, (i * 13) % 256)])
    image.save(path)


def test_ade20k_layout_and_reduced_labels(tmp_path: Path) -> None:
    for i in range(3):
        _jpg(tmp_path / "images" / "validation" / f"ADE_val_{i:08d}.jpg", i)
        labels = np.zeros((30, 40), np.uint8)
        labels[:, 20:] = 150
        labels[10:20, :10] = 1
        _png(tmp_path / "annotations" / "validation" / f"ADE_val_{i:08d}.png", labels, palette=False)
    split = load_ade20k(Storage(), str(tmp_path), "validation", fit=16, limit=2)
    images, labels = _whole(split)
    assert images.shape == (2, 3, 16, 16) and images.dtype == np.uint8 and labels.shape == (2, 16, 16)
    assert set(np.unique(labels)) == {0, 149, 255}  # 1 -> 0, 150 -> 149, "other" -> ignore
    assert split.names == ["ADE_val_00000000", "ADE_val_00000001"]
    with pytest.raises(ValueError, match="training or validation"):
        load_ade20k(Storage(), str(tmp_path), "val", 16)


def test_crops_and_whole_images_keep_the_aspect_and_place_labels_with_pixels(tmp_path: Path) -> None:
    """ADE20K files of 40 x 30 pixels, side 15: a crop is a 15-square window of the image resized
    to 20 x 15 (PIL's own resize, the reference), its labels the same window of the nearest-resized
    mask; the window's place is fixed per sample and seed; whole images keep the mask as stored."""
    rng = np.random.default_rng(0)
    for i in range(6):
        _jpg(tmp_path / "images" / "validation" / f"ADE_val_{i:08d}.jpg", i)
        _png(tmp_path / "annotations" / "validation" / f"ADE_val_{i:08d}.png",
             rng.integers(0, 151, (30, 40)), palette=False)
    crops = load_ade20k(Storage(), str(tmp_path), "validation", Fit("crop", 15, seed=3))
    lefts = set()
    for i in range(len(crops)):
        image, labels = crops[i]
        with Image.open(tmp_path / "images" / "validation" / f"ADE_val_{i:08d}.jpg") as raw:
            resized = np.array(raw.convert("RGB").resize((20, 15), Image.BILINEAR)).transpose(2, 0, 1)
        with Image.open(tmp_path / "annotations" / "validation" / f"ADE_val_{i:08d}.png") as raw:
            mask = np.array(raw.resize((20, 15), Image.NEAREST)).astype(np.int64)
        left = next(x for x in range(6) if np.array_equal(resized[:, :, x : x + 15], image.numpy()))
        lefts.add(left)
        np.testing.assert_array_equal(labels.numpy(), np.where(mask == 0, 255, mask - 1)[:, left : left + 15])
        assert torch.equal(crops[i][0], image) and torch.equal(crops.label(i), labels)  # the same place again
    assert len(lefts) > 1  # placed per sample
    other = load_ade20k(Storage(), str(tmp_path), "validation", Fit("crop", 15, seed=4))
    assert any(not torch.equal(other[i][0], crops[i][0]) for i in range(len(crops)))
    whole = load_ade20k(Storage(), str(tmp_path), "validation", Fit("whole", 15))
    image, labels = whole[0]
    assert image.shape == (3, 15, 20) and labels.shape == (30, 40)
    with Image.open(tmp_path / "annotations" / "validation" / "ADE_val_00000000.png") as raw:
        np.testing.assert_array_equal(labels.numpy(), np.where(np.array(raw) == 0, 255, np.array(raw) - 1))
    with pytest.raises(ValueError, match="fit mode must be one of square, crop, whole"):
        Fit("pad", 15)


def test_augmented_crops_are_drawn_anew_at_each_draw_flipped_with_their_labels_colours_jittered(
        tmp_path: Path) -> None:
    """An ADE20K sample whose label rises with the column (60 x 40, side 28: resized to 42 x 28):
    each draw (``key // len``) is a 28-wide window of the resized image and mask (PIL's resizes, the
    reference) at a place of its own, flipped or not alike; its pixels are the window's, or (about
    half the draws) the window's with its colours jittered, in the same order along a row (gamma,
    brightness and gains keep it); the same draw again is the same crop; without augment every
    draw is the sample's one crop."""
    ramp = np.repeat(np.arange(60)[None, :], 40, axis=0)
    _jpg(tmp_path / "images" / "training" / "ADE_a.jpg", 0, (60, 40))
    _png(tmp_path / "annotations" / "training" / "ADE_a.png", ramp + 1, palette=False)  # classes 0..59 once reduced
    with Image.open(tmp_path / "images" / "training" / "ADE_a.jpg") as raw:
        resized = np.array(raw.convert("RGB").resize((42, 28), Image.BILINEAR)).transpose(2, 0, 1)
    with Image.open(tmp_path / "annotations" / "training" / "ADE_a.png") as raw:
        mask = np.array(raw.resize((42, 28), Image.NEAREST)).astype(np.int64) - 1
    augmented = load_ade20k(Storage(), str(tmp_path), "training", Fit("crop", 28, seed=1, augment=True))
    places, jittered = set(), 0
    for draw in range(24):
        image, labels = augmented[draw]  # one sample: key = draw
        assert torch.equal(image, augmented[draw][0]) and torch.equal(labels, augmented[draw][1])  # the same again
        flip = bool(labels[0, 0] > labels[0, -1])
        left = next(x for x in range(15) if np.array_equal(mask[:, x:x + 28][:, ::-1 if flip else 1], labels.numpy()))
        places.add((left, flip))
        window = resized[:, :, left:left + 28][:, :, ::-1 if flip else 1]
        if not np.array_equal(image.numpy(), window):
            jittered += 1
            order = np.argsort(window[0, 14], kind="stable")
            assert (np.diff(image[0, 14].numpy()[order].astype(int)) >= 0).all()  # the order kept
    assert len({flip for _, flip in places}) == 2 and len(places) > 6 and 4 < jittered < 20
    still = load_ade20k(Storage(), str(tmp_path), "training", Fit("crop", 28, seed=1))
    assert all(torch.equal(still[0][0], still[draw][0]) for draw in range(1, 6))
    with pytest.raises(ValueError, match="augment draws crops: fit mode 'crop', not 'whole'"):
        Fit("whole", 28, augment=True)


def test_drawn_scales_zoom_in_and_out_and_pad_with_the_ignored_label(tmp_path: Path) -> None:
    """scales (0.5, 2): a 60 x 40 image at side 28 resized by a drawn ratio: zoomed in, a window
    spans fewer of the ramp's columns than at ratio 1 (40); zoomed out, the image is shorter than
    the window and the rows below it (and the columns beside it) are padding: black pixels, the
    ignored label 255 (its own labels are 0..59), exactly where :meth:`Fit.outside` says. The same
    draw is the same crop."""
    ramp = np.repeat(np.arange(60)[None, :], 40, axis=0)
    _jpg(tmp_path / "images" / "training" / "ADE_a.jpg", 0, (60, 40))
    _png(tmp_path / "annotations" / "training" / "ADE_a.png", ramp + 1, palette=False)
    fit = Fit("crop", 28, seed=2, augment=True, scales=(0.5, 2.0))
    split = load_ade20k(Storage(), str(tmp_path), "training", fit)
    padded = zoomed_in = 0
    for draw in range(24):
        image, labels = split[draw]
        assert torch.equal(image, split[draw][0]) and torch.equal(labels, split[draw][1])
        outside = fit.outside((60, 40), 0, draw)
        assert np.array_equal(labels.numpy() == 255, outside)
        assert (image.numpy()[:, outside] == 0).all()
        if outside.any():
            padded += 1
            inside_rows, inside_cols = (~outside).any(axis=1), (~outside).any(axis=0)
            assert np.array_equal(~outside, np.outer(inside_rows, inside_cols))  # the image: a rectangle in it,
            assert inside_rows[0] and (inside_cols[0] or inside_cols[-1])  # at the top, left or (flipped) right
        seen = labels.numpy()[0]
        zoomed_in += len(np.unique(seen[seen != 255])) < 38  # of the ramp's columns
    assert 3 < padded < 21 and zoomed_in > 3
    with pytest.raises(ValueError, match="scales, rotation and max_class_share are drawn with augment"):
        Fit("crop", 28, scales=(0.5, 2.0))
    with pytest.raises(ValueError, match=r"scales must be a range 0 < low <= high"):
        Fit("crop", 28, augment=True, scales=(2.0, 0.5))


def test_a_crop_one_class_fills_is_placed_again_and_the_image_with_it(tmp_path: Path) -> None:
    """max_class_share 0.75 (mmseg's cat_max_ratio): an 80 x 40 image, red class 0 on its first 64
    columns, green class 1 on the rest; at side 28 a window holds under 3/4 red only when it starts
    within 5 of its last columns (~1 in 6 places): placed up to 10 times, most draws get there (one
    place, few do). The image is cut where the labels were: its green pixels are class 1's."""
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :64], image[:, 64:] = (200, 0, 0), (0, 200, 0)
    (tmp_path / "images" / "training").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "images" / "training" / "ADE_a.jpg", format="PNG")  # exact colours
    _png(tmp_path / "annotations" / "training" / "ADE_a.png", np.where(np.arange(80) < 64, 1, 2)[None].repeat(40, 0),
         palette=False)

    def mixed(share: float) -> float:
        split = load_ade20k(Storage(), str(tmp_path), "training", Fit("crop", 28, seed=5, augment=True,
                                                                       max_class_share=share))
        spread = []
        for draw in range(40):
            pixels, labels = (x.numpy() for x in split[draw])
            green = pixels[1] > pixels[0]
            assert abs(int(green.sum()) - int((labels == 1).sum())) <= 28  # at most a column blended apart
            spread.append(max((labels == 0).mean(), (labels == 1).mean()) < 0.75)
        return float(np.mean(spread))

    assert mixed(0.75) > 0.6 and mixed(1.0) < 0.35
    with pytest.raises(ValueError, match="max_class_share must be in \\(0, 1\\]"):
        Fit("crop", 28, augment=True, max_class_share=0.0)


def test_drawn_rotations_turn_half_the_crops_by_at_most_the_angle(tmp_path: Path) -> None:
    """rotation 2.5: about half the draws of an NYU frame whose depth is its row number are turned
    (a row of the window no longer one depth; 112 px wide, any angle above half a degree shows) by
    at most 2.5 degrees (along a row its depths differ by at most 112 tan 2.5 + 2 rows' worth); the
    corners turned in are unknown (0) depth, exactly where :meth:`Fit.outside` says."""
    (tmp_path / "train").mkdir()
    rows = np.repeat(np.arange(1, 161, dtype=np.float32)[:, None], 240, axis=1)
    np.savez(tmp_path / "train" / "00000.npz", image=np.full((160, 240, 3), 128, np.uint8), depth=rows)
    fit = Fit("crop", 112, seed=0, augment=True, rotation=2.5)
    split = load_nyu(Storage(), str(tmp_path), "train", fit)
    turned = cornered = 0
    step = 160 / 112  # depth (rows of the frame) per row of the 112-high resized image
    for draw in range(24):
        depth = split[draw][1].numpy()
        assert np.array_equal(depth == 0, fit.outside((240, 160), 0, draw))
        cornered += (depth == 0).any()
        spans = [row[row > 0].max() - row[row > 0].min() for row in depth if (row > 0).any()]
        if max(spans) > 0:
            turned += 1
            assert max(spans) <= (112 * np.tan(np.radians(2.5)) + 2) * step
    assert 4 < turned < 20 and cornered > 2


def test_dense_crops_take_the_originals_shapes(tmp_path: Path) -> None:
    """crop=(21, 35): each draw of a 30 x 40 NYU frame (its depth naming each pixel's row and column)
    is a 21 x 35 window of the frame resized to 28 rows (PIL's nearest resize, the reference), at a
    place of its own, flipped or not. The suite gives NYU the toolbox's 416 x 544 of 427 x 565 and
    KITTI its 352 x 704 of 352 x 1216 at image_size for the shorter side, each a multiple of the
    patch, Cityscapes mmseg's 512 x 1024 of 1024 x 2048; ADE20K and VOC keep squares."""
    from evaluators.suite import SuiteConfig, train_fit

    (tmp_path / "train").mkdir()
    ys, xs = np.mgrid[0:30, 0:40]
    depth = (ys * 100 + xs + 1).astype(np.float32)
    np.savez(tmp_path / "train" / "00000.npz", image=np.zeros((30, 40, 3), np.uint8), depth=depth)
    resized = np.array(Image.fromarray(depth, mode="F").resize((37, 28), Image.NEAREST))
    split = load_nyu(Storage(), str(tmp_path), "train", Fit("crop", 28, seed=0, augment=True, crop=(21, 35)))
    places = set()
    for draw in range(12):
        window = split[draw][1].numpy()
        assert window.shape == (21, 35)
        found = [(top, left, flip) for top in range(8) for left in range(3) for flip in (1, -1)
                 if np.array_equal(resized[top:top + 21, left:left + 35][:, ::flip], window)]
        assert len(found) == 1
        places.add(found[0])
    assert len(places) > 4
    for data, task, window in (("nyu:/n", "depth", (28, 35)), ("kitti:/k", "depth", (28, 56)),
                               ("ade20k:/a", "seg", (28, 28)), ("cityscapes:/c", "seg", (14, 28))):
        config = SuiteConfig(tasks=(task,), image_size=28, **{f"{task}_data": data})
        assert train_fit(task, config, 7).window == window
    assert train_fit("depth", SuiteConfig(tasks=("depth",), image_size=448, depth_data="nyu:/n"), 14).window == (
        434, 574)  # 436.4 and 570.8 to multiples of 14
    with pytest.raises(ValueError, match="crop must be the window's \\(rows, columns\\), both >= 1"):
        Fit("crop", 28, crop=(0, 35))


def test_colour_jitter_is_a_gamma_a_brightness_and_a_gain_per_channel() -> None:
    from evaluators.dense_datasets import colour_jitter

    pixels = np.array([[[128]], [[250]], [[0]]], dtype=np.uint8)  # one pixel, three channels
    out = colour_jitter(pixels, gamma=1.1, brightness=1.2, colours=np.array([0.95, 1.0, 1.1]))
    assert out[:, 0, 0].tolist() == [round(255 * (128 / 255) ** 1.1 * 1.2 * 0.95), 255, 0]  # 250 clipped


def test_kittis_colours_are_jittered_within_its_own_brightness_range() -> None:
    """A grey frame (100) jittered: by gamma 0.9-1.1, a gain per channel 0.9-1.1 and a brightness
    of 0.9-1.1 (the toolbox's KITTI config) every value lies in 255 (100/255)^1.1 0.9^2 = 73.7 ..
    255 (100/255)^0.9 1.1^2 = 133.1; with NYU's brightness of 0.75-1.25 some lie beyond. The suite
    gives KITTI's range to KITTI alone."""
    from evaluators.suite import SuiteConfig, train_fit

    grey = Image.new("RGB", (40, 40), (100, 100, 100))
    low, high = 255 * (100 / 255) ** 1.1 * 0.9 ** 2, 255 * (100 / 255) ** 0.9 * 1.1 ** 2
    seen = {}
    for name, brightness in (("kitti", (0.9, 1.1)), ("nyu", JITTER_BRIGHTNESS)):
        fit = Fit("crop", 28, seed=0, augment=True, brightness=brightness)
        values = np.concatenate([fit.image(grey, 0, draw).ravel() for draw in range(400)])
        seen[name] = values[values != 100]  # the jittered draws
    assert len(seen["kitti"]) > 100 and low - 0.5 <= seen["kitti"].min() and seen["kitti"].max() <= high + 0.5
    assert seen["nyu"].min() < low - 0.5 and seen["nyu"].max() > high + 0.5
    for data, brightness in (("kitti:/k", (0.9, 1.1)), ("nyu:/n", JITTER_BRIGHTNESS),
                             ("nyu:/n->sunrgbd:/s", JITTER_BRIGHTNESS)):
        config = SuiteConfig(tasks=("depth",), image_size=28, depth_data=data)
        assert train_fit("depth", config, 7).brightness == brightness
    with pytest.raises(ValueError, match=r"brightness must be a range of gains 0 < low <= high, got \(1.1, 0.9\)"):
        Fit("crop", 28, augment=True, brightness=(1.1, 0.9))


def test_voc_layout_keeps_boundaries_ignored(tmp_path: Path) -> None:
    ids = ["2007_000032", "2007_000039"]
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    for i, name in enumerate(ids):
        _jpg(tmp_path / "JPEGImages" / f"{name}.jpg", i)
        labels = np.full((30, 40), 15, np.uint8)
        labels[:, :5] = 255
        labels[:, 35:] = 0
        _png(tmp_path / "SegmentationClass" / f"{name}.png", labels, palette=True)
    split = load_voc(Storage(), str(tmp_path), "val", fit=20)
    assert split.names == ids and set(np.unique(_whole(split)[1])) == {0, 15, 255}
    with pytest.raises(FileNotFoundError, match="splits: train, val"):
        load_voc(Storage(), str(tmp_path), "train", 20)


VOC_TRAIN, VOC_SBD, VOC_VAL = ["2007_000032", "2007_000039"], ["2008_000002", "2008_000003"], ["2007_000033"]


def write_voc(root: Path, aug_list: str = "", lines: object = None) -> None:
    """A VOC 2012 layout of train.txt's and val.txt's images with SegmentationClass masks (class 15,
    boundaries 255); with ``aug_list``, the SBD-augmented set too: SegmentationClassAug masks of
    class 7 for the train and SBD images (DeepLab's zip holds train.txt's too) and that list of
    ``lines(ids)`` (default: the ids, one a line) naming the train and SBD ids."""
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (sets / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    for i, name in enumerate(VOC_TRAIN + VOC_SBD + VOC_VAL):
        _jpg(root / "JPEGImages" / f"{name}.jpg", i)
        labels = np.full((30, 40), 15, np.uint8)
        labels[:, :3] = 255
        if name not in VOC_SBD:
            _png(root / "SegmentationClass" / f"{name}.png", labels, palette=True)
        if aug_list and name not in VOC_VAL:
            _png(root / "SegmentationClassAug" / f"{name}.png", np.full((30, 40), 7, np.uint8), palette=False)
    if aug_list:
        listed = VOC_TRAIN + VOC_SBD
        (root / aug_list).parent.mkdir(parents=True, exist_ok=True)
        (root / aug_list).write_text("\n".join(lines(listed) if callable(lines) else listed) + "\n")


def test_vocs_train_split_is_the_release_train_txt_without_an_augmented_layout(tmp_path: Path) -> None:
    write_voc(tmp_path)
    train = load_voc(Storage(), str(tmp_path), "train", fit=20)
    assert train.names == VOC_TRAIN and train.layout == "train"
    assert set(np.unique(_whole(train)[1])) == {15, 255}


@pytest.mark.parametrize(("aug_list", "lines"), [
    ("ImageSets/Segmentation/aug.txt", lambda ids: ids[2:]),  # mmseg's voc_aug.py: the ids beyond train.txt
    ("ImageSets/Segmentation/trainaug.txt", None),  # mmseg's voc_aug.py: all of them
    ("ImageSets/Segmentation/train_aug.txt", None),  # DeepLab's list of ids (VainF's DeepLabV3Plus)
    ("ImageSets/SegmentationAug/train_aug.txt",  # DeepLab-v2's image and mask paths (deeplab-pytorch)
     lambda ids: [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in ids]),
])
def test_vocs_train_split_is_trainaug_where_the_root_holds_it(tmp_path: Path, aug_list: str, lines: object,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """trainaug, as the original's VOC configs train (mmseg's voc12aug): train.txt's images with
    their SegmentationClass masks (15, boundaries 255), then the SBD's others with their
    SegmentationClassAug ones (7); the layout named and logged; val as before."""
    write_voc(tmp_path, aug_list, lines)
    with caplog.at_level("INFO", logger="evaluators.dense_datasets"):
        train = load_voc(Storage(), str(tmp_path), "train", fit=20)
    assert train.names == VOC_TRAIN + VOC_SBD and train.layout == "trainaug"
    assert f"VOC train split: 4 images (trainaug; VOC ids in {tmp_path}/ImageSets/Segmentation/train.txt and " \
           f"{tmp_path}/{aug_list})" in caplog.text
    masks = _whole(train)[1]
    assert [set(np.unique(m)) for m in masks] == [{15, 255}, {15, 255}, {7}, {7}]
    assert load_voc(Storage(), str(tmp_path), "train", fit=20, limit=3).names == VOC_TRAIN + VOC_SBD[:1]
    val = load_voc(Storage(), str(tmp_path), "val", fit=20)
    assert val.names == VOC_VAL and val.layout == "val" and set(np.unique(_whole(val)[1])) == {15, 255}


def test_a_voc_trainaug_list_naming_val_images_or_without_its_masks_is_refused(tmp_path: Path) -> None:
    write_voc(tmp_path, "ImageSets/Segmentation/train_aug.txt", lambda ids: ids + VOC_VAL)
    with pytest.raises(ValueError, match=r"train_aug.txt lists 1 images of .*val.txt \(first 2007_000033\): the "
                                         "training set would hold images the val split scores"):
        load_voc(Storage(), str(tmp_path), "train", fit=20)
    (tmp_path / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(VOC_TRAIN + VOC_SBD))
    (tmp_path / "SegmentationClassAug" / f"{VOC_SBD[0]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"SegmentationClassAug/{VOC_SBD[0]}.png is missing: .*train_aug.txt "
                                                "lists VOC's SBD-augmented training set"):
        load_voc(Storage(), str(tmp_path), "train", fit=20)


# Cityscapes' 19 evaluated classes in train-id order, with their label ids (its labels table)
CITYSCAPES = [("road", 7), ("sidewalk", 8), ("building", 11), ("wall", 12), ("fence", 13), ("pole", 17),
              ("traffic light", 19), ("traffic sign", 20), ("vegetation", 21), ("terrain", 22), ("sky", 23),
              ("person", 24), ("rider", 25), ("car", 26), ("truck", 27), ("bus", 28), ("train", 31),
              ("motorcycle", 32), ("bicycle", 33)]


def write_cityscapes(root: Path, split: str, cities: dict[str, int], side: int = 16) -> list[np.ndarray]:
    """Cityscapes' layout: per city ``count`` images and fine masks of random label ids 0..33; the
    masks in the order the adapter lists them (by path)."""
    rng = np.random.default_rng(len(cities))
    masks = []
    for city, count in sorted(cities.items()):
        for i in range(count):
            name = f"{city}_{i:06d}_000019"
            _jpg(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", i, (side, side))
            masks.append(rng.integers(0, 34, (side, side)).astype(np.uint8))
            _png(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", masks[-1], palette=False)
            _png(root / "gtFine" / split / city / f"{name}_gtFine_instanceIds.png", masks[-1], palette=False)
    return masks


def test_cityscapes_layout_maps_label_ids_to_the_19_classes(tmp_path: Path) -> None:
    masks = write_cityscapes(tmp_path, "val", {"frankfurt": 2, "lindau": 1})
    split = load_cityscapes(Storage(), str(tmp_path), "val", fit=16)
    assert split.names == ["frankfurt_000000_000019", "frankfurt_000001_000019", "lindau_000000_000019"]
    images, labels = _whole(split)
    train_id = {label_id: index for index, (_, label_id) in enumerate(CITYSCAPES)}
    expected = np.vectorize(lambda label_id: train_id.get(int(label_id), 255))(np.stack(masks))
    assert images.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == set(range(19)) | {255}
    assert len(load_cityscapes(Storage(), str(tmp_path), "val", fit=16, limit=2)) == 2
    with pytest.raises(ValueError, match="train or val \\(test's masks are withheld\\)"):
        load_cityscapes(Storage(), str(tmp_path), "test", 16)
    with pytest.raises(FileNotFoundError, match="no Cityscapes images .* under .*train found"):
        load_cityscapes(Storage(), str(tmp_path), "train", 16)


def test_nyu_npz_layout(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        depth = rng.uniform(0.5, 9.5, (24, 32)).astype(np.float32)
        depth[0] = 0
        np.savez(tmp_path / "test" / f"{i:05d}.npz", image=rng.integers(0, 255, (24, 32, 3), dtype=np.uint8),
                 depth=depth)
    split = load_nyu(Storage(), str(tmp_path), "test", fit=16)
    images, depths = _whole(split)
    assert images.shape == (2, 3, 16, 16) and depths.dtype == np.float32
    assert depths.max() <= 9.5 and (depths == 0).any() and depths.max() > 5
    np.savez(tmp_path / "test" / "bad.npz", image=np.zeros((4, 4, 3), np.uint8))
    split = load_nyu(Storage(), str(tmp_path), "test", 16)  # files are read when a sample is asked for
    with pytest.raises(ValueError, match="bad.npz: an NYU sample needs arrays 'image' and 'depth'"):
        split[2]
    with pytest.raises(FileNotFoundError, match=r"no NYU frames \(a split list .*nyu_train.txt or .*train/\*.npz\)"):
        load_nyu(Storage(), str(tmp_path), "train", 16)


def write_nyu_toolbox(root: Path, frames: dict[str, int]) -> dict[str, list[np.ndarray]]:
    """The depth toolbox's NYU layout: per split its list (lines '/<scene>/rgb_<n>.jpg
    /<scene>/sync_depth_<n>.png <focal>', not in path order; the train list names a frame without
    depth), 480 x 640 JPEGs and 16-bit PNGs of millimetres, each with a 12 m patch; returns each
    split's depths in millimetres, in the order of their image paths."""
    rng = np.random.default_rng(0)
    stored: dict[str, list[np.ndarray]] = {}
    for split, count in frames.items():
        lines, depths = [], {}
        for i in reversed(range(count)):
            scene = f"{'kitchen' if split == 'train' else 'bathroom'}_{i:04d}a"
            image, depth = f"{scene}/rgb_{i:05d}.jpg", f"{scene}/sync_depth_{i:05d}.png"
            lines.append(f"/{image} /{depth} 518.8579")
            (root / scene).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(root / image)
            millimetres = rng.integers(0, 9999, (480, 640)).astype(np.uint16)
            millimetres[100:120, 200:260] = 12000  # beyond the toolbox's 10 m
            Image.fromarray(millimetres).save(root / depth)
            depths[image] = millimetres
        if split == "train":
            lines.append("/kitchen_0099a/rgb_00099.jpg None 518.8579")
        (root / f"nyu_{split}.txt").write_text("\n".join(lines) + "\n")
        stored[split] = [depths[image] for image in sorted(depths)]
    return stored


def test_nyu_toolbox_layout_millimetres_the_10_m_range_and_the_border_cut(tmp_path: Path) -> None:
    """The toolbox's lists read in image-path order (a frame without depth skipped), its 16-bit
    millimetres in metres, 10 m or more unknown; a training frame cut to rows 45-471 and columns
    43-607 (its image alike), a test frame whole, scored inside the Eigen crop; the lists win over
    the npz layout; a frame of another size or a depth of another mode is refused."""
    stored = write_nyu_toolbox(tmp_path, {"train": 2, "test": 2})
    (tmp_path / "train").mkdir()
    np.savez(tmp_path / "train" / "00000.npz", image=np.zeros((4, 4, 3), np.uint8), depth=np.ones((4, 4), np.float32))

    def metres(millimetres: np.ndarray) -> np.ndarray:
        depth = millimetres.astype(np.float64) / 1000
        return np.where(depth < 10, depth, 0)

    train = load_nyu(Storage(), str(tmp_path), "train", Fit("whole", 28))
    assert train.names == ["kitchen_0000a_rgb_00000", "kitchen_0001a_rgb_00001"]
    images, depths = _whole(train)
    assert images.shape == (2, 3, 28, 37) and depths.shape == (2, 427, 565) and depths.dtype == np.float32
    for depth, millimetres in zip(depths, stored["train"]):
        np.testing.assert_allclose(depth, metres(millimetres)[45:472, 43:608], rtol=1e-6)
    assert (depths[:, 100 - 45:120 - 45, 200 - 43:260 - 43] == 0).all()
    frame = np.asarray(Image.open(tmp_path / "kitchen_0000a" / "rgb_00000.jpg").convert("RGB"))
    cut = np.asarray(Image.fromarray(frame[45:472, 43:608]).resize((37, 28), Image.BILINEAR))
    assert np.abs(images[0].transpose(1, 2, 0).astype(int) - cut.astype(int)).max() <= 1
    test = load_nyu(Storage(), str(tmp_path), "test", Fit("whole", 28))
    assert len(test) == 2 and test.names[0] == "bathroom_0000a_rgb_00000"
    inside = np.zeros((480, 640), bool)
    inside[45:471, 41:601] = True
    for index, millimetres in enumerate(stored["test"]):
        scored = test.label(index).numpy()
        np.testing.assert_allclose(scored[inside], metres(millimetres)[inside], rtol=1e-6)
        assert (scored[~inside] == 0).all()
    assert len(load_nyu(Storage(), str(tmp_path), "train", 28, limit=1)) == 1
    Image.fromarray(np.zeros((240, 320), np.uint16)).save(tmp_path / "kitchen_0001a" / "sync_depth_00001.png")
    with pytest.raises(ValueError, match=r"sync_depth_00001.png: 320 x 240, not NYU's 640 x 480 frame"):
        train.label(1)
    Image.fromarray(np.zeros((480, 640), np.uint8)).save(tmp_path / "kitchen_0001a" / "sync_depth_00001.png")
    with pytest.raises(ValueError, match=r"an NYU depth map is a 16-bit PNG \(millimetres\), got mode L"):
        train.label(1)
    with pytest.raises(ValueError, match="NYU split must be train or test"):
        load_nyu(Storage(), str(tmp_path), "val", 28)


def test_nyus_test_depths_are_scored_inside_the_eigen_crop(tmp_path: Path) -> None:
    """Rows 45-470 and columns 41-600 of a 480 x 640 test frame keep their depths, the border
    becomes unknown (0: not scored); a 240 x 320 map keeps the same share; train keeps all."""
    from evaluators.dense_datasets import eigen_crop

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        np.savez(tmp_path / split / "00000.npz", image=np.zeros((480, 640, 3), np.uint8),
                 depth=np.full((480, 640), 3.0, np.float32))
    test = load_nyu(Storage(), str(tmp_path), "test", Fit("whole", 28)).label(0).numpy()
    inside = np.zeros((480, 640), bool)
    inside[45:471, 41:601] = True
    assert (test[inside] == 3.0).all() and (test[~inside] == 0).all()
    assert (load_nyu(Storage(), str(tmp_path), "train", Fit("whole", 28)).label(0).numpy() == 3.0).all()
    half = eigen_crop(np.ones((240, 320), np.float32))
    rows, cols = np.nonzero(half)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (22, 236, 20, 300)  # 45/2, 471/2, 41/2, 601/2


KITTI_FRAME = (376, 1242)  # rows, columns of a KITTI camera frame (they vary a little by drive)


def write_kitti(root: Path, frames: dict[str, int], depth_of: object = None) -> None:
    """A KITTI layout: per split its list, camera PNGs under input/ (grey, darker where nearer) and
    16-bit depth PNGs (metres x 256) under gt_depth/; ``depth_of(rows, cols, split, i)`` gives a
    frame's metres (default: a ramp that names each pixel's row and column); each test list also
    names a frame without depth."""
    rng = np.random.default_rng(0)
    rows, cols = KITTI_FRAME
    for split, count in frames.items():
        lines = []
        for i in range(count):
            image = f"2011_09_26/2011_09_26_drive_{i:04d}_sync/image_02/data/{i:010d}.png"
            depth = f"2011_09_26_drive_{i:04d}_sync/proj_depth/groundtruth/image_02/{i:010d}.png"
            lines.append(f"{image} {depth} 721.5377")
            (root / "input" / image).parent.mkdir(parents=True, exist_ok=True)
            (root / "gt_depth" / depth).parent.mkdir(parents=True, exist_ok=True)
            ys, xs = np.mgrid[0:rows, 0:cols]
            metres = (ys / 10 + (xs % 256) / 256) if depth_of is None else depth_of(ys, xs, split, i)
            grey = np.clip(metres / 40 * 255 + rng.normal(0, 8, metres.shape), 0, 255)  # nearer is darker
            Image.fromarray(np.repeat(grey[..., None], 3, 2).astype(np.uint8)).save(root / "input" / image)
            Image.fromarray(np.round(metres * 256).astype(np.uint16)).save(root / "gt_depth" / depth)
        if split == "test":
            lines.append("2011_09_26/2011_09_26_drive_0099_sync/image_02/data/0000000000.png None 721.5377")
        (root / f"kitti_eigen_{split}.txt").write_text("\n".join(lines) + "\n")


def test_kitti_eigen_layout_kb_crop_far_depths_and_garg_crop(tmp_path: Path) -> None:
    """Each frame cut to its bottom-centred 352 x 1216 (rows 24-375, columns 13-1228 of 376 x 1242),
    its 16-bit depths / 256 in metres, beyond 80 m unknown; the test split scored inside the Garg crop
    (rows 40.8-99.2 %, columns 3.6-96.4 % of the cut frame), a listed frame without depth skipped."""
    def depth_of(ys: np.ndarray, xs: np.ndarray, split: str, i: int) -> np.ndarray:
        metres = ys / 10 + (xs % 256) / 256
        metres[300:310, 600:700] = 90.0  # beyond the LiDAR's scored range
        return metres

    write_kitti(tmp_path, {"train": 2, "test": 1}, depth_of)
    rows, cols = np.mgrid[24:376, 13:1229]
    want = rows / 10 + (cols % 256) / 256
    want[300 - 24:310 - 24, 600 - 13:700 - 13] = 0
    train = load_kitti(Storage(), str(tmp_path), "train", Fit("whole", 352))
    images, depths = _whole(train)
    assert images.shape == (2, 3, 352, 1216) and depths.shape == (2, 352, 1216) and depths.dtype == np.float32
    np.testing.assert_allclose(depths[0], want, atol=1 / 512)
    frame = np.asarray(Image.open(tmp_path / "input" / train._files[0][0].split("input/", 1)[1]).convert("RGB"))
    assert np.abs(images[0].transpose(1, 2, 0).astype(int) - frame[24:376, 13:1229].astype(int)).max() <= 1
    test = load_kitti(Storage(), str(tmp_path), "test", Fit("whole", 352))
    assert len(test) == 1  # the frame without depth is not listed
    scored = test.label(0).numpy()
    inside = np.zeros((352, 1216), bool)
    inside[int(0.40810811 * 352):int(0.99189189 * 352), int(0.03594771 * 1216):int(0.96405229 * 1216)] = True
    np.testing.assert_allclose(scored[inside], want[inside], atol=1 / 512)
    assert (scored[~inside] == 0).all()
    with pytest.raises(FileNotFoundError, match="KITTI split list .*kitti_eigen_train.txt is missing"):
        load_kitti(Storage(), str(tmp_path / "nowhere"), "train", 28)
    first = tmp_path / "gt_depth" / train._files[0][1].split("gt_depth/", 1)[1]
    first.rename(first.with_suffix(".moved"))  # e.g. the depth archive's train/<drive>/ not merged under gt_depth/
    with pytest.raises(FileNotFoundError, match=r"sync/proj_depth/groundtruth/image_02/0000000000.png is missing: a "
                                                r"file of the first of the KITTI frames with depth in"):
        load_kitti(Storage(), str(tmp_path), "train", 28)
    (tmp_path / "kitti_eigen_train.txt").write_text("only_one_field.png\n")
    with pytest.raises(ValueError, match="line 1: 'only_one_field.png' is not '<image> <depth> \\[<focal>\\]'"):
        load_kitti(Storage(), str(tmp_path), "train", 28)


@pytest.mark.parametrize("shape", [(352, 1216), (20, 30), (7, 11)])
def test_the_garg_crop_is_the_depth_toolboxs_box_of_the_map_it_is_given(shape: tuple[int, int]) -> None:
    """The toolbox's eval_mask: rows int(0.40810811 h) to int(0.99189189 h), columns int(0.03594771 w)
    to int(0.96405229 w) of the (KB-cropped) map scored; 352 x 1216: rows 143-348, columns 43-1171."""
    height, width = shape
    kept = garg_crop(np.ones(shape, np.float32)) > 0
    want = np.zeros(shape, bool)
    want[int(0.40810811 * height):int(0.99189189 * height), int(0.03594771 * width):int(0.96405229 * width)] = True
    np.testing.assert_array_equal(kept, want)
    if shape == (352, 1216):
        rows, cols = np.nonzero(kept)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (143, 348, 43, 1171)


def test_a_kitti_image_of_another_size_than_its_depth_map_is_refused_naming_both(tmp_path: Path) -> None:
    """A pair of two frames' sizes (another camera's image, a list's line pairing the wrong files) is
    refused before the cut: cropping first would pad the image to the box and pass it out of register."""
    write_kitti(tmp_path, {"train": 1})
    train = load_kitti(Storage(), str(tmp_path), "train", Fit("whole", 352))
    image_uri, depth_uri = train._files[0]
    Image.new("RGB", (1226, 370)).save(image_uri)  # larger than the 1216 x 352 cut, smaller than 1242 x 376
    assert float(train.label(0).max()) > 0  # the depths alone still read
    with pytest.raises(ValueError) as refused:
        train[0]
    assert str(refused.value) == (f"{image_uri} is 1226 x 370 but its depth map {depth_uri} is 1242 x 376: "
                                  "an image and its depths must be of one frame")


def test_the_suite_scores_depth_on_kitti_up_to_80_metres(tmp_path: Path) -> None:
    """depth_data=kitti:<root>: the head's bins reach 80 m: a head topping out at 10 m (NYU's) could
    come no closer than ~18 m RMSE to these 17-38 m test depths; this one reads them off the frames'
    shade."""
    from evaluators.dense import HeadConfig
    from evaluators.suite import SuiteConfig, run_suite
    from trainer.models.vit import build_vit

    write_kitti(tmp_path, {"train": 6, "test": 2})
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28,
                         layerscale_init=1.0)
    config = SuiteConfig(tasks=("depth",), depth_data=f"kitti:{tmp_path}", image_size=28,
                         depth_head=HeadConfig(steps=600, lr=1e-2), dense_augment=False)  # the shade: not jittered
    metrics = run_suite(backbone, config)["metrics"]
    truth = _whole(load_kitti(Storage(), str(tmp_path), "test", 28))[1]
    capped = np.sqrt(np.mean((truth[truth > 0] - 10.0) ** 2))  # the least error of any head topping out at 10 m
    assert metrics["depth_rmse"] < 0.6 * capped and 0.3 < metrics["depth_delta1"] <= 1


def write_halves(root: Path) -> tuple[Path, Path]:
    """A VOC and an NYU layout of the same images, each half red, half green: masks naming the
    halves (classes 1, 2; the boundary column 255) and depths of 2 m on red, 8 m on green."""
    rng = np.random.default_rng(0)
    voc, nyu = root / "voc", root / "nyu"
    for split, count in (("train", 12), ("val", 4)):
        ids = [f"{split}{i}" for i in range(count)]
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids))
        for i, name in enumerate(ids):
            cut = int(rng.integers(10, 30))
            image = np.zeros((28, 40, 3), np.uint8)
            image[:, :cut] = (220, 30, 30)
            image[:, cut:] = (30, 220, 30)
            image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
            labels = np.where(np.arange(40) < cut, 1, 2)[None].repeat(28, 0)
            labels[:, cut] = 255
            (voc / "JPEGImages").mkdir(exist_ok=True)
            Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            _png(voc / "SegmentationClass" / f"{name}.png", labels, palette=True)
            nyu_split = nyu / ("train" if split == "train" else "test")
            nyu_split.mkdir(parents=True, exist_ok=True)
            np.savez(nyu_split / f"{i:05d}.npz", image=image, depth=np.where(labels == 1, 2.0, 8.0).astype(np.float32))
    return voc, nyu


def test_the_suite_runs_the_dense_heads_on_real_layouts(tmp_path: Path) -> None:
    """seg on a VOC layout and depth on an NYU layout (the adapters were unreachable from the suite),
    of :func:`write_halves`' images. A linear head on a random backbone's patch features separates
    colours: well above chance, and depth better than the mean's error."""
    from evaluators.dense import HeadConfig
    from evaluators.suite import SuiteConfig, run_suite
    from trainer.models.vit import build_vit

    voc, nyu = write_halves(tmp_path)
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28,
                         layerscale_init=1.0)
    config = SuiteConfig(tasks=("seg", "depth"), seg_data=f"voc:{voc}", depth_data=f"nyu:{nyu}", image_size=28,
                         train_limit=10, seg_head=HeadConfig(steps=150), depth_head=HeadConfig(steps=150))
    report = run_suite(backbone, config, pictures=tmp_path / "pictures")
    metrics = report["metrics"]
    assert metrics["seg_pixel_accuracy"] > 0.8 and 0 < metrics["seg_miou"] <= 1
    truth = _whole(load_nyu(Storage(), str(nyu), "test", 28))[1]
    assert metrics["depth_rmse"] < truth[truth > 0].std()  # below the error of predicting the mean depth
    assert "attention_jaccard" not in metrics  # real data: no shapes to score the attention against
    assert (tmp_path / "pictures" / "pca_features.png").exists()
    assert not (tmp_path / "pictures" / "dense_predictions.png").exists()  # masks and depths of other images
    for name in ("seg_predictions.png", "depth_predictions.png"):  # so each task is drawn on its own images
        assert (tmp_path / "pictures" / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="seg_data = 'coco:/x'; give <data set>:<root> with the data set one of "
                                         "ade20k, voc, cityscapes"):
        SuiteConfig(tasks=("seg",), seg_data="coco:/x")
    # Cityscapes from the suite: its 19 classes scored
    write_cityscapes(tmp_path / "cityscapes", "train", {"aachen": 4})
    write_cityscapes(tmp_path / "cityscapes", "val", {"lindau": 2})
    cityscapes = run_suite(backbone, SuiteConfig(tasks=("seg",), seg_data=f"cityscapes:{tmp_path / 'cityscapes'}",
                                                 image_size=28, seg_head=HeadConfig(steps=3)))
    assert sum(key.startswith("iou_") for key in cityscapes["tasks"]["seg"]) == 19


def test_whole_test_images_are_scored_through_windows_at_their_masks_resolution(tmp_path: Path) -> None:
    """VOC's 28 x 40 images, side 28, patch 7: the input is 28 x 42 (the longer side rounded to the
    patch), seen through 28-square windows, and its class logits are brought to the mask's 28 x 40."""
    import torch.nn.functional as F

    from evaluators.dense import LinearSegmentationHead, slid_logits
    from evaluators.dense_source import FeatureSource
    from evaluators.features import to_model_input
    from evaluators.suite import SuiteConfig, _windowed
    from trainer.models.vit import build_vit

    voc, _ = write_halves(tmp_path)
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28).eval()
    head = LinearSegmentationHead(32, 21).eval()
    split = load_voc(Storage(), str(voc), "val", Fit("whole", 28))
    scored = list(_windowed(lambda x: slid_logits(backbone, head, x, 28), FeatureSource(split, backbone),
                            SuiteConfig(tasks=("seg",), image_size=28)))
    assert len(scored) == 4
    for (logits, mask), (image, labels) in zip(scored, (split[i] for i in range(4))):
        assert torch.equal(mask[0], labels) and logits.shape == (1, 21, 28, 40)
        windows = slid_logits(backbone, head, to_model_input(image[None], size=(28, 42), patch_size=7), 28)
        torch.testing.assert_close(logits, F.interpolate(windows, size=(28, 40), mode="bilinear", align_corners=False))


def write_sunrgbd(root: Path, frames: list[tuple[np.ndarray, np.ndarray]], split: str = "val") -> None:
    """SUN RGB-D as the depth toolbox lays it out: a split list of '<image> <depth>' paths under the
    root (with its leading slashes; a frame without depth listed as None), each depth a 16-bit PNG of
    millimetres with its bits rotated left by 3, as the data set stores them."""
    lines = []
    for i, (image, metres) in enumerate(frames):
        scene = f"SUNRGBD/kv1/NYUdata/NYU{i:04d}"
        millimetres = np.round(metres * 1000).astype(np.uint32)
        stored = ((millimetres << 3) | (millimetres >> 13)) & 0xFFFF
        (root / scene / "image").mkdir(parents=True, exist_ok=True)
        (root / scene / "depth_bfx").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / scene / "image" / f"NYU{i:04d}.png")
        Image.fromarray(stored.astype(np.uint16)).save(root / scene / "depth_bfx" / f"NYU{i:04d}.png")
        lines.append(f"/{scene}/image/NYU{i:04d}.png /{scene}/depth_bfx/NYU{i:04d}.png")
    lines.append("/SUNRGBD/kv2/missing/image/0000.jpg None")
    (root / f"SUNRGBD_{split}_splits.txt").write_text("\n".join(lines) + "\n")


def test_sunrgbd_layout_rotated_millimetres_the_8_metre_cap_and_nyus_crop(tmp_path: Path) -> None:
    """Its PNGs' bits rotated back to millimetres, metres beyond 8 capped at 8 (0 stays unknown),
    the val split scored at NYU's Eigen rows 45-470 and columns 41-600 of its 530 x 730 frames."""
    from evaluators.dense_datasets import load_sunrgbd

    rng = np.random.default_rng(0)
    metres = np.round(rng.uniform(0.5, 12, size=(530, 730)), 3)
    metres[:5] = 0  # no return
    image = rng.integers(0, 256, size=(530, 730, 3), dtype=np.uint8)
    write_sunrgbd(tmp_path, [(image, metres)], "val")
    write_sunrgbd(tmp_path, [(image, metres)], "train")
    want = np.minimum(metres, 8.0)
    val = load_sunrgbd(Storage(), str(tmp_path), "val", Fit("whole", 530))
    assert len(val) == 1 and val.names == ["SUNRGBD_kv1_NYUdata_NYU0000_image_NYU0000"]  # the None line skipped
    pixels, depths = _whole(val)
    np.testing.assert_array_equal(pixels[0].transpose(1, 2, 0), image)
    inside = np.zeros((530, 730), bool)
    inside[45:471, 41:601] = True
    np.testing.assert_allclose(depths[0][inside], want[inside], atol=1e-6)
    assert (depths[0][~inside] == 0).all()
    np.testing.assert_allclose(load_sunrgbd(Storage(), str(tmp_path), "train", Fit("whole", 530)).label(0).numpy(),
                               want, atol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"SUN RGB-D split list .*SUNRGBD_test_splits.txt is missing"):
        load_sunrgbd(Storage(), str(tmp_path), "test", 28)


def test_a_depth_head_trained_on_nyu_is_tested_on_sunrgbd(tmp_path: Path) -> None:
    """depth_data=nyu:<root>->sunrgbd:<root>: the head trains on NYU (red 2 m, green 9 m; its
    linearly normalised bins reach about 8 m in 150 steps) and is tested on SUN RGB-D's frames of the
    same look (one red, one green) whose green stands at 9.5 m, capped at 8. Its predictions capped
    at 8 too (the toolbox's rule), green scores near 0 error; the same frames read as an NYU test set
    at a true 5 m (predictions capped at NYU's 10 m) score the head's ~3 m miss on the green image.
    The head's saves name its training set alone: the transfer reuses the head trained for the other."""
    from evaluators.dense import HeadConfig
    from evaluators.suite import SuiteConfig, run_suite
    from trainer.models.vit import build_vit

    rng = np.random.default_rng(1)

    def halves(height: int, width: int, cut: int = 0) -> tuple[np.ndarray, np.ndarray]:
        cut = cut or int(rng.integers(width // 3, 2 * width // 3))
        image = np.zeros((height, width, 3), np.uint8)
        image[:, :cut], image[:, cut:] = (220, 30, 30), (30, 220, 30)
        red = np.arange(width)[None].repeat(height, 0) < cut
        return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8), red

    nyu, sun, nyu_view = tmp_path / "nyu", tmp_path / "sun", tmp_path / "nyu_view"
    for split, count in (("train", 10), ("test", 1)):
        (nyu / split).mkdir(parents=True)
        for i in range(count):
            image, red = halves(28, 40)
            np.savez(nyu / split / f"{i:05d}.npz", image=image, depth=np.where(red, 2.0, 9.0).astype(np.float32))
    frames = [halves(480, 640, cut) for cut in (640, 1)]  # all red, all green: no edge blurred by the windows
    write_sunrgbd(sun, [(image, np.where(red, 2.0, 9.5)) for image, red in frames])
    (nyu_view / "test").mkdir(parents=True)
    for i, (image, red) in enumerate(frames):
        np.savez(nyu_view / "test" / f"{i:05d}.npz", image=image, depth=np.where(red, 2.0, 5.0).astype(np.float32))
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28,
                         layerscale_init=1.0)

    def run(depth_data: str) -> dict[str, float]:
        config = SuiteConfig(tasks=("depth",), depth_data=depth_data, image_size=28, dense_augment=False,
                             depth_head=HeadConfig(steps=150), work_dir=str(tmp_path / "work"))
        return run_suite(backbone, config)["metrics"]

    as_nyu = run(f"nyu:{nyu}->nyu:{nyu_view}")
    transfer = run(f"nyu:{nyu}->sunrgbd:{sun}")
    assert as_nyu["depth_rmse"] > 0.8 and transfer["depth_rmse"] < 0.5 * as_nyu["depth_rmse"]
    for bad in (f"nyu:{nyu}->sunrgbd:{sun}->kitti:/k", f"nyu:{nyu}->coco:/c"):
        with pytest.raises(ValueError, match="depth_data"):
            SuiteConfig(tasks=("depth",), depth_data=bad)
    with pytest.raises(ValueError, match="a transfer, <train set>:<root>-><test set>:<root>, is depth's alone"):
        SuiteConfig(tasks=("seg",), seg_data="ade20k:/a->voc:/v")
    with pytest.raises(ValueError, match="a transfer, <train set>:<root>-><test set>:<root>, is depth's alone"):
        SuiteConfig(tasks=("retrieval",), retrieval_data="roxford5k:/o->rparis6k:/p")
    with pytest.raises(ValueError, match=f"depth_data = 'nyu:{nyu}->sunrgbd'; give <data set>:<root>"):
        SuiteConfig(tasks=("depth",), depth_data=f"nyu:{nyu}->sunrgbd")  # the test set's root missing


def test_dense_and_retrieval_tasks_take_image_sizes_of_their_own(tmp_path: Path) -> None:
    """``dense_image_size`` and ``retrieval_image_size``: one suite scores seg at 42 px and
    retrieval at 56 px beside a 28 px ``image_size``, as two suites at those image sizes score
    each; 0 keeps ``image_size``; a negative size is refused."""
    from evaluators.dense import HeadConfig
    from evaluators.suite import SuiteConfig, run_suite
    from tests.evaluators.test_retrieval import write_revisited
    from trainer.models.vit import build_vit

    voc, _ = write_halves(tmp_path)
    write_revisited(tmp_path / "oxford")
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28).eval()
    data = {"seg_data": f"voc:{voc}", "retrieval_data": f"roxford5k:{tmp_path / 'oxford'}",
            "seg_head": HeadConfig(steps=20), "dense_augment": False}
    both = run_suite(backbone, SuiteConfig(tasks=("seg", "retrieval"), image_size=28, dense_image_size=42,
                                           retrieval_image_size=56, **data))["metrics"]
    seg = run_suite(backbone, SuiteConfig(tasks=("seg",), image_size=42, **data))["metrics"]
    retrieval = run_suite(backbone, SuiteConfig(tasks=("retrieval",), image_size=56, **data))["metrics"]
    assert both == pytest.approx({**seg, **retrieval}, abs=1e-6)
    at_28 = run_suite(backbone, SuiteConfig(tasks=("seg",), image_size=28, **data))["metrics"]
    assert at_28 != pytest.approx(seg, abs=1e-6)  # the sizes change the scores: the check above could fail
    with pytest.raises(ValueError, match="dense_image_size, retrieval_image_size >= 0 \\(0: image_size\\), got 28, "
                                         "-1, 0"):
        SuiteConfig(tasks=("seg",), image_size=28, dense_image_size=-1)


def test_plus_ms_heads_train_at_the_ratios_their_test_scales_span() -> None:
    """The original's "ms" configs train at resize ratios 1-3 (640 crops) and test at 1-3 crops'
    scales; its plain configs train at 0.5-2: +ms's head trained at 0.5-2 would be tested at
    scales it never saw."""
    from evaluators.dense import MS_SCALES
    from evaluators.suite import SuiteConfig, train_fit

    plain = SuiteConfig(tasks=("seg",), image_size=28, seg_data="voc:/v")
    ms = SuiteConfig(tasks=("seg",), image_size=28, seg_data="voc:/v", layers=4, multiscale=True)
    assert train_fit("seg", plain, 7).scales == (0.5, 2.0)
    assert train_fit("seg", ms, 7).scales == (min(MS_SCALES), max(MS_SCALES)) == (1.0, 3.0)


def test_plus_ms_tests_a_head_trained_at_one_scale_near_it() -> None:
    """The scenes' heads and those of real sets without dense_augment train at the images' own scale:
    +ms tests them at 0.75-1.25, not at the original's 1-3 they never saw."""
    from evaluators.dense import MS_SCALES
    from evaluators.suite import MS_NEAR_SCALES, SuiteConfig, _DenseTask, _ms_scales, train_fit

    def scales(fit: Fit | None) -> tuple[float, ...]:
        return _ms_scales(_DenseTask(train=None, test=None, label_range=21, foreground=None, fit=fit))

    ms = SuiteConfig(tasks=("seg",), image_size=28, seg_data="voc:/v", layers=4, multiscale=True)
    assert scales(train_fit("seg", ms, 7)) == MS_SCALES
    single = SuiteConfig(tasks=("seg",), image_size=28, seg_data="voc:/v", layers=4, multiscale=True,
                         dense_augment=False)
    assert scales(train_fit("seg", single, 7)) == scales(None) == MS_NEAR_SCALES == (0.75, 1.0, 1.25)


def test_a_voc_heads_saves_are_named_by_the_training_set_read(tmp_path: Path) -> None:
    """A head trained on train.txt's 1,464 is not resumed once the root holds trainaug's list: the
    saves' identity names the layout (and, for the plain train split, stays as it was)."""
    from evaluators.dense_source import FeatureSource
    from evaluators.suite import SuiteConfig, _DenseTask, _head_saves

    write_voc(tmp_path)
    config = SuiteConfig(tasks=("seg",), image_size=28, seg_data=f"voc:{tmp_path}", work_dir=str(tmp_path / "work"))

    def identity() -> dict:
        train = FeatureSource(load_voc(Storage(), str(tmp_path), "train", fit=20), backbone=None)
        dense = _DenseTask(train=train, test=train, label_range=21, foreground=None)
        return _head_saves("seg", config, Storage(), "digest", dense).identity

    plain = identity()
    assert "layout" not in plain
    augmented = tmp_path / "with-sbd"  # the SBD's masks and list added to the root
    write_voc(augmented, "ImageSets/Segmentation/trainaug.txt")
    shutil.copytree(augmented / "SegmentationClassAug", tmp_path / "SegmentationClassAug")
    shutil.copy(augmented / "ImageSets/Segmentation/trainaug.txt", tmp_path / "ImageSets/Segmentation")
    assert identity() == {**plain, "layout": "trainaug"}
