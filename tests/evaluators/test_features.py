"""Frozen-feature extraction on a tiny ViT, and the uint8 -> model input helper."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from evaluators.features import IMAGENET_MEAN, IMAGENET_STD, extract_features, labelled_features, to_model_input
from trainer.models.vit import DinoVisionTransformer, build_vit

DIM = 32


def tiny_vit(registers: int = 0) -> DinoVisionTransformer:
    torch.manual_seed(0)
    # LayerScale 1 so that every block visibly changes the tokens (1e-5 would make them all alike)
    return build_vit("vit_small", registers, img_size=28, patch_size=7, embed_dim=DIM, depth=4, num_heads=4,
                     layerscale_init=1.0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(7, 3, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("layers", "with_patch_mean", "width"), [(1, False, DIM), (1, True, 2 * DIM),
                                                                  (4, False, 4 * DIM), (4, True, 5 * DIM)])
def test_shapes_and_batching(images: torch.Tensor, layers: int, with_patch_mean: bool, width: int) -> None:
    model = tiny_vit()
    batched, labels = extract_features(model, images, batch_size=3, layers=layers, with_patch_mean=with_patch_mean)
    whole, _ = extract_features(model, images, batch_size=64, layers=layers, with_patch_mean=with_patch_mean)
    assert batched.shape == (7, width) and batched.dtype == torch.float32 and batched.device.type == "cpu"
    assert not batched.is_inference()  # a probe trained with autograd can use them
    assert labels is None
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=1e-5)


def test_last_layer_features_are_forward_features(images: torch.Tensor) -> None:
    model = tiny_vit(registers=4)  # registers must not leak into the patch mean
    features, _ = extract_features(model, images, batch_size=4, layers=1, with_patch_mean=True)
    with torch.no_grad():
        out = model.eval().forward_features(images)
    torch.testing.assert_close(features[:, :DIM], out["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features[:, DIM:], out["x_norm_patchtokens"].mean(dim=1), atol=1e-5, rtol=1e-5)


def test_four_layers_are_each_blocks_normalised_cls(images: torch.Tensor) -> None:
    model = tiny_vit().eval()
    features, _ = extract_features(model, images, layers=4, with_patch_mean=True)
    # independently: block i's normalised CLS is the final CLS of the model cut after block i
    expected = []
    with torch.no_grad():
        for depth in range(1, 5):
            cut = copy.deepcopy(model)
            cut.blocks = torch.nn.ModuleList(list(model.blocks)[:depth])
            expected.append(cut.forward_features(images)["x_norm_clstoken"])
        expected.append(model.forward_features(images)["x_norm_patchtokens"].mean(dim=1))
    torch.testing.assert_close(features, torch.cat(expected, dim=1), atol=1e-5, rtol=1e-5)
    # the blocks differ, so the concatenation order is actually checked
    assert (features[:, :DIM] - features[:, 3 * DIM : 4 * DIM]).abs().max() > 1e-2


def test_labelled_features_of_uint8_images_take_the_last_blocks_cls_tokens() -> None:
    model = tiny_vit().eval()
    pixels = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    inputs = to_model_input(pixels, patch_size=7)
    for layers in (1, 4):
        expected, _ = extract_features(model, inputs, layers=layers)
        torch.testing.assert_close(labelled_features(model, pixels, 7, batch_size=2, layers=layers), expected)
    assert labelled_features(model, pixels, 7, layers=4).shape == (5, 4 * DIM)


def test_loader_input_returns_labels_and_restores_mode(images: torch.Tensor) -> None:
    model = tiny_vit().train()
    labels = torch.arange(7)
    loader = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    features, got_labels = extract_features(model, loader, layers=4)
    expected, _ = extract_features(model, images, layers=4)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_labels, labels)
    assert model.training  # put back as found
    images_only, none = extract_features(model, [images[:4], images[4:]])
    assert images_only.shape == (7, DIM) and none is None


def test_bad_inputs_are_named(images: torch.Tensor) -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match="layers must be in \\[1, 4\\], got 5"):
        extract_features(model, images, layers=5)
    with pytest.raises(ValueError, match="must be float model input"):
        extract_features(model, images.to(torch.uint8))
    with pytest.raises(ValueError, match="some batches carry labels"):
        extract_features(model, [(images[:2], torch.zeros(2)), images[2:]])


def test_model_input_normalisation_matches_hand_formula() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 3, 14, 21), dtype=np.uint8)
    got = to_model_input(rgb, patch_size=7).numpy()
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    for c in range(3):
        np.testing.assert_allclose(got[:, c], (rgb[:, c] / 255.0 - mean[c]) / std[c], atol=1e-5)

    gray = rng.integers(0, 256, (2, 14, 14), dtype=np.uint8)
    got = to_model_input(torch.from_numpy(gray), patch_size=14).numpy()
    assert got.shape == (2, 3, 14, 14)
    for c in range(3):  # the gray level repeated, then normalised with each channel's own statistics
        np.testing.assert_allclose(got[:, c], (gray / 255.0 - mean[c]) / std[c], atol=1e-5)


def test_model_input_is_made_where_the_pixels_are() -> None:
    """uint8 pixels on a device are normalised (and resized) there, no host tensor mixed in: the
    meta device, which holds no values and refuses a CPU operand, stands for a GPU here."""
    pixels = torch.zeros(2, 3, 28, 28, dtype=torch.uint8, device="meta")
    for size in (None, 14):
        made = to_model_input(pixels, size=size, patch_size=14)
        assert made.device.type == "meta" and made.dtype == torch.float32
    if torch.cuda.is_available():  # the same values on a GPU as on the host
        rgb = torch.randint(0, 256, (2, 3, 14, 14), dtype=torch.uint8)
        torch.testing.assert_close(to_model_input(rgb.cuda()).cpu(), to_model_input(rgb))


def test_model_input_resize() -> None:
    flat = np.full((1, 28, 28), 200, dtype=np.uint8)  # bicubic keeps a constant image constant
    got = to_model_input(flat, size=14, patch_size=14)
    assert got.shape == (1, 3, 14, 14)
    expected = (200 / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(got, expected.view(1, 3, 1, 1).expand(1, 3, 14, 14), atol=1e-5, rtol=1e-5)
    # overshoot at sharp edges is clamped to the [0, 1] pixel range before normalising
    edges = np.zeros((1, 28, 28), dtype=np.uint8)
    edges[:, :, ::2] = 255
    pixels = to_model_input(edges, size=(14, 21), patch_size=7) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels += torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert pixels.shape == (1, 3, 14, 21)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="not a positive multiple of patch_size 14"):
        to_model_input(flat, size=20)
    with pytest.raises(ValueError, match="must be uint8"):
        to_model_input(np.zeros((1, 14, 14), dtype=np.float32))
