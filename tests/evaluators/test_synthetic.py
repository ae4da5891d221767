"""Synthetic scenes: exact masks and depth with occlusion, determinism, retrieval ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from evaluators.dense_metrics import rank, retrieval_map
from evaluators.synthetic import (
    CLASS_NAMES,
    SceneConfig,
    _shape_mask,
    ground_depth,
    ground_row,
    make_retrieval_set,
    make_scenes,
    render_scene,
)


def test_scenes_have_consistent_shapes_ranges_and_classes() -> None:
    scenes = make_scenes(24, seed=3)
    assert scenes.images.shape == (24, 3, 56, 56) and scenes.images.dtype == np.uint8
    assert scenes.masks.shape == scenes.depths.shape == (24, 56, 56)
    assert set(np.unique(scenes.masks)) == set(range(len(CLASS_NAMES)))  # every class occurs
    config = SceneConfig()
    assert config.near <= scenes.depths.min() and scenes.depths.max() <= config.far
    plane = scenes.masks == 0
    # the plane's depth is a function of the row alone, in perspective: inverse depth is linear
    # in the row, from 1/far at the top edge to 1/near at the bottom edge
    rows = np.broadcast_to(np.arange(56)[None, :, None], plane.shape)
    expected = 1 / (1 / config.far + (1 / config.near - 1 / config.far) * (rows + 0.5) / 56)
    np.testing.assert_allclose(scenes.depths[plane], expected[plane], rtol=1e-5)
    # shapes stand in front of the plane behind them
    assert (scenes.depths[~plane] < expected[~plane]).all()


def test_each_pixel_shows_the_nearest_shape_covering_it() -> None:
    config = SceneConfig(min_shapes=4, max_shapes=6)
    overlaps = 0
    for seed in range(20):
        _, mask, depth, shapes = render_scene(np.random.default_rng(seed), config)
        ys, xs = np.mgrid[0:56, 0:56] + 0.5
        plane = 1 / (1 / config.far + (1 / config.near - 1 / config.far) * ys / 56)
        # independent composition: per pixel, the minimum over the plane and every covering shape
        stack = [plane] + [np.where(_shape_mask(k, ys, xs, cy, cx, r), z, np.inf) for z, k, cy, cx, r in shapes]
        classes = np.array([0] + [k for _, k, *_ in shapes])
        nearest = np.argmin(np.stack(stack), axis=0)
        np.testing.assert_allclose(depth, np.min(np.stack(stack), axis=0), rtol=1e-6)
        np.testing.assert_array_equal(mask, classes[nearest])
        covered = sum(np.isfinite(layer) for layer in stack[1:])
        overlaps += int((covered > 1).sum())
    assert overlaps > 100  # the scenes do have occlusions to get right


def test_ground_row_inverts_ground_depth_and_stands_shapes_on_the_plane() -> None:
    config = SceneConfig()
    rows = np.linspace(0, 56, 9)
    np.testing.assert_allclose(ground_row(ground_depth(rows, config), config), rows, atol=1e-9)
    for seed in range(5):
        *_, shapes = render_scene(np.random.default_rng(seed), config)
        for z, _, cy, _, radius in shapes:  # a shape's foot (centre row + radius) is on its depth's row
            assert config.near <= z <= config.far
            np.testing.assert_allclose(ground_depth(np.asarray(cy + radius), config), z, rtol=1e-9)


def test_scenes_are_a_function_of_the_seed() -> None:
    a, b, c = make_scenes(3, seed=1), make_scenes(3, seed=1), make_scenes(3, seed=2)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    np.testing.assert_array_equal(make_scenes(5, seed=1).masks[:3], a.masks)  # scene i does not depend on count


def test_retrieval_ground_truth_points_at_copies_of_the_query_scene() -> None:
    data = make_retrieval_set(6, easy=2, hard=2, junk=1, seed=0)
    assert data.queries.shape == (6, 3, 56, 56) and data.database.shape == (30, 3, 56, 56)
    positions = [p for t in data.truths for p in (*t.easy, *t.hard, *t.junk)]
    assert sorted(positions) == list(range(30))  # every database image has exactly one role
    # raw pixels already find easy copies better than hard ones: the roles mean something
    flat = lambda x: (x.reshape(len(x), -1) - 128.0) / 128.0  # noqa: E731
    q, d = flat(data.queries), flat(data.database)
    similarity = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    scores = retrieval_map(rank(similarity), data.truths)
    assert scores["map_easy"] > scores["map_hard"] and scores["map_easy"] > 0.3


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="bad scene config"):
        SceneConfig(min_shapes=3, max_shapes=2)
