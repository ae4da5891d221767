"""The HTTP service: FastAPI routes over a :class:`~serve.model.ServedModel` and a dynamic batcher.

Routes:

* ``POST /v1/embed``: images in, features out. Images come as files in the multipart field
  ``images`` (one or more), or as JSON ``{"images": ["<base64>", ...]}`` (data URLs accepted).
  Query: ``features`` (comma list of ``cls``, ``pooled``, ``patch``; default ``cls``) and
  ``format`` (``json``, or ``npy`` for exactly one feature kind: the array as a ``.npy`` file).
* ``POST /v1/neighbours``: the same images in; the top ``k`` images of the index (cosine of the
  CLS features) out.
* ``POST /v1/pca``: one image in; a PNG of its patch features' first three principal components
  (:func:`evaluators.visualize.pca_rgb`) out.
* ``GET /v1/index/items/{id}/image``: an indexed image, re-encoded as a small PNG (for the page).
* ``GET /healthz``, ``GET /metrics`` (Prometheus text format), ``GET /`` (the web page).

Limits (:class:`ServeSettings`) are checked before any decoding: body bytes, images per request,
pixels per image. A bad request gets a 4xx whose JSON ``detail`` says what was wrong and what is
allowed; it never reaches the batcher, so the service keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from serve.batching import DynamicBatcher
from serve.index import NeighbourIndex
from serve.model import FEATURE_KINDS, ImageError, ServedModel, decode_upload
from serve.page import PAGE_HTML

IMAGE_FIELD = "images"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of the service.

    Attributes:
        max_body_bytes: largest request body (413 above).
        max_images: most images in one request (413 above).
        max_pixels: most pixels of one image, read from its header before decoding (413 above).
        max_batch_size: most images in one forward pass; 1 turns dynamic batching off.
        max_wait_ms: longest wait for more requests to fill a batch.
        max_k: most neighbours one request may ask for.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_images: int = 32
    max_pixels: int = 25_000_000
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_k: int = 100

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < (0 if name == "max_wait_ms" else 1):
                raise ValueError(f"{name} must be {'>= 0' if name == 'max_wait_ms' else '>= 1'}, got {value}")


class _Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("dinoflow_serve_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("dinoflow_serve_request_seconds", "request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_images = Histogram("dinoflow_serve_batch_images", "images per forward pass",
                                      buckets=BATCH_BUCKETS, registry=self.registry)
        self.images = Counter("dinoflow_serve_images", "images embedded", registry=self.registry)

    def on_batch(self, count: int) -> None:
        self.batch_images.observe(count)
        self.images.inc(count)


def create_app(model: ServedModel, index: NeighbourIndex | None = None,
               settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application; its batcher thread stops when the app shuts down."""
    settings = settings or ServeSettings()
    metrics = _Metrics()
    batcher = DynamicBatcher(model.embed, settings.max_batch_size, settings.max_wait_ms, metrics.on_batch)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = FastAPI(title="dinoflow serve", lifespan=lifespan)
    app.state.model, app.state.index, app.state.settings, app.state.batcher = model, index, settings, batcher

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", "unmatched")  # bounded label values
            metrics.requests.labels(route, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def pixels_of(request: Request) -> torch.Tensor:
        uploads = await _read_uploads(request, settings)
        try:
            images = await run_in_threadpool(
                lambda: [decode_upload(data, model.image_size, settings.max_pixels) for data in uploads])
        except ImageError as err:
            status = 413 if "the limit is" in str(err) else 400
            raise HTTPException(status, f"{err}") from None
        return torch.stack(images)  # (n, 3, S, S) uint8

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE_HTML

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": model.name, "image_size": model.image_size, "patch_size": model.patch_size,
                "embed_dim": model.embed_dim, "index_size": len(index) if index is not None else None,
                "batching": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms}}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embed")
    async def embed(request: Request, features: str = "cls", format: str = "json") -> Response:
        kinds = [kind.strip() for kind in features.split(",") if kind.strip()]
        unknown = [kind for kind in kinds if kind not in FEATURE_KINDS]
        if not kinds or unknown:
            raise HTTPException(400, f"unknown features {unknown or features!r}; allowed: {', '.join(FEATURE_KINDS)}")
        if format not in ("json", "npy"):
            raise HTTPException(400, f"unknown format {format!r}; allowed: json, npy")
        if format == "npy" and len(kinds) != 1:
            raise HTTPException(400, f"format=npy returns one array: ask for one feature kind, got {kinds}")
        pixels = await pixels_of(request)
        outputs = await batcher.run(pixels)
        if format == "npy":
            buffer = io.BytesIO()
            np.save(buffer, outputs[kinds[0]].numpy())
            return Response(buffer.getvalue(), media_type="application/x-npy",
                            headers={"X-Feature-Shape": ",".join(map(str, outputs[kinds[0]].shape))})
        return JSONResponse({
            "model": model.name, "count": len(pixels), "image_size": model.image_size,
            "grid": [model.grid, model.grid],
            "shapes": {kind: list(outputs[kind].shape) for kind in kinds},
            "features": {kind: outputs[kind].tolist() for kind in kinds},
        })

    @app.post("/v1/neighbours")
    async def neighbours(request: Request, k: int = 5) -> dict[str, Any]:
        if index is None:
            raise HTTPException(404, "no index loaded: start the service with --index <folder from dinoflow index build>")
        if not 1 <= k <= settings.max_k:
            raise HTTPException(400, f"k must be in [1, {settings.max_k}], got {k}")
        pixels = await pixels_of(request)
        outputs = await batcher.run(pixels)
        return {"model": model.name, "index_size": len(index), "k": k, "results": index.search(outputs["cls"], k)}

    @app.post("/v1/pca")
    async def pca(request: Request, size: int = 224) -> Response:
        from evaluators.visualize import pca_rgb

        if not 16 <= size <= 1024:
            raise HTTPException(400, f"size must be in [16, 1024], got {size}")
        pixels = await pixels_of(request)
        if len(pixels) != 1:
            raise HTTPException(400, f"send exactly one image for a PCA map, got {len(pixels)}")
        patch = (await batcher.run(pixels))["patch"]  # (1, h*w, D)
        grid = patch.reshape(1, model.grid, model.grid, -1).permute(0, 3, 1, 2).numpy()  # (1, D, h, w)
        colours = (pca_rgb(grid)[0] * 255).round().astype(np.uint8)  # (h, w, 3)
        return Response(_png(Image.fromarray(colours).resize((size, size), Image.Resampling.NEAREST)),
                        media_type="image/png")

    @app.get("/v1/index/items/{item}/image")
    async def index_image(item: int, size: int = 128) -> Response:
        if index is None:
            raise HTTPException(404, "no index loaded")
        if not 0 <= item < len(index) or not 16 <= size <= 512:
            raise HTTPException(404, f"item must be in [0, {len(index)}) and size in [16, 512]")
        data = await run_in_threadpool(index.image_bytes, item)
        try:
            pixels = decode_upload(data, size, settings.max_pixels)  # re-encoded: never the stored bytes as-is
        except ImageError as err:
            raise HTTPException(422, f"indexed image {item} can no longer be read: {err}") from None
        return Response(_png(Image.fromarray(pixels.permute(1, 2, 0).numpy())), media_type="image/png")

    return app


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_uploads(request: Request, settings: ServeSettings) -> list[bytes]:
    """The encoded images of a request (multipart field ``images`` or JSON base64), limits checked."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/json"):
        raise HTTPException(415, f"unsupported content type {content_type or 'none'!r}: send multipart/form-data "
                                 f"with files in the field {IMAGE_FIELD!r}, or application/json "
                                 f'{{"{IMAGE_FIELD}": ["<base64>", ...]}}')
    body = await _read_body(request, settings.max_body_bytes)
    if content_type == "application/json":
        uploads = _json_uploads(body)
    else:
        uploads = await _multipart_uploads(request, body, settings)
    if not uploads:
        raise HTTPException(400, f"no images: send at least one in the field {IMAGE_FIELD!r}")
    if len(uploads) > settings.max_images:
        raise HTTPException(413, f"{len(uploads)} images in one request; the limit is {settings.max_images}")
    return uploads


def _json_uploads(body: bytes) -> list[bytes]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HTTPException(400, f"body is not valid JSON ({err})") from None
    if not isinstance(payload, dict) or set(payload) != {IMAGE_FIELD}:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise HTTPException(400, f'expected a JSON object with exactly the field {IMAGE_FIELD!r} (a list of base64 '
                                 f"strings), got {found}")
    items = payload[IMAGE_FIELD]
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise HTTPException(400, f"field {IMAGE_FIELD!r} must be a list of base64 strings")
    uploads = []
    for position, item in enumerate(items):
        encoded = item.split(",", 1)[1] if item.startswith("data:") else item  # data URLs too
        try:
            uploads.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"{IMAGE_FIELD}[{position}] is not valid base64") from None
    return uploads


async def _multipart_uploads(request: Request, body: bytes, settings: ServeSettings) -> list[bytes]:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=10_000, max_fields=16)  # body already bounded
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise HTTPException(400, f"malformed multipart body: {err.message}") from None
    unknown = sorted({key for key in form if key != IMAGE_FIELD})
    if unknown:
        raise HTTPException(400, f"unknown form field(s) {unknown}: send the images as files in the field "
                                 f"{IMAGE_FIELD!r}")
    uploads = []
    for value in form.getlist(IMAGE_FIELD):
        if not isinstance(value, UploadFile):
            raise HTTPException(400, f"field {IMAGE_FIELD!r} must hold file uploads, not text")
        uploads.append(await value.read())
        await value.close()
    return uploads
