"""The service on 127.0.0.1 (real uvicorn): features equal the library's, bad input gets a clear 4xx."""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from evaluators.features import extract_features, labelled_features, to_model_input
from serve.model import decode_upload

from .conftest import IMAGE_SIZE, PATCH_SIZE, Running, evaluation_pixels, png_bytes


def _files(paths: list) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _library(service: Running, paths: list) -> dict[str, torch.Tensor]:
    """What the library computes for the same files: prepared as the evaluations do, then extract_features."""
    pixels = torch.stack([evaluation_pixels(p.read_bytes()) for p in paths])  # (N, 3, S, S) uint8
    backbone = service.model.backbone
    cls = labelled_features(backbone, pixels, PATCH_SIZE)
    both, _ = extract_features(backbone, to_model_input(pixels, patch_size=PATCH_SIZE), with_patch_mean=True)
    with torch.inference_mode():
        patch = backbone.forward_features(to_model_input(pixels, patch_size=PATCH_SIZE))["x_norm_patchtokens"]
    return {"cls": cls, "pooled": both[:, cls.shape[1]:], "patch": patch}


def _assert_serving(service: Running) -> None:
    assert requests.get(service.url + "/healthz", timeout=10).status_code == 200
    ok = requests.post(service.url + "/v1/embed", files=_files(service.images[:1]), timeout=10)
    assert ok.status_code == 200, ok.text


def test_healthz_and_page(service: Running) -> None:
    health = requests.get(service.url + "/healthz", timeout=10).json()
    assert health == health | {"status": "ok", "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "embed_dim": 16,
                               "index_size": 8}
    page = requests.get(service.url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "v1/neighbours" in page.text and "v1/pca" in page.text and "v1/attention" in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # nothing from a CDN


def test_embed_multipart_equals_library(service: Running) -> None:
    paths = service.images  # the last one is 40x30: resized and cropped like the datasets do
    response = requests.post(service.url + "/v1/embed", params={"features": "cls,pooled,patch"},
                             files=_files(paths), timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    grid = IMAGE_SIZE // PATCH_SIZE
    assert body["shapes"] == {"cls": [8, 16], "pooled": [8, 16], "patch": [8, grid * grid, 16]}
    assert body["grid"] == [grid, grid]
    expected = _library(service, paths)
    for kind in ("cls", "pooled", "patch"):
        np.testing.assert_allclose(np.array(body["features"][kind]), expected[kind].numpy(), rtol=1e-5, atol=1e-5)


def test_embed_base64_json_and_npy(service: Running) -> None:
    paths = service.images[2:4]
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    encoded[1] = "data:image/png;base64," + encoded[1]
    response = requests.post(service.url + "/v1/embed", json={"images": encoded}, params={"format": "npy"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-npy"
    array = np.load(io.BytesIO(response.content))
    assert array.shape == (2, 16) and array.dtype == np.float32
    np.testing.assert_allclose(array, _library(service, paths)["cls"].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"),
    [
        ({"files": [("images", ("a.png", b"hello, not an image", "image/png"))]}, 400, "not an image"),
        ({"files": [("images", ("a.png", b"", "image/png"))]}, 400, "empty file"),
        ({"files": [("image", ("a.png", b"x", "image/png"))]}, 400, "unknown form field"),
        ({"data": {"images": "text"}, "files": [("images", ("a.png", b"x", "image/png"))]}, 400, "not text"),
        ({"json": {"pictures": ["aGk="]}}, 400, "exactly the field 'images'"),
        ({"json": {"images": ["%%%"]}}, 400, "not valid base64"),
        ({"json": {"images": []}}, 400, "no images"),
        ({"data": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"data": b"raw bytes", "headers": {"content-type": "image/png"}}, 415, "unsupported content type"),
        ({"files": [("images", ("big.bin", b"0" * 300_000, "image/png"))]}, 413, "limit"),
        ({"files": [("images", ("x.png", png_bytes(np.zeros((28, 28, 3), np.uint8)), "image/png"))] * 9},
         413, "the limit is 8"),
        ({"files": [("images", ("huge.png", png_bytes(np.zeros((250, 250, 3), np.uint8)), "image/png"))]},
         413, "pixels"),
        ({"params": {"features": "cls,colour"}, "files": [("images", ("a.png", b"x", "image/png"))]}, 400,
         "allowed: cls, pooled, patch"),
        ({"params": {"format": "npy", "features": "cls,patch"}}, 400, "one feature kind"),
    ],
)
def test_bad_input_gets_a_clear_4xx(service: Running, request_kwargs: dict, status: int, message: str) -> None:
    response = requests.post(service.url + "/v1/embed", timeout=10, **request_kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    _assert_serving(service)


def test_concurrent_requests_are_batched(service: Running) -> None:
    paths = service.images[:7]

    def one(i: int) -> list:
        response = requests.post(service.url + "/v1/embed", files=_files([paths[i % 7]]), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["features"]["cls"][0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    expected = _library(service, paths)["cls"].numpy()
    for i, row in enumerate(results):
        np.testing.assert_allclose(row, expected[i % 7], rtol=1e-5, atol=1e-5)
    metrics = requests.get(service.url + "/metrics", timeout=10).text
    batches = float(re.search(r"^dinoflow_serve_batch_images_count (\S+)$", metrics, re.MULTILINE).group(1))
    images = float(re.search(r"^dinoflow_serve_batch_images_sum (\S+)$", metrics, re.MULTILINE).group(1))
    assert images > batches  # at least one forward pass ran more than one image
    assert re.search(r'^dinoflow_serve_requests_total\{route="/v1/embed",status="200"\} \d+', metrics, re.MULTILINE)
    assert re.search(r'^dinoflow_serve_requests_total\{route="/v1/embed",status="400"\}', metrics, re.MULTILINE)
    assert 'dinoflow_serve_request_seconds_bucket{le="0.1",route="/v1/embed"}' in metrics


def test_neighbours_find_the_image_itself(service: Running) -> None:
    paths = [service.images[1], service.images[7]]
    response = requests.post(service.url + "/v1/neighbours", params={"k": 3}, files=_files(paths), timeout=30)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    for path, hits in zip(paths, results):
        assert len(hits) == 3 and hits[0]["key"].endswith(path.name)
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    thumb = requests.get(service.url + f"/v1/index/items/{results[0][0]['id']}/image", timeout=10)
    assert thumb.status_code == 200 and thumb.content.startswith(b"\x89PNG")
    bad = requests.post(service.url + "/v1/neighbours", params={"k": 0}, files=_files(paths), timeout=10)
    assert bad.status_code == 400 and "k must be in" in bad.json()["detail"]


def test_an_indexed_image_is_decoded_off_the_event_loop_as_the_model_saw_it(service: Running,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding blocks for as long as the image takes: on the event loop it would stall every other
    request, so the thumbnail is decoded in the thread pool, as every upload is."""
    import asyncio

    from PIL import Image

    import serve.app

    decoded_on_loop: list[bool] = []

    def decode(*args: object) -> torch.Tensor:
        try:
            asyncio.get_running_loop()
            decoded_on_loop.append(True)
        except RuntimeError:  # no event loop runs in this thread
            decoded_on_loop.append(False)
        return decode_upload(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(serve.app, "decode_upload", decode)
    thumb = requests.get(service.url + "/v1/index/items/0/image", params={"size": 32}, timeout=10)
    assert thumb.status_code == 200 and decoded_on_loop == [False]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(thumb.content))),
                                  evaluation_pixels(service.images[0].read_bytes(), 32).permute(1, 2, 0).numpy())


def test_pca_map_is_a_png(service: Running) -> None:
    from PIL import Image

    response = requests.post(service.url + "/v1/pca", params={"size": 64}, files=_files(service.images[:1]), timeout=30)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    two = requests.post(service.url + "/v1/pca", files=_files(service.images[:2]), timeout=30)
    assert two.status_code == 400 and "exactly one image" in two.json()["detail"]


def test_attention_map_is_the_librarys(service: Running) -> None:
    from PIL import Image

    from evaluators.attention import attention_summary
    from evaluators.visualize import attention_rgb

    response = requests.post(service.url + "/v1/attention", params={"size": 64}, files=_files(service.images[-1:]),
                             timeout=30)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    pixels = torch.stack([evaluation_pixels(service.images[-1].read_bytes())])
    summary = attention_summary(service.model.backbone, to_model_input(pixels, patch_size=PATCH_SIZE))
    colours = (attention_rgb(summary["maps"].numpy())[0] * 255).round().astype(np.uint8)  # (h, w, 3)
    cell = 64 // (IMAGE_SIZE // PATCH_SIZE)
    np.testing.assert_array_equal(np.asarray(image)[cell // 2::cell, cell // 2::cell], colours)
    assert response.headers["X-High-Norm-Tokens"] == str(int(summary["high_norm"].sum()))
    assert float(response.headers["X-CLS-Attention-On-Patches"]) == pytest.approx(
        summary["metrics"]["cls_attention_on_patches"], abs=1e-6)
    assert float(response.headers["X-Attention-Mask-Share"]) == pytest.approx(summary["masks"].float().mean().item(),
                                                                              abs=1e-6)
    heads = requests.post(service.url + "/v1/attention", params={"size": 64, "heads": "true"},
                          files=_files(service.images[-1:]), timeout=30)
    count = summary["maps"].shape[1]
    assert heads.status_code == 200 and heads.headers["X-Attention-Heads"] == str(count) and count > 1
    strip = np.asarray(Image.open(io.BytesIO(heads.content)))
    assert strip.shape == (64, 64 * count, 3)
    for head in range(count):  # each tile: that head's map alone, stretched alone
        alone = (attention_rgb(summary["maps"][:, head:head + 1].numpy())[0] * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(strip[cell // 2::cell, 64 * head + cell // 2:64 * (head + 1):cell], alone)
    two = requests.post(service.url + "/v1/attention", files=_files(service.images[:2]), timeout=30)
    assert two.status_code == 400 and "exactly one image" in two.json()["detail"]
    small = requests.post(service.url + "/v1/attention", params={"size": 8}, files=_files(service.images[:1]),
                          timeout=30)
    assert small.status_code == 400 and "size must be in [16, 1024]" in small.json()["detail"]
