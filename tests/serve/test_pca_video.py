"""``POST /v1/pca-video``: frames in, one PCA basis over all of them, an animated PNG or a zip of PNGs out."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import requests
import torch
from PIL import Image

from evaluators.visualize import pca_rgb

from .conftest import IMAGE_SIZE, PATCH_SIZE, Running, evaluation_pixels, png_bytes

GRID = IMAGE_SIZE // PATCH_SIZE


def _post(service: Running, frames: list[bytes], **params: object) -> requests.Response:
    files = [("images", (f"f{i}.png", data, "image/png")) for i, data in enumerate(frames)]
    return requests.post(service.url + "/v1/pca-video", params=params, files=files, timeout=60)


def _zip_frames(response: requests.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        names = archive.namelist()
        assert names == [f"frame_{i:04d}.png" for i in range(len(names))]
        return [np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("RGB")) for name in names]


def _library_joint_pca(service: Running, frames: list[bytes], size: int) -> np.ndarray:
    """What the endpoint should return: the patch features of all frames, one pca_rgb over all of them."""
    pixels = torch.stack([evaluation_pixels(data) for data in frames])  # (n, 3, S, S)
    patch = service.model.embed(pixels)["patch"]  # (n, h*w, D)
    maps = patch.reshape(len(frames), GRID, GRID, -1).permute(0, 3, 1, 2).numpy()  # (n, D, h, w)
    colours = (pca_rgb(maps) * 255).round().astype(np.uint8)  # (n, h, w, 3)
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.NEAREST)) for c in colours])


def test_zip_frames_share_one_basis(service: Running) -> None:
    a, b = (path.read_bytes() for path in service.images[:2])
    frames = _zip_frames(_post(service, [a, b, a, a], size=32, format="zip"))
    assert len(frames) == 4 and all(frame.shape == (32, 32, 3) for frame in frames)
    np.testing.assert_array_equal(frames[0], frames[2])  # identical frames, identical pictures
    np.testing.assert_array_equal(frames[0], frames[3])
    assert not np.array_equal(frames[0], frames[1])
    np.testing.assert_array_equal(np.stack(frames), _library_joint_pca(service, [a, b, a, a], 32))
    # the basis is fitted over all frames: A alone (its own basis) is coloured differently
    alone = requests.post(service.url + "/v1/pca", params={"size": 32}, files=[("images", ("a.png", a, "image/png"))],
                          timeout=30)
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(alone.content)).convert("RGB")), frames[0])


def test_apng_is_animated_and_matches_the_zip(service: Running) -> None:
    a, b = (path.read_bytes() for path in service.images[:2])
    response = _post(service, [a, b, a], size=48, fps=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/apng" and response.headers["x-frame-count"] == "3"
    video = Image.open(io.BytesIO(response.content))
    assert video.format == "PNG" and video.is_animated and video.n_frames == 3 and video.size == (48, 48)
    expected = _zip_frames(_post(service, [a, b, a], size=48, format="zip"))
    for position in range(3):
        video.seek(position)
        assert video.info["duration"] == 200  # ms, at 5 fps
        np.testing.assert_array_equal(np.asarray(video.convert("RGB")), expected[position])


def test_an_animated_gif_is_taken_frame_by_frame(service: Running) -> None:
    rng = np.random.default_rng(1)
    pictures = [Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(3)]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=100, loop=0)
    gif = buffer.getvalue()
    as_shown = []  # the GIF's frames as a viewer shows them (palette-quantised), sent as PNGs
    with Image.open(io.BytesIO(gif)) as decoded:
        for position in range(decoded.n_frames):
            decoded.seek(position)
            as_shown.append(png_bytes(np.asarray(decoded.convert("RGB"))))
    from_gif = _post(service, [gif], size=28, format="zip")
    assert from_gif.headers["x-frame-count"] == "3"
    np.testing.assert_array_equal(np.stack(_zip_frames(from_gif)),
                                  np.stack(_zip_frames(_post(service, as_shown, size=28, format="zip"))))
    mixed = _post(service, [service.images[0].read_bytes(), gif], size=28, format="zip")  # a still, then the GIF
    assert len(_zip_frames(mixed)) == 4


def test_bad_requests_get_a_clear_4xx(service: Running) -> None:
    a = service.images[0].read_bytes()
    cases = [
        ({"format": "gif"}, [a], 400, "allowed: apng, zip"),
        ({"size": 8}, [a], 400, "size must be in [16, 512]"),
        ({"fps": 100}, [a], 400, "fps must be in [0.5, 30]"),
        ({}, [b"not an image"], 400, "not an image"),
        ({}, [a] * 9, 413, "the limit is 8"),
    ]
    for params, frames, status, message in cases:
        response = _post(service, frames, **params)
        assert response.status_code == status, (params, response.text)
        assert message in response.json()["detail"]
    rng = np.random.default_rng(2)
    pictures = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(9)]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="GIF", save_all=True, append_images=pictures[1:], duration=100)
    too_long = _post(service, [buffer.getvalue()])
    assert too_long.status_code == 413 and "9 frames in one request; the limit is 8" in too_long.json()["detail"]
    assert _post(service, [a]).status_code == 200  # still serving
