"""Serving throughput and latency: `dinoflow serve` under a bounded load, with and without batching.

Why: dynamic batching trades a few milliseconds of waiting for fewer, larger forward passes; this
shows what that buys at a given concurrency. The service runs in its own process (the real CLI,
real uvicorn, loopback); this process sends a fixed number of single-image ``POST /v1/embed``
requests from ``--concurrency`` threads, after untimed warm-up requests, and prints requests per
second, p50 and p99 latency (of the answered requests), the mean images per forward pass read
from ``/metrics``, and how many requests the bounded queue refused with 503 (``--max-queue``,
``--request-timeout-s``: raise the concurrency above the queue to see overload). It prints
numbers and never asserts on them.

    python benchmarks/serve.py                                  # random ViT-S/14 at 112 px
    python benchmarks/serve.py --model models:/dinoflow-tiny@champion --requests 500 --concurrency 32
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model URI or .safetensors; default: a random ViT-S/14")
    parser.add_argument("--size", type=int, default=112, help="image side of the default model")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per mode")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests per mode")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads")
    parser.add_argument("--max-batch-size", type=int, default=32, help="batch size of the batching mode")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for the model before 503")
    parser.add_argument("--request-timeout-s", type=float, default=30.0, help="per-request timeout before 503")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the service (0: torch's default)")
    return parser.parse_args()


def default_model(folder: Path, size: int) -> str:
    from trainer.models.hub import save_backbone
    from trainer.models.vit import build_vit

    path = folder / "vits14.safetensors"
    save_backbone(build_vit("vit_small", patch_size=14, img_size=size), str(path))
    return str(path)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(model: str, max_batch_size: int, args: argparse.Namespace, log: Path) -> tuple:
    port = free_port()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, "-m", "pipelines.cli", "serve", "--model", model, "--port", str(port),
               "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", str(args.max_queue), "--request-timeout-s", str(args.request_timeout_s)]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(url + "/healthz", timeout=1).ok:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the service did not come up in 120 s")


def load(url: str, images: list[bytes], count: int, concurrency: int) -> tuple[list[float], int, float]:
    """Send ``count`` single-image requests from ``concurrency`` threads; latencies (s) of the answered
    ones, the number refused with 503 (overload), and wall time."""
    session_per_thread: dict[int, requests.Session] = {}

    def one(i: int) -> float | None:
        import threading

        session = session_per_thread.setdefault(threading.get_ident(), requests.Session())
        start = time.perf_counter()
        response = session.post(url + "/v1/embed", files=[("images", ("x.png", images[i % len(images)], "image/png"))],
                                timeout=120)
        if response.status_code == 503:
            return None
        response.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(count)))
    latencies = [latency for latency in results if latency is not None]
    return latencies, len(results) - len(latencies), time.perf_counter() - start


def batch_stats(url: str) -> tuple[float, float]:
    text = requests.get(url + "/metrics", timeout=10).text
    total = float(re.search(r"^dinoflow_serve_batch_images_sum (\S+)$", text, re.MULTILINE).group(1))
    batches = float(re.search(r"^dinoflow_serve_batch_images_count (\S+)$", text, re.MULTILINE).group(1))
    return total, batches


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(0)
    images = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or default_model(Path(scratch), args.size)
        print(f"model {model if args.model else f'random vit_small/14 at {args.size} px'}; "
              f"{args.requests} requests, concurrency {args.concurrency}, 1 image per request")
        print(f"{'mode':<28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'images/batch':>13} {'503s':>6}")
        dynamic = f"dynamic (batch {args.max_batch_size}, {args.max_wait_ms:g} ms)"
        for name, batch_size in (("no batching (batch 1)", 1), (dynamic, args.max_batch_size)):
            process, url = start_service(model, batch_size, args, Path(scratch) / "log")
            try:
                load(url, images, args.warmup, args.concurrency)
                before = batch_stats(url)
                latencies, refused, wall = load(url, images, args.requests, args.concurrency)
                after = batch_stats(url)
            finally:
                process.terminate()
                process.wait(timeout=30)
            ms = sorted(1000 * s for s in latencies) or [float("nan")]
            p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
            per_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
            print(f"{name:<28} {len(latencies) / wall:>8.1f} {statistics.median(ms):>8.1f} {p99:>8.1f} "
                  f"{per_batch:>13.1f} {refused:>6}")


if __name__ == "__main__":
    main()
