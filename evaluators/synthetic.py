"""Synthetic scenes with exact labels: segmentation masks, depth maps, and retrieval sets.

Why: the dense and retrieval benchmarks must run here with no downloads, on data whose ground
truth is exact. A scene is a textured ground plane seen in perspective (its depth grows towards
the horizon) with textured shapes standing on it at known depths, drawn far to near with a
depth buffer, so occlusion, masks and depth agree pixel for pixel.

* Classes: 0 the plane, 1 disc, 2 square, 3 triangle, 4 ring (``CLASS_NAMES``).
* Depth in metres: the plane is seen in true perspective, ``z(row) = c / (row - horizon)`` with
  the horizon above the image, so that it spans ``near .. far`` from the bottom row to the top
  row; a shape is fronto-parallel at the depth ``z`` of the row it stands on and its apparent
  size is ``focal * real_size / z``. Depth is thus visible locally, as in photographs: the
  plane's stripes (a fixed period in metres) get thinner towards the horizon and a shape's
  texture cells get smaller with distance.
* Textures: stripes on the plane; on the shapes a pattern
  of their class (disc checkers, square dots, triangle diagonal stripes, ring concentric
  bands); colours drawn per scene; a little pixel noise.
* Retrieval: each distinct scene yields a query and database copies under photometric and
  geometric changes; mild ones are ``easy``, strong ones ``hard``, copies with most of the
  image cut away ``junk`` (the revisited Oxford/Paris roles, see :mod:`evaluators.dense_metrics`).

Everything is a deterministic function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluators.dense_metrics import QueryTruth

CLASS_NAMES = ("plane", "disc", "square", "triangle", "ring")


@dataclass(frozen=True)
class SceneConfig:
    """Image size (pixels), shapes per scene, their real radius (metres), depth range (metres) and
    focal length (pixels): a shape of radius ``r`` at depth ``z`` spans ``focal * r / z`` pixels."""

    size: int = 56
    min_shapes: int = 2
    max_shapes: int = 5
    min_radius: float = 0.6
    max_radius: float = 1.2
    near: float = 2.0
    far: float = 12.0
    focal: float = 40.0
    noise: float = 4.0

    def __post_init__(self) -> None:
        if (self.size < 8 or not 1 <= self.min_shapes <= self.max_shapes or not 0 < self.near < self.far
                or not 0 < self.min_radius <= self.max_radius):
            raise ValueError(f"bad scene config: {self}")


@dataclass(frozen=True)
class Scenes:
    """``images`` ``(N, 3, S, S)`` uint8, ``masks`` ``(N, S, S)`` uint8 class ids, ``depths`` ``(N, S, S)`` float32."""

    images: np.ndarray
    masks: np.ndarray
    depths: np.ndarray


def _shape_mask(kind: int, ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, radius: float) -> np.ndarray:
    dy, dx = (ys - cy) / radius, (xs - cx) / radius
    if kind == 1:
        return dy**2 + dx**2 <= 1
    if kind == 2:
        return (np.abs(dy) <= 0.85) & (np.abs(dx) <= 0.85)
    if kind == 3:  # apex up, base at dy = 0.8
        return (dy <= 0.8) & (dy >= -1) & (np.abs(dx) <= (dy + 1) / 1.8 * 0.9)
    radial = dy**2 + dx**2
    return (radial <= 1) & (radial >= 0.35)


def _texture(kind: int, dy: np.ndarray, dx: np.ndarray, cell: float) -> np.ndarray:
    """Each class has its own pattern (checkers, dots, diagonal stripes, concentric bands), so
    that, as in real data, what a class looks like locally says which class it is."""
    if kind == 1:
        return ((np.floor(dy / cell) + np.floor(dx / cell)) % 2).astype(bool)
    if kind == 2:
        return (dy % cell) ** 2 + (dx % cell) ** 2 < (cell / 3) ** 2
    if kind == 3:
        return (np.floor((dy + dx) / cell) % 2).astype(bool)
    return (np.floor(np.hypot(dy, dx) / cell) % 2).astype(bool)


def ground_depth(rows: np.ndarray, config: SceneConfig) -> np.ndarray:
    """Depth of the ground plane at image ``rows`` (0 = top edge, ``size`` = bottom edge) in
    perspective: ``z = c / (row - horizon)``, with the horizon row and ``c`` chosen so that
    ``z(0) = far`` and ``z(size) = near``."""
    horizon = -config.size * config.near / (config.far - config.near)  # above the image
    return -horizon * config.far / (rows - horizon)


def ground_row(depth: np.ndarray, config: SceneConfig) -> np.ndarray:
    """The image row where the ground plane is at ``depth`` (the inverse of :func:`ground_depth`)."""
    horizon = -config.size * config.near / (config.far - config.near)
    return horizon - horizon * config.far / depth


Shape = tuple[float, int, float, float, float]  # depth z, class, centre row, centre column, radius


def render_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Shape]]:
    """One scene: image ``(3, S, S)`` uint8, mask ``(S, S)`` uint8, depth ``(S, S)`` float32, and
    its shapes (far to near)."""
    size = config.size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    depth = ground_depth(ys, config)
    plane_colour, stripe_colour = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    period = rng.uniform(0.6, 1.2)  # metres along the ground
    stripes = (np.floor(depth / period) % 2).astype(bool)
    image = np.where(stripes[None], stripe_colour[:, None, None], plane_colour[:, None, None])
    mask = np.zeros((size, size), dtype=np.uint8)
    shapes: list[Shape] = []
    for _ in range(rng.integers(config.min_shapes, config.max_shapes + 1)):
        z = rng.uniform(config.near, (config.near + config.far) / 2)  # where it stands on the plane
        foot_row = float(ground_row(np.asarray(z), config))
        radius = config.focal * rng.uniform(config.min_radius, config.max_radius) / z
        shapes.append((z, int(rng.integers(1, len(CLASS_NAMES))), foot_row - radius, rng.uniform(0, size), radius))
    shapes.sort(reverse=True)
    for z, kind, cy, cx, radius in shapes:  # far to near; the depth test decides
        inside = _shape_mask(kind, ys, xs, cy, cx, radius) & (z < depth)
        colour, second = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        pattern = _texture(kind, ys - cy, xs - cx, max(radius / 2, 1.5))
        texture = np.where(pattern[None], second[:, None, None], colour[:, None, None])
        image = np.where(inside[None], texture, image)
        mask[inside] = kind
        depth = np.where(inside, z, depth)
    image = image + rng.normal(0, config.noise, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask, depth.astype(np.float32), shapes


def make_scenes(count: int, seed: int = 0, config: SceneConfig = SceneConfig()) -> Scenes:
    """``count`` scenes; scene ``i`` depends only on ``(seed, i)``."""
    rendered = [render_scene(np.random.default_rng([seed, i]), config)[:3] for i in range(count)]
    return Scenes(*(np.stack(parts) for parts in zip(*rendered)))


def _variant(image: np.ndarray, rng: np.random.Generator, strength: float, keep: float = 1.0) -> np.ndarray:
    """A copy under a crop-and-resize, a flip, brightness/contrast and noise (``strength`` in [0, 1]);
    ``keep < 1`` cuts everything but a ``keep``-sized corner patch away (grey)."""
    _, size, _ = image.shape
    crop = int(round(size * (1 - 0.35 * strength * rng.random())))
    top, left = rng.integers(0, size - crop + 1, 2)
    index = (np.arange(size) * crop / size).astype(int)
    out = image[:, top + index][:, :, left + index].astype(np.float64)
    if rng.random() < 0.5:
        out = out[:, :, ::-1]
    out = (out - 128) * (1 + strength * rng.uniform(-0.4, 0.4)) + 128 + strength * rng.uniform(-40, 40)
    out += rng.normal(0, 2 + 10 * strength, out.shape)
    if keep < 1:
        side = int(size * keep)
        grey = np.full_like(out, 128.0)
        grey[:, :side, :side] = out[:, :side, :side]
        out = grey
    return np.clip(out, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class RetrievalSet:
    """Query and database images ``(N, 3, S, S)`` uint8 and each query's ground truth."""

    queries: np.ndarray
    database: np.ndarray
    truths: list[QueryTruth]


def make_retrieval_set(num_scenes: int, easy: int = 2, hard: int = 2, junk: int = 1, seed: int = 0,
                       config: SceneConfig = SceneConfig()) -> RetrievalSet:
    """One query per distinct scene; the database holds, per scene, ``easy`` mild copies,
    ``hard`` strong copies and ``junk`` copies with most of the image cut away, shuffled."""
    rng = np.random.default_rng([seed, 1_000_003])
    scenes = make_scenes(num_scenes, seed, config).images
    queries = np.stack([_variant(image, rng, 0.2) for image in scenes])
    items, roles = [], []
    for scene, image in enumerate(scenes):
        for role, count, strength, keep in (("easy", easy, 0.3, 1.0), ("hard", hard, 1.0, 1.0), ("junk", junk, 0.3, 0.3)):
            for _ in range(count):
                items.append(_variant(image, rng, strength, keep))
                roles.append((scene, role))
    order = rng.permutation(len(items))
    database = np.stack([items[i] for i in order])
    where: dict[tuple[int, str], list[int]] = {}
    for position, original in enumerate(order):
        where.setdefault(roles[original], []).append(position)
    truths = [QueryTruth(where.get((s, "easy"), []), where.get((s, "hard"), []), where.get((s, "junk"), []))
              for s in range(num_scenes)]
    return RetrievalSet(queries, database, truths)
