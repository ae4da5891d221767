"""Dense heads on frozen features: they learn what the features hold, and score with the metrics."""

from __future__ import annotations

import pytest
import torch

from evaluators.dense import (
    HeadConfig,
    HeadSaves,
    LinearDepthHead,
    class_counts,
    class_weights,
    evaluate_depth,
    evaluate_segmentation,
    held_batches,
    multiscale_probabilities,
    patch_tokens,
    row_batches,
    silog_loss,
    slid_average,
    slid_logits,
    train_depth_head,
    train_segmentation_head,
    window_starts,
)
from evaluators.dense_metrics import depth_scores, segmentation_confusion, segmentation_scores
from trainer.models.vit import build_vit


def _blocky(count: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks made of 4x4-pixel blocks, and 'features' per block that encode the class (noisy one-hot)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (count, 4, 4), generator=generator)
    features = torch.nn.functional.one_hot(coarse, classes).permute(0, 3, 1, 2).float()
    features = features + 0.3 * torch.randn(features.shape, generator=generator)
    masks = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    return features, masks


def _segmentation_head(features: torch.Tensor, masks: torch.Tensor, classes: int,
                       config: HeadConfig) -> torch.nn.Module:
    weight = class_weights(class_counts(masks, classes), config.class_balance)
    return train_segmentation_head(lambda rows: held_batches((features, masks), rows), len(features),
                                   features.shape[1], classes, weight, config)


def _scored(head: torch.nn.Module, features: torch.Tensor, masks: torch.Tensor):
    return ((head(f, tuple(m.shape[-2:])), m) for f, m in held_batches((features, masks), row_batches(len(masks))))


def test_segmentation_head_learns_features_that_hold_the_class() -> None:
    features, masks = _blocky(64, 3, seed=0)
    masks[:, 0, 0] = 255  # ignored pixels do not break training or scoring
    head = _segmentation_head(features, masks, 3, HeadConfig(steps=160, batch_size=16, lr=1e-2))
    test_features, test_masks = _blocky(16, 3, seed=1)
    scores, maps = evaluate_segmentation(_scored(head, test_features, test_masks), 3, keep=6)
    assert scores["miou"] > 0.6 and scores["pixel_accuracy"] > 0.8  # bilinear edges cost a little
    # scored 4 images at a time: the same as the whole test set's class maps at once
    with torch.no_grad():
        whole = head(test_features, (16, 16)).argmax(dim=1)
    assert scores == segmentation_scores(segmentation_confusion(whole, test_masks, 3))
    torch.testing.assert_close(maps, whole[:6])
    noise, _ = evaluate_segmentation(_scored(head, torch.randn_like(test_features), test_masks), 3)
    assert noise["miou"] < 0.5


def test_class_weights_follow_inverse_frequency_to_the_given_power() -> None:
    masks = torch.tensor([[0, 0, 0, 0, 0, 0], [1, 1, 3, 255, 255, 0]])  # counts 7, 2, 0, 1 of 10
    expected = torch.tensor([10 / 7, 10 / 2, 0.0, 10 / 1]) ** 0.5
    expected /= expected[[0, 1, 3]].mean()
    counts = class_counts(masks, 4)
    assert counts.tolist() == [7, 2, 0, 1]
    assert (class_counts(masks[:1], 4) + class_counts(masks[1:], 4)).tolist() == counts.tolist()  # adds up by batch
    torch.testing.assert_close(class_weights(counts, 0.5), expected)
    torch.testing.assert_close(class_weights(counts, 0.0), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="class_balance in \\[0, 1\\]"):
        HeadConfig(class_balance=2.0)


def test_class_balance_raises_the_recall_of_a_rare_class() -> None:
    """Noisy 1-d features, class 1 on 5 % of pixels: the plain loss sets the boundary far into the
    rare class (its prior is small); weighting moves it back, so more of class 1 is found."""
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(256, 4, 4, generator=generator) < 0.05).long()
    features = (masks.float() + 0.4 * torch.randn(masks.shape, generator=generator))[:, None]

    def recall(balance: float) -> float:
        head = _segmentation_head(features, masks, 2, HeadConfig(steps=300, lr=5e-2, class_balance=balance))
        with torch.no_grad():
            predicted = head(features, (4, 4)).argmax(dim=1)
        return float((predicted[masks == 1] == 1).float().mean())

    plain, balanced = recall(0.0), recall(0.5)
    assert balanced > plain + 0.05, (plain, balanced)


def test_depth_head_learns_features_that_hold_the_depth() -> None:
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(64, 4, 4, generator=generator) * 8 + 1  # metres
    patches = torch.stack([coarse / 9, 1 - coarse / 9], dim=1) + 0.01 * torch.randn(64, 2, 4, 4, generator=generator)
    cls = torch.zeros(64, 2)
    depths = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    depths[:, :2] = 0  # unknown rows are not scored
    config = HeadConfig(steps=240, batch_size=16, lr=2e-2)
    head = train_depth_head(lambda rows: held_batches((patches, cls, depths), rows), 64, 2, config, bins=64,
                            max_depth=10.0)

    streamed: list[torch.Tensor] = []

    def scored(features: torch.Tensor):
        for p, c, d in held_batches((features, cls, depths), row_batches(64)):
            streamed.append(head(p, c, (16, 16)))
            yield streamed[-1], d

    good, maps = evaluate_depth(scored(patches), keep=5)
    whole = torch.cat(streamed)  # the very predictions, scored 4 images at a time: the tallies add up to these
    flat, _ = evaluate_depth(scored(torch.full_like(patches, 0.5)))
    assert good["abs_rel"] < 0.25 and good["rmse"] < 0.6 * flat["rmse"]
    assert good == pytest.approx(depth_scores(whole, depths), rel=1e-9)
    torch.testing.assert_close(maps, whole[:5], rtol=0, atol=0)
    assert silog_loss(depths + (depths == 0), depths) < 1e-3


def _upsample_first_depth(head: LinearDepthHead, patches: torch.Tensor, cls: torch.Tensor,
                          size: tuple[int, int]) -> torch.Tensor:
    """The original's linear depth head, written plainly: [patch, CLS] upsampled x4, BatchNorm and
    the 1x1 conv, the bins' logits ReLU'd plus 0.1 and divided by their sum, the centres' weighted
    sum, resized to ``size``."""
    x = torch.cat([patches, cls[:, :, None, None].expand_as(patches)], dim=1)
    upsampled = torch.nn.functional.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False)
    weights = head.classifier(head.norm(upsampled)).relu() + 0.1
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.nn.functional.interpolate(torch.einsum("bkhw,k->bhw", weights, head.centres)[:, None],
                                           size=size, mode="bilinear", align_corners=False)[:, 0]


def test_depth_head_at_patch_resolution_equals_the_originals_upsample_first_order_in_eval_mode() -> None:
    """In eval mode the cheap order gives the original's depths; in training mode it does not
    (BatchNorm's batch statistics differ between the patch grid and its upsampled map), which is
    why the head's comment claims the equality for eval mode alone."""
    torch.manual_seed(0)
    head = LinearDepthHead(6, bins=16, max_depth=5.0)
    torch.nn.init.normal_(head.norm.running_mean)
    torch.nn.init.uniform_(head.norm.running_var, 0.5, 2.0)
    patches, cls = torch.randn(2, 6, 3, 4), torch.randn(2, 6)
    with torch.no_grad():
        trained = head.train()(patches, cls, (21, 28)), _upsample_first_depth(head, patches, cls, (21, 28))
    assert (trained[0] - trained[1]).abs().max() > 1e-3
    head.eval()
    torch.testing.assert_close(head(patches, cls, (21, 28)), _upsample_first_depth(head, patches, cls, (21, 28)),
                               atol=1e-5, rtol=1e-5)


def test_depth_bins_are_normalised_linearly_as_the_originals() -> None:
    """With a zero 1x1 conv the bins' logits are its biases everywhere: the depth is the centres
    weighted by ``relu(bias) + 0.1`` over their sum (the original's "linear" norm_strategy), which a
    softmax over the biases is not."""
    head = LinearDepthHead(3, bins=4, min_depth=1.0, max_depth=4.0).eval()
    biases = torch.tensor([-2.0, 0.0, 0.0, 0.5])
    with torch.no_grad():
        head.classifier.weight.zero_()
        head.classifier.bias.copy_(biases)
    depth = head(torch.randn(2, 3, 2, 3), torch.randn(2, 3), (5, 7))
    weights = torch.tensor([0.1, 0.1, 0.1, 0.6])  # the negative logit counts as 0
    expected = float((weights * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum() / weights.sum())  # 10 / 3
    torch.testing.assert_close(depth, torch.full((2, 5, 7), expected))
    assert abs(expected - float(biases.softmax(0) @ head.centres)) > 0.1


def test_features_and_multiscale_probabilities_have_the_right_shapes() -> None:
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=16, depth=4, num_heads=2, img_size=28).eval()
    images = torch.randn(3, 3, 28, 28)
    patches, cls = patch_tokens(backbone, images, layers=4)
    assert patches.shape == (3, 64, 4, 4) and cls.shape == (3, 64)
    single, _ = patch_tokens(backbone, images, layers=1)
    torch.testing.assert_close(single, patches[:, 48:])  # the last layer is the last block of four
    head = _segmentation_head(patches, torch.zeros(3, 28, 28, dtype=torch.long), 5, HeadConfig(steps=1))
    probabilities = multiscale_probabilities(backbone, head, images, layers=4, scales=(0.5, 1.0))
    assert probabilities.shape == (3, 5, 28, 28)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3, 28, 28))
    plain = head(patches, (28, 28)).softmax(dim=1)
    torch.testing.assert_close(multiscale_probabilities(backbone, head, images, 4, scales=(1.0,), flip=False), plain)


def test_multiscale_defaults_to_the_original_ms_configs_ratios_with_flips() -> None:
    """+ms by default: the softmax averaged over the images' sides times 1, 1.32, 1.73, 2.28 and 3
    (mmseg's img_ratios in the original's ADE20K and VOC ms configs), each also flipped; computed
    here a second way, scale by scale, the flipped input's probabilities flipped back."""
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=16, depth=2, num_heads=2, img_size=28).eval()
    images = torch.randn(2, 3, 28, 35)
    head = _segmentation_head(patch_tokens(backbone, images)[0], torch.zeros(2, 28, 35, dtype=torch.long), 3,
                              HeadConfig(steps=1))
    with torch.no_grad():
        head.classifier.weight.normal_()
    total = torch.zeros(2, 3, 28, 35)
    for ratio in (1.0, 1.32, 1.73, 2.28, 3.0):
        side = (max(7, round(28 * ratio / 7) * 7), max(7, round(35 * ratio / 7) * 7))
        scaled = torch.nn.functional.interpolate(images, size=side, mode="bilinear", align_corners=False)
        with torch.no_grad():
            total += head(patch_tokens(backbone, scaled)[0], (28, 35)).softmax(1)
            total += head(patch_tokens(backbone, scaled.flip(-1))[0], (28, 35)).softmax(1).flip(-1)
    torch.testing.assert_close(multiscale_probabilities(backbone, head, images, 1), total / 10)


@pytest.mark.parametrize("length", [5, 14, 15, 28, 41, 60, 97])
@pytest.mark.parametrize(("window", "stride"), [(14, 9), (14, 14), (14, 5), (28, 19)])
def test_windows_cover_every_pixel_stride_apart_and_end_flush(length: int, window: int, stride: int) -> None:
    starts = window_starts(length, window, stride)
    if length <= window:
        assert starts == [0]
        return
    covered = set().union(*(range(s, s + window) for s in starts))
    assert covered == set(range(length)) and starts[0] == 0 and starts[-1] == length - window
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
    assert len(starts) == len(range(0, length - window, stride)) + 1  # no window more than needed


def test_sliding_windows_average_the_heads_logits_where_they_overlap() -> None:
    """Against a second implementation: each window run alone, its logits added pixel by pixel and
    divided by how many windows cover each pixel (mmseg's slide inference: the softmax is taken of
    that average, which is not the average of the windows' softmax where they overlap)."""
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=16, depth=2, num_heads=2, img_size=28).eval()
    images = torch.randn(1, 3, 35, 63)  # 5 x 9 patches: windows of 28 at 19 apart, 2 x 3 of them
    patches, _ = patch_tokens(backbone, images[..., :28, :28])
    head = _segmentation_head(patches, torch.zeros(1, 28, 28, dtype=torch.long), 4, HeadConfig(steps=1))
    with torch.no_grad():  # a head whose classes differ from place to place
        head.classifier.weight.normal_()
    got = slid_logits(backbone, head, images, window=28, windows_per_pass=4)
    logits, softmax, count = torch.zeros(1, 4, 35, 63), torch.zeros(1, 4, 35, 63), torch.zeros(1, 1, 35, 63)
    for top in (0, 7):
        for left in (0, 19, 35):
            crop = images[..., top : top + 28, left : left + 28]
            with torch.no_grad():
                window = head(patch_tokens(backbone, crop)[0], (28, 28))
            logits[..., top : top + 28, left : left + 28] += window
            softmax[..., top : top + 28, left : left + 28] += window.softmax(1)
            count[..., top : top + 28, left : left + 28] += 1
    torch.testing.assert_close(got, logits / count)
    assert (got.softmax(1) - softmax / count).abs().max() > 1e-2  # the two averages differ where windows overlap
    # a side shorter than the window is one window of its length; an image the window's size, the plain head
    narrow = images[..., :21, :]
    assert slid_logits(backbone, head, narrow, window=28).shape == (1, 4, 21, 63)
    square = images[..., :28, :28]
    with torch.no_grad():
        plain = head(patch_tokens(backbone, square)[0], (28, 28))
    torch.testing.assert_close(slid_logits(backbone, head, square, window=28), plain)
    # +ms through windows: at scale 1 without flips it is the softmax of the windows' average logits, the
    # windows half a window apart (the original's ms configs' stride, 320 of 640), not two thirds as without +ms
    one_scale = multiscale_probabilities(backbone, head, images, 1, scales=(1.0,), flip=False, window=28)
    torch.testing.assert_close(one_scale, slid_logits(backbone, head, images, window=28, stride=14).softmax(1))
    assert (one_scale - got.softmax(1)).abs().max() > 1e-3
    # depths (no channel dimension) average the same way: where one window covers, its own prediction,
    # from the blocks normed or not as asked
    depth_head = LinearDepthHead(16).eval()
    for norm in (True, False):
        depths = slid_average(backbone, depth_head, images, window=28, windows_per_pass=4, norm=norm)
        assert depths.shape == (1, 35, 63)
        with torch.no_grad():
            corner = depth_head(*patch_tokens(backbone, images[..., :28, :28], norm=norm), (28, 28))
        torch.testing.assert_close(depths[..., :7, :19], corner[..., :7, :19])  # covered by the first window alone


def test_pca_pictures_match_scikit_learn_and_stay_in_range(tmp_path) -> None:
    import numpy as np
    from sklearn.decomposition import PCA

    from evaluators.visualize import pca_components, pca_rgb, save_pca_maps

    rng = np.random.default_rng(0)
    patches = rng.normal(size=(4, 12, 5, 6)) * np.linspace(3, 0.1, 12)[None, :, None, None]
    ours = pca_components(patches, 3).reshape(-1, 3)
    reference = PCA(3).fit_transform(patches.transpose(0, 2, 3, 1).reshape(-1, 12))
    for k in range(3):  # principal axes are defined up to sign
        assert min(np.abs(ours[:, k] - reference[:, k]).max(), np.abs(ours[:, k] + reference[:, k]).max()) < 1e-8
    colours = pca_rgb(patches)
    assert colours.shape == (4, 5, 6, 3) and colours.min() >= 0 and colours.max() <= 1
    path = save_pca_maps(rng.integers(0, 255, (4, 3, 35, 42), dtype=np.uint8), patches, tmp_path / "pca.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_half_precision_dense_features_and_descriptors_are_the_fp32_ones_rounded() -> None:
    """``precision`` bf16 reaches every feature pass: the patch features, +ms and the retrieval
    descriptors come from the backbone under autocast, near the fp32 ones but not equal."""
    from evaluators.retrieval import global_descriptors

    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=16, depth=2, num_heads=2, img_size=28).eval()
    images = torch.randn(3, 3, 28, 28)
    for fp32, bf16 in (
        (patch_tokens(backbone, images)[0], patch_tokens(backbone, images, amp_dtype=torch.bfloat16)[0]),
        (global_descriptors(backbone, images), global_descriptors(backbone, images, amp_dtype=torch.bfloat16)),
    ):
        assert bf16.dtype == torch.float32
        torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)
        assert not torch.equal(bf16, fp32)
    head = _segmentation_head(patch_tokens(backbone, images)[0], torch.zeros(3, 28, 28, dtype=torch.long), 5,
                              HeadConfig(steps=1))
    torch.testing.assert_close(multiscale_probabilities(backbone, head, images, 1, amp_dtype=torch.bfloat16),
                               multiscale_probabilities(backbone, head, images, 1), rtol=0.05, atol=0.05)


def test_a_head_training_resumes_from_its_last_save_as_the_unbroken_one(storage_root) -> None:
    """A segmentation and a depth head's training saved as it goes (every step here; a minute by
    default) and lost after 12 of 30 steps: the rerun asks only for the batches of steps 13-30 (no
    backbone pass on the rest when features are made per batch), ends with the unbroken run's
    head, and a third run, all done, asks for none; a folder of another training is refused."""
    from dinoflow.storage import join_uri
    from evaluators.dense import head_batches

    storage, root = storage_root
    features, masks = _blocky(48, 3, seed=0)
    cls, depths = features.mean(dim=(2, 3)), masks.float() + 1
    config = HeadConfig(steps=30, batch_size=8, lr=1e-2)
    rows = head_batches(48, config)
    for task, tensors, train in (
        ("seg", (features, masks), lambda batches, saves: train_segmentation_head(
            batches, 48, 3, 3, config=config, saves=saves)),
        ("depth", (features, cls, depths), lambda batches, saves: train_depth_head(
            batches, 48, 3, config, bins=16, max_depth=4.0, saves=saves)),
    ):
        asked: list[list[torch.Tensor]] = []

        def batches(steps, lost_after=None):
            asked.append(list(steps))
            for done, batch in enumerate(held_batches(tensors, steps)):
                if done == lost_after:
                    raise RuntimeError("pod lost")
                yield batch

        unbroken = train(batches, None).state_dict()
        saves = HeadSaves(storage, join_uri(root, task), {"task": task}, every_s=0.0)
        with pytest.raises(RuntimeError, match="pod lost"):
            train(lambda steps: batches(steps, lost_after=12), saves)
        asked.clear()
        resumed = train(batches, saves).state_dict()
        assert len(asked) == 1 and all(torch.equal(a, b) for a, b in zip(asked[0], rows[12:], strict=True))
        assert unbroken.keys() == resumed.keys()
        for name in unbroken:
            torch.testing.assert_close(resumed[name], unbroken[name], rtol=0, atol=0, msg=f"{task} {name}")
        asked.clear()
        again = train(batches, saves).state_dict()
        assert asked == [[]] and all(torch.equal(again[name], unbroken[name]) for name in unbroken)
        with pytest.raises(ValueError, match="holds another head's training \\(it differs in task \\("):
            train(batches, HeadSaves(storage, join_uri(root, task), {"task": "other"}))
