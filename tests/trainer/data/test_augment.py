"""The batched multi-crop augmentation against independent references: torch's bicubic resize,
the colour formulas (hue through Python's colorsys), a numpy Gaussian blur, and binomial bounds
on the drawn probabilities; and that it reads nothing back from the device (meta tensors)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoflow.config import CropsConfig
from trainer.data.augment import (ASPECT_RATIOS, SOLARIZE_THRESHOLD, AugmentParams, MultiCrop, Stages, augment_crops,
                                  crop_boxes, draw_params, resized_crops)
from trainer.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from trainer.models.compile import compiled_now


def neutral(n: int, **changes: torch.Tensor) -> AugmentParams:
    """Parameters that change nothing, but for ``changes``."""
    values = dict(boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n, 1), flips=torch.ones(n),
                  brightness=torch.ones(n), contrast=torch.ones(n), saturation=torch.ones(n), hue=torch.zeros(n),
                  grayscale=torch.zeros(n, dtype=torch.bool), sigma=torch.zeros(n),
                  solarize=torch.zeros(n, dtype=torch.bool))
    return AugmentParams(**{**values, **changes})


def test_whole_image_crop_is_torchs_bicubic_resize_and_flip() -> None:
    torch.manual_seed(0)
    pixels = torch.rand(3, 3, 20, 20)
    boxes = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(2, 3, 1)
    flips = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    crops = resized_crops(pixels, boxes, flips, 13)
    reference = F.interpolate(pixels, size=(13, 13), mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(crops[0], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(crops[1], reference.flip(-1), atol=1e-5, rtol=0)


def test_pixel_aligned_box_at_its_own_size_is_the_slice() -> None:
    """Bicubic sampling at the input's pixel centres returns those pixels: a box on the pixel grid,
    cropped at its own size, is the image's slice (here 8 x 6 pixels from (4, 2) of a 16 x 16 image)."""
    pixels = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([4 / 16, 2 / 16, 8 / 16, 8 / 16]).repeat(1, 2, 1)
    crops = resized_crops(pixels, boxes, torch.ones(1, 2), 8)
    torch.testing.assert_close(crops[0], pixels[:, :, 2:10, 4:12], atol=1e-5, rtol=0)


def test_crop_boxes_follow_the_random_resized_crop_rule() -> None:
    torch.manual_seed(1)
    scale = (0.05, 0.32)
    boxes = crop_boxes(20_000, scale, torch.device("cpu"))
    x0, y0, w, h = boxes.unbind(1)
    assert bool((x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all())
    area, ratio = w * h, w / h
    assert bool((area >= scale[0] - 1e-6).all() and (area <= scale[1] + 1e-6).all())
    assert bool((ratio >= ASPECT_RATIOS[0] - 1e-5).all() and (ratio <= ASPECT_RATIOS[1] + 1e-5).all())
    # uniform area share and log-uniform ratio (every try fits at these scales), uniform position
    assert abs(float(area.mean()) - sum(scale) / 2) < 0.003
    assert abs(float(ratio.log().mean())) < 0.005
    assert abs(float((x0 / (1 - w)).mean()) - 0.5) < 0.01


def test_crop_boxes_fall_back_to_the_whole_image_when_no_try_fits() -> None:
    torch.manual_seed(2)
    boxes = crop_boxes(5_000, (0.99, 1.0), torch.device("cpu"))
    whole = (boxes == torch.tensor([0.0, 0.0, 1.0, 1.0])).all(1)
    w, h = boxes[:, 2], boxes[:, 3]
    assert bool(((w <= 1) & (h <= 1)).all())
    # a near-full area fits only if the ratio is near 1: most crops fall back, the rest fit
    assert 0.5 < float(whole.float().mean()) < 1.0
    assert bool((w[~whole] * h[~whole] >= 0.99 - 1e-6).all())


def test_crop_boxes_of_wide_and_tall_images_follow_the_rule_in_their_pixels() -> None:
    """Boxes in fractions of a squeezed image's width and height: in the image's own pixels
    (``w a`` wide for ``h`` high) their area share lies in the scale and their ratio in the range."""
    torch.manual_seed(3)
    aspects = torch.empty(20_000).uniform_(math.log(0.5), math.log(2.0)).exp()
    scale = (0.05, 0.32)
    x0, y0, w, h = crop_boxes(len(aspects), scale, torch.device("cpu"), aspects).unbind(1)
    assert bool((x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all())
    area, ratio = w * h, w * aspects / h
    assert bool((area >= scale[0] - 1e-6).all() and (area <= scale[1] + 1e-6).all())
    assert bool((ratio >= ASPECT_RATIOS[0] - 1e-5).all() and (ratio <= ASPECT_RATIOS[1] + 1e-5).all())
    assert abs(float(ratio.log().mean())) < 0.005  # log-uniform in the image's pixels, whatever its shape
    assert abs(float(area.mean()) - sum(scale) / 2) < 0.003


def test_crop_boxes_fall_back_to_the_centred_box_of_the_clamped_ratio() -> None:
    """torchvision's fallback: the image's own ratio clamped to the range, centred (3:1 -> a
    4:3 box of full height; 1:3 -> a 3:4 box of full width; 5:4 -> the whole image)."""
    torch.manual_seed(4)
    aspects = torch.tensor([3.0, 1 / 3, 1.25]).repeat(2_000)
    boxes = crop_boxes(len(aspects), (0.999, 1.0), torch.device("cpu"), aspects)
    wide, tall, within = boxes[0::3], boxes[1::3], boxes[2::3]
    torch.testing.assert_close(wide, torch.tensor([(1 - 4 / 9) / 2, 0.0, 4 / 9, 1.0]).expand_as(wide))
    torch.testing.assert_close(tall, torch.tensor([0.0, (1 - 4 / 9) / 2, 1.0, 4 / 9]).expand_as(tall))
    whole = (within == torch.tensor([0.0, 0.0, 1.0, 1.0])).all(1)
    assert float(whole.float().mean()) > 0.9  # a 5:4 image's near-full box fits only near ratio 5:4


def test_crop_of_a_squeezed_image_shows_the_image_unsqueezed() -> None:
    """A 90 x 60 picture held squeezed in a 60 x 60 square: the crop of the box given in fractions
    of that square is the picture's own pixel box resized (torch's bicubic resize of its slice),
    up to the squeeze's resampling of smooth content."""
    ys, xs = torch.meshgrid(torch.arange(60.0), torch.arange(90.0), indexing="ij")
    picture = torch.stack([0.5 + 0.4 * torch.sin(xs / 9), 0.5 + 0.4 * torch.cos(ys / 7), (xs + ys) / 150])[None]
    square = F.interpolate(picture, size=(60, 60), mode="bicubic", antialias=True, align_corners=False)
    left, top, side = 30, 12, 36  # a square box in the picture's pixels
    boxes = torch.tensor([left / 90, top / 60, side / 90, side / 60]).view(1, 1, 4)
    crop = resized_crops(square, boxes, torch.ones(1, 1), 24)[0]
    want = F.interpolate(picture[..., top:top + side, left:left + side], size=(24, 24), mode="bicubic",
                         antialias=True, align_corners=False).clamp(0, 1)
    assert float((crop - want).abs().max()) < 0.02


@pytest.mark.parametrize("step", ["brightness", "contrast", "saturation", "hue"])
def test_colour_steps_match_their_formulas(step: str) -> None:
    torch.manual_seed(3)
    crops = torch.rand(4, 3, 5, 5)
    factors = {"brightness": torch.tensor([0.6, 1.0, 1.3, 1.4]), "contrast": torch.tensor([0.6, 1.0, 1.2, 1.4]),
               "saturation": torch.tensor([0.8, 1.0, 1.1, 1.2]), "hue": torch.tensor([-0.1, 0.0, 0.05, 0.1])}[step]
    out = augment_crops(crops, neutral(4, **{step: factors}), 9, [["brightness", "contrast", "saturation",
                                                                   "hue"].index(step)])
    x, f = crops.double(), factors.double()[:, None, None, None]
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    if step == "brightness":
        expected = x * f
    elif step == "contrast":
        expected = (x - gray.mean((2, 3), keepdim=True)) * f + gray.mean((2, 3), keepdim=True)
    elif step == "saturation":
        expected = (x - gray) * f + gray
    else:
        expected = torch.empty_like(x)
        for i, shift in enumerate(factors.tolist()):
            for r in range(5):
                for c in range(5):
                    hue, sat, val = colorsys.rgb_to_hsv(*x[i, :, r, c].tolist())
                    expected[i, :, r, c] = torch.tensor(colorsys.hsv_to_rgb((hue + shift) % 1.0, sat, val))
    torch.testing.assert_close(out.double(), expected.clamp(0, 1), atol=2e-5, rtol=0)


def test_grayscale_blur_and_solarisation() -> None:
    torch.manual_seed(4)
    crops = torch.rand(3, 3, 12, 12)
    chosen = torch.tensor([True, False, True])
    gray = augment_crops(crops, neutral(3, grayscale=chosen), 9, [])
    luma = 0.299 * crops[:, 0] + 0.587 * crops[:, 1] + 0.114 * crops[:, 2]
    torch.testing.assert_close(gray[0], luma[0].expand(3, -1, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(gray[1], crops[1])

    sigma = torch.tensor([0.7, 0.0, 1.9])
    blurred = augment_crops(crops, neutral(3, sigma=sigma), 8, [])  # an even size rounds up to 9 taps
    for i, s in enumerate(sigma.tolist()):
        if s == 0:
            torch.testing.assert_close(blurred[i], crops[i])
            continue
        taps = np.exp(-np.arange(-4, 5) ** 2 / (2 * s * s))
        taps /= taps.sum()
        padded = np.pad(crops[i].double().numpy(), ((0, 0), (4, 4), (4, 4)), mode="reflect")
        rows = sum(taps[k] * padded[:, k:k + 12, :] for k in range(9))
        expected = sum(taps[k] * rows[:, :, k:k + 12] for k in range(9))
        np.testing.assert_allclose(blurred[i].double().numpy(), expected, atol=1e-5)

    solar = augment_crops(crops, neutral(3, solarize=chosen), 9, [])
    expected = torch.where(crops < SOLARIZE_THRESHOLD, crops, 1 - crops)
    torch.testing.assert_close(solar[chosen], expected[chosen])
    torch.testing.assert_close(solar[~chosen], crops[~chosen])


def test_drawn_probabilities_and_ranges() -> None:
    torch.manual_seed(5)
    n = 40_000
    blur_p = torch.tensor([1.0, 0.1, 0.5, 0.0]).repeat_interleave(n // 4)
    solarize_p = torch.tensor([0.0, 0.2, 0.0, 0.0]).repeat_interleave(n // 4)
    params = draw_params(n, (0.32, 1.0), blur_p, solarize_p)

    def near(chosen: torch.Tensor, p: float) -> None:
        share, bound = float(chosen.float().mean()), 5 * math.sqrt(p * (1 - p) / chosen.numel()) + 1e-9
        assert abs(share - p) <= bound, (share, p)

    near(params.flips < 0, 0.5)
    jittered = params.brightness != 1
    near(jittered, 0.8)
    assert bool((jittered == (params.contrast != 1)).all() and (jittered == (params.hue != 0)).all())
    assert 0.6 <= float(params.brightness.min()) and float(params.brightness.max()) <= 1.4
    assert 0.8 <= float(params.saturation.min()) and float(params.saturation.max()) <= 1.2
    assert float(params.hue.abs().max()) <= 0.1
    near(params.grayscale, 0.2)
    for i, p in enumerate([1.0, 0.1, 0.5, 0.0]):
        part = params.sigma.view(4, -1)[i]
        near(part > 0, p)
        assert bool(((part == 0) | ((part >= 0.1) & (part <= 2.0))).all())
    for i, p in enumerate([0.0, 0.2, 0.0, 0.0]):
        near(params.solarize.view(4, -1)[i], p)


def test_multicrop_shapes_seeding_and_normalisation() -> None:
    crops = CropsConfig(load_size=32, global_crop_size=24, local_crop_size=12, num_local_crops=3)
    module = MultiCrop(crops)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(6)
    first = module(images)
    torch.manual_seed(6)
    again = module(images)
    other = module(images)
    assert first[0].shape == (2, 5, 3, 24, 24) and first[1].shape == (3, 5, 3, 12, 12)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for kind in first:
        pixels = kind * std + mean
        assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    torch.manual_seed(6)
    square = module(images, torch.ones(5))  # square images' aspects draw what no aspects do
    assert all(torch.equal(a, b) for a, b in zip(first, square))
    torch.manual_seed(6)
    wide = module(images, torch.full((5,), 2.0))
    assert wide[0].shape == first[0].shape and not torch.equal(wide[0], first[0])
    none = MultiCrop(crops.model_copy(update={"num_local_crops": 0}))(images)[1]
    assert none.shape == (0, 5, 3, 1, 1)
    with pytest.raises(ValueError, match="expected uint8 images"):
        module(images.float())


def test_multicrop_reads_nothing_back_from_the_device() -> None:
    """Meta tensors have no values: any read back to the host (an ``.item()``, a boolean index, a
    data-dependent branch), which on a GPU would wait for the queued step, raises here."""
    crops = CropsConfig(load_size=64, global_crop_size=56, local_crop_size=28, num_local_crops=4)
    module = MultiCrop(crops).to("meta")
    global_crops, local_crops = module(torch.empty(6, 3, 64, 64, dtype=torch.uint8, device="meta"))
    assert global_crops.shape == (2, 6, 3, 56, 56) and local_crops.shape == (4, 6, 3, 28, 28)
    assert global_crops.device.type == "meta"



def test_compiled_stages_make_the_eager_crops() -> None:
    """``crops.compile``: each jitter order through the compiled stages gives the eager pixels (to
    float rounding), normalised in the last stage; a seeded ``MultiCrop`` makes the eager crops at
    both crop sizes; no stage fell back to eager."""
    torch.manual_seed(7)
    crops = torch.rand(6, 3, 12, 12)
    params = draw_params(6, (0.32, 1.0), torch.full((6,), 0.5), torch.full((6,), 0.5))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    stages = Stages.compiled()
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        expected = (augment_crops(crops, params, 9, order) - mean) / std
        torch.testing.assert_close(augment_crops(crops, params, 9, order, stages, mean, std), expected,
                                   atol=2e-5, rtol=0)

    config = CropsConfig(load_size=32, global_crop_size=24, local_crop_size=12, num_local_crops=3)
    eager, compiled = MultiCrop(config), MultiCrop(config.model_copy(update={"compile": True}))
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(8)
    expected = eager(images)
    torch.manual_seed(8)
    for made, reference in zip(compiled(images), expected):
        torch.testing.assert_close(made, reference, atol=2e-5, rtol=0)
    assert all(compiled_now(stage) for stage in (*stages.jitter, stages.finish, *compiled.stages.jitter,
                                                 compiled.stages.finish))
