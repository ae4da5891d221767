"""The HTTP service: FastAPI routes over a :class:`~serve.model.ServedModel` and a dynamic batcher.

Routes:

* ``POST /v1/embed``: images in, features out. Images come as files in the multipart field
  ``images`` (one or more), or as JSON ``{"images": ["<base64>", ...]}`` (data URLs accepted).
  Query: ``features`` (comma list of ``cls``, ``pooled``, ``patch``; default ``cls``) and
  ``format`` (``json``, or ``npy`` for exactly one feature kind: the array as a ``.npy`` file).
  The answer names the model and registry version that computed the features (``model_version``;
  the header ``X-Model-Version`` with ``npy``), which a champion swap may change between requests.
* ``POST /v1/neighbours``: the same images in; the top ``k`` images of the index (cosine of the
  CLS features) out.
* ``POST /v1/pca``: one image in; a PNG of its patch features' first three principal components
  (:func:`evaluators.visualize.pca_rgb`) out.
* ``POST /v1/attention``: one image in; a PNG of the last block's CLS attention over its patches
  (:func:`evaluators.visualize.attention_rows`: the heads' mean, or with ``heads=true`` each head's
  map side by side, each stretched alone) out, with its high-norm patch tokens counted in the
  headers ``X-High-Norm-Tokens``, ``X-CLS-Attention-On-Patches``, ``X-Attention-Heads`` and
  ``X-Attention-Mask-Share`` (the share of patches in the mean map's 60 % mask; :mod:`evaluators.attention`).
* ``POST /v1/pca-video``: frames in (several images, or animated GIF/PNG/WebP files whose frames
  are taken in order); one PCA basis fitted over the patches of all frames, so a colour means the
  same feature direction in every frame; an animated PNG (``format=apng``, identical consecutive
  frames merged by the encoder) or a zip of one PNG per frame (``format=zip``) out.
* ``GET /v1/index/items/{id}/image``: an indexed image, re-encoded as a small PNG (for the page).
* ``GET /healthz``, ``GET /metrics`` (Prometheus text format), ``GET /`` (the web page).

Limits (:class:`ServeSettings`) are checked before any decoding: body bytes, images per request,
pixels per image. A bad request gets a 4xx whose JSON ``detail`` says what was wrong and what is
allowed; it never reaches the batcher, so the service keeps serving.

Overload gets a 503 with ``Retry-After`` and a ``detail`` that says which limit was hit: when
``max_queue`` requests already wait for the model in the request's queue (the features and the
attention maps each have one; checked before the body is read, and again when the decoded images
are queued), or when a request's features take longer than ``request_timeout_s``. Memory is
bounded by ``max_queue * max_images`` decoded images in each queue.

With ``reload_every_s`` and a ``models:/<name>@<alias>`` model, a :class:`~serve.reload.ChampionWatcher`
swaps in the version the alias moves to, between two forward passes (see :mod:`serve.reload`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from serve.batching import DynamicBatcher, Overloaded, RequestTimeout
from serve.index import NeighbourIndex
from serve.model import FEATURE_KINDS, ImageError, ServedModel, decode_upload, split_frames
from serve.page import PAGE_HTML
from serve.reload import ChampionWatcher, ModelSlot

IMAGE_FIELD = "images"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RETRY_AFTER_S = "1"


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
        max_queue: most requests waiting for the model (503 above).
        request_timeout_s: longest wait of one request for its features, queue included (503 after).
        reload_every_s: seconds between polls of the registry alias for a new champion; 0 turns it off.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_images: int = 32
    max_pixels: int = 25_000_000
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_k: int = 100
    max_queue: int = 64
    request_timeout_s: float = 30.0
    reload_every_s: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name in ("max_wait_ms", "reload_every_s"):
                low, text = 0, ">= 0"
            elif name == "request_timeout_s":
                low, text = 1e-9, "> 0"
            else:
                low, text = 1, ">= 1"
            if value < low:
                raise ValueError(f"{name} must be {text}, got {value}")


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
        self.rejected = Counter("dinoflow_serve_rejected", "requests refused with 503, by reason (queue_full, timeout)",
                                ["reason"], registry=self.registry)
        self.queued = Gauge("dinoflow_serve_queued_requests", "requests waiting for the model",
                            registry=self.registry)

    def on_batch(self, count: int) -> None:
        self.batch_images.observe(count)
        self.images.inc(count)


def create_app(model: ServedModel, index: NeighbourIndex | None = None, settings: ServeSettings | None = None,
               load: Callable[[str], ServedModel] | None = None) -> FastAPI:
    """The FastAPI application; its batcher (and champion watcher) threads stop when the app shuts down.

    ``load`` loads a ``models:/<name>/<version>`` URI for the champion watcher (default
    :func:`~serve.model.load_served_model` on the CPU); it is used only when ``settings.reload_every_s > 0``,
    which needs a ``models:/<name>@<alias>`` model and no index (the index holds the old model's features).
    """
    settings = settings or ServeSettings()
    metrics = _Metrics()
    slot = ModelSlot(model)
    watcher = None
    if settings.reload_every_s > 0:  # checked before any thread starts
        if index is not None:
            raise ValueError("reloading the champion cannot be combined with an index: the index holds the features "
                             "of the model it was built with; rebuild the index and restart instead")
        if load is None:
            from serve.model import load_served_model as load
        watcher = ChampionWatcher(slot, model.name, settings.reload_every_s, load)
    batcher = DynamicBatcher(slot.embed, settings.max_batch_size, settings.max_wait_ms, metrics.on_batch,
                             max_queue=settings.max_queue, timeout_s=settings.request_timeout_s)
    # the attention maps' own queue (another forward than the features'), bounded and timed alike
    looker = DynamicBatcher(slot.attention, settings.max_batch_size, settings.max_wait_ms, metrics.on_batch,
                            max_queue=settings.max_queue, timeout_s=settings.request_timeout_s)
    metrics.queued.set_function(lambda: batcher.queued + looker.queued)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if watcher is not None:
            watcher.start()
        yield
        if watcher is not None:
            watcher.close()
        batcher.close()
        looker.close()

    app = FastAPI(title="dinoflow serve", lifespan=lifespan)
    app.state.slot, app.state.index, app.state.settings, app.state.batcher = slot, index, settings, batcher
    app.state.watcher = watcher

    def overloaded(reason: str, message: str) -> HTTPException:
        metrics.rejected.labels(reason).inc()
        return HTTPException(503, message, headers={"Retry-After": RETRY_AFTER_S})

    async def features_of(pixels: torch.Tensor,
                          queue: DynamicBatcher = batcher) -> tuple[dict[str, torch.Tensor], ServedModel]:
        """The features of ``pixels`` and the model that computed them (a swap may land while they wait)."""
        try:
            return await queue.run(pixels)
        except Overloaded as err:
            raise overloaded("queue_full", str(err)) from None
        except RequestTimeout as err:
            raise overloaded("timeout", str(err)) from None

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

    async def pixels_of(request: Request, frames: bool = False, queue: DynamicBatcher = batcher) -> torch.Tensor:
        """The request's images decoded at the served image size, for ``queue``; ``frames``: animated
        files give all frames."""
        if queue.full:  # before the body is read: an overloaded service spends nothing on the request
            raise overloaded("queue_full", f"the service is busy: {queue.queued} requests are waiting for the "
                                           f"model (the limit is {settings.max_queue}); retry later")
        uploads = await _read_uploads(request, settings)
        current = slot.current  # a swap keeps its image size (serve.reload)

        def decode() -> list[torch.Tensor]:
            items = split_frames(uploads, settings.max_images, settings.max_pixels) if frames else uploads
            return [decode_upload(data, current.image_size, settings.max_pixels, current.whole_images)
                    for data in items]

        try:
            images = await run_in_threadpool(decode)
        except ImageError as err:
            status = 413 if "the limit is" in str(err) else 400
            raise HTTPException(status, f"{err}") from None
        return torch.stack(images)  # (n, 3, S, S) uint8

    def pca_frames(patch: torch.Tensor, size: int) -> list[Image.Image]:
        """Patch features ``(n, h*w, D)`` -> ``n`` RGB pictures, one PCA basis fitted over all of them."""
        from evaluators.visualize import pca_rgb

        grid = slot.current.grid
        maps = patch.reshape(len(patch), grid, grid, -1).permute(0, 3, 1, 2).numpy()  # (n, D, h, w)
        colours = (pca_rgb(maps) * 255).round().astype(np.uint8)  # (n, h, w, 3)
        return [Image.fromarray(frame).resize((size, size), Image.Resampling.NEAREST) for frame in colours]

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE_HTML

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        model = slot.current
        return {"status": "ok", "model": model.name, "model_version": model.version, "image_size": model.image_size,
                "patch_size": model.patch_size, "embed_dim": model.embed_dim,
                "classes": list(model.classes) if model.classifier is not None else None,
                "index_size": len(index) if index is not None else None,
                "batching": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms},
                "queue": {"queued": batcher.queued, "max_queue": settings.max_queue,
                          "request_timeout_s": settings.request_timeout_s},
                "reload": watcher.describe() if watcher is not None else None}

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
        outputs, model = await features_of(pixels)
        if format == "npy":
            buffer = io.BytesIO()
            np.save(buffer, outputs[kinds[0]].numpy())
            headers = {"X-Feature-Shape": ",".join(map(str, outputs[kinds[0]].shape))}
            if model.version is not None:
                headers["X-Model-Version"] = model.version
            return Response(buffer.getvalue(), media_type="application/x-npy", headers=headers)
        return JSONResponse({
            "model": model.name, "model_version": model.version, "count": len(pixels), "image_size": model.image_size,
            "grid": [model.grid, model.grid],
            "shapes": {kind: list(outputs[kind].shape) for kind in kinds},
            "features": {kind: outputs[kind].tolist() for kind in kinds},
        })

    @app.post("/v1/classify")
    async def classify(request: Request, k: int = 5) -> dict[str, Any]:
        current = slot.current  # checked before the body is read; the answer is the model's that ran
        if current.classifier is None:
            raise HTTPException(404, f"{current.name} has no classifier: serve a fine-tuned model (`dinoflow "
                                     "finetune`'s folder, or one the finetune pipeline registered)")
        if not 1 <= k <= len(current.classes):
            raise HTTPException(400, f"k must be in [1, {len(current.classes)}], got {k}")
        pixels = await pixels_of(request)
        outputs, model = await features_of(pixels)
        if "probabilities" not in outputs:  # the champion watcher swapped in a model without a classifier
            raise overloaded("model_changed", "the served model changed to one without a classifier; retry")
        if k > len(model.classes):
            raise overloaded("model_changed", f"the served model changed to version {model.version} with "
                                              f"{len(model.classes)} classes, fewer than k={k}; retry")
        top = outputs["probabilities"].topk(k, dim=1)
        return {"model": model.name, "model_version": model.version, "k": k, "results": [
            [{"class": model.classes[int(i)], "index": int(i), "probability": float(p)}
             for p, i in zip(values, indices)]
            for values, indices in zip(top.values, top.indices)]}

    @app.post("/v1/neighbours")
    async def neighbours(request: Request, k: int = 5) -> dict[str, Any]:
        if index is None:
            raise HTTPException(404, "no index loaded: start the service with --index <folder from dinoflow index build>")
        if not 1 <= k <= settings.max_k:
            raise HTTPException(400, f"k must be in [1, {settings.max_k}], got {k}")
        pixels = await pixels_of(request)
        outputs, model = await features_of(pixels)
        return {"model": model.name, "index_size": len(index), "k": k,
                "results": index.search(outputs["cls"], k)}

    async def one_image(request: Request, size: int, picture: str, queue: DynamicBatcher = batcher) -> torch.Tensor:
        """The request's one image ``(1, 3, S, S)`` for a ``picture`` of side ``size``, or a 400 saying why not."""
        if not 16 <= size <= 1024:
            raise HTTPException(400, f"size must be in [16, 1024], got {size}")
        pixels = await pixels_of(request, queue=queue)
        if len(pixels) != 1:
            raise HTTPException(400, f"send exactly one image for {picture}, got {len(pixels)}")
        return pixels

    @app.post("/v1/pca")
    async def pca(request: Request, size: int = 224) -> Response:
        pixels = await one_image(request, size, "a PCA map")
        patch = (await features_of(pixels))[0]["patch"]  # (1, h*w, D)
        (picture,) = await run_in_threadpool(pca_frames, patch, size)
        return Response(_png(picture), media_type="image/png")

    @app.post("/v1/attention")
    async def attention(request: Request, size: int = 224, heads: bool = False) -> Response:
        pixels = await one_image(request, size, "an attention map", looker)
        looked, _ = await features_of(pixels, looker)
        maps = looked["maps"].numpy()  # (1, heads, h, w)

        def draw() -> bytes:
            from evaluators.visualize import attention_rows

            tiles = [Image.fromarray((colours[0] * 255).round().astype(np.uint8)).resize(
                (size, size), Image.Resampling.NEAREST) for colours in attention_rows(maps, heads)]
            strip = Image.new("RGB", (size * len(tiles), size))
            for index, tile in enumerate(tiles):
                strip.paste(tile, (index * size, 0))
            return _png(strip)

        headers = {"X-High-Norm-Tokens": str(int(looked["high_norm"].sum())),
                   "X-CLS-Attention-On-Patches": f"{float(looked['on_patches'][0]):.6f}",
                   "X-Attention-Heads": str(maps.shape[1]),
                   "X-Attention-Mask-Share": f"{float(looked['masks'][0].float().mean()):.6f}"}
        return Response(await run_in_threadpool(draw), media_type="image/png", headers=headers)

    @app.post("/v1/pca-video")
    async def pca_video(request: Request, size: int = 224, fps: float = 4.0, format: str = "apng") -> Response:
        if not 16 <= size <= 512:
            raise HTTPException(400, f"size must be in [16, 512], got {size}")
        if not 0.5 <= fps <= 30:
            raise HTTPException(400, f"fps must be in [0.5, 30], got {fps}")
        if format not in ("apng", "zip"):
            raise HTTPException(400, f"unknown format {format!r}; allowed: apng, zip")
        pixels = await pixels_of(request, frames=True)  # (n, 3, S, S): every frame of every file, in order
        patch = (await features_of(pixels))[0]["patch"]  # (n, h*w, D)

        def encode() -> bytes:
            pictures = pca_frames(patch, size)
            return _zip_of_pngs(pictures) if format == "zip" else _apng(pictures, fps)

        headers = {"X-Frame-Count": str(len(pixels))}
        if format == "zip":
            headers["Content-Disposition"] = 'attachment; filename="pca-frames.zip"'
        return Response(await run_in_threadpool(encode), headers=headers,
                        media_type="application/zip" if format == "zip" else "image/apng")

    @app.get("/v1/index/items/{item}/image")
    async def index_image(item: int, size: int = 128) -> Response:
        if index is None:
            raise HTTPException(404, "no index loaded")
        if not 0 <= item < len(index) or not 16 <= size <= 512:
            raise HTTPException(404, f"item must be in [0, {len(index)}) and size in [16, 512]")

        def thumbnail() -> bytes:
            """Read, decoded as the model saw it and re-encoded: never the stored bytes as they are."""
            pixels = decode_upload(index.image_bytes(item), size, settings.max_pixels, slot.current.whole_images)
            return _png(Image.fromarray(pixels.permute(1, 2, 0).numpy()))

        try:
            return Response(await run_in_threadpool(thumbnail), media_type="image/png")
        except ImageError as err:
            raise HTTPException(422, f"indexed image {item} can no longer be read: {err}") from None

    return app


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _apng(pictures: list[Image.Image], fps: float) -> bytes:
    """An animated PNG, looping (identical consecutive frames become one longer frame)."""
    buffer = io.BytesIO()
    pictures[0].save(buffer, format="PNG", save_all=True, append_images=pictures[1:], duration=1000.0 / fps, loop=0)
    return buffer.getvalue()


def _zip_of_pngs(pictures: list[Image.Image]) -> bytes:
    """``frame_0000.png``, ``frame_0001.png``, ... in one zip (stored: PNGs are compressed already)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for position, picture in enumerate(pictures):
            archive.writestr(f"frame_{position:04d}.png", _png(picture))
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
