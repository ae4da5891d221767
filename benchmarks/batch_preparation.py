"""Can the training loop prepare the next batch while the device computes a step?

The loop (``trainer.engine``) makes each step's batch (``make_batch``: the multi-crop augmentation
on the device from uint8 images of ``crops.load_size``, the block masks on the host) in the step's
wait for its losses. That only pays if making a batch queues its work and returns without waiting
for the device. This script times, for a preset and batch on ``--device``:

- ``prepare``: one batch made and finished (synchronised), in ms and img/s, then the crops alone
  (``MultiCrop``) and the rest (the masks, drawn on the host);
- ``crops eager / compiled``: the crops alone once more with the pixel stages eager and compiled
  (``crops.compile``), the ratio, and the largest difference between the two from one seed;
- ``queue behind busy device``: the host time ``make_batch`` takes to return when called right
  after ``--busy-ms`` of matrix products were queued (CUDA only). About ``prepare``'s host share
  if it never waits; ``--busy-ms`` more if it waits for the queued work;
- ``copy behind busy device`` (CUDA only): the same for the loader's uint8 images of a batch copied
  to the device (``non_blocking``) from pageable memory and from pinned memory, as the training
  loop's ``ImageStream`` copies them (pinned by its DataLoader on CUDA since 2026-12-04): a copy that
  returns after about ``--busy-ms`` waited for the queued work;
- ``--sync-check`` (CUDA only): ``make_batch`` under ``torch.cuda.set_sync_debug_mode("error")``,
  which raises at the first call that waits for the device, and prints where.

Prints figures (and with ``--json`` writes them as each is measured, for ``gpu_check.sh``'s summary);
asserts nothing.

    python benchmarks/batch_preparation.py --config tiny --device cpu
    python benchmarks/batch_preparation.py --config vits14 --device cuda --sync-check -- optim.batch_size=128
"""

from __future__ import annotations

import argparse
import functools
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from train_step import (  # this script's folder is first on sys.path
    batch_preparation, preparation_inputs, time_steps, write_figures)
from dinoflow.config import PretrainConfig, load_config
from trainer.data.augment import MultiCrop


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="pretraining preset name or YAML path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=10, help="timed batches, after 2 untimed")
    parser.add_argument("--busy-ms", type=float, default=100.0, help="device work queued before the queue timing")
    parser.add_argument("--sync-check", action="store_true", help="CUDA: raise at the first call that waits")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the preset")
    return parser.parse_args()


def busy_work(device: torch.device, milliseconds: float) -> Callable[[], None]:
    """A function queueing about ``milliseconds`` of bf16 matrix products on ``device``."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    def one() -> None:
        a @ a
    seconds = time_steps(one, argparse.Namespace(steps=5, warmup=2), device)
    count = max(1, round(milliseconds / 1000 / seconds))
    def queue() -> None:
        for _ in range(count):
            one()
    return queue


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    multi_crop, images = preparation_inputs(device, cfg)
    prepare = batch_preparation(multi_crop, images, cfg)
    batch, size = cfg.optim.batch_size, cfg.crops.load_size
    timing = argparse.Namespace(steps=args.batches, warmup=2)

    figures: dict[str, Any] = {
        "config": args.config, "overrides": args.overrides, "torch": torch.__version__, "batch": batch,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    print(f"batch preparation, preset {args.config!r}, batch {batch}, load size {size}, "
          f"{cfg.crops.num_local_crops} local crops, on {device}")
    whole = time_steps(prepare, timing, device)
    crops = time_steps(lambda: multi_crop(images), timing, device)
    figures.update(prepare_ms=1000 * whole, img_per_s=batch / whole, crops_ms=1000 * crops)
    print(f"  prepare            {1000 * whole:8.2f} ms  {batch / whole:9.1f} img/s")
    print(f"    crops            {1000 * crops:8.2f} ms")
    print(f"    the rest (masks) {1000 * (whole - crops):8.2f} ms")
    write_figures(args.json, figures)
    figures.update(compare_stages(cfg, images, timing, device))
    write_figures(args.json, figures)
    print(f"  crops eager {figures['crops_eager_ms']:8.2f} ms, compiled {figures['crops_compiled_ms']:8.2f} ms "
          f"({figures['crops_eager_ms'] / figures['crops_compiled_ms']:.2f}x), largest difference "
          f"{figures['crops_compiled_max_diff']:.2e}")
    if device.type == "cuda":
        figures.update(busy_ms=args.busy_ms, queue_ms=1000 * queue_seconds(prepare, device, args))
        print(f"  queue behind busy device ({args.busy_ms:.0f} ms queued): {figures['queue_ms']:8.2f} ms to return "
              "(median)")
        host = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        pinned = host.pin_memory()
        for name, source in (("pageable", host), ("pinned", pinned)):
            copy = functools.partial(source.to, device, non_blocking=True)
            figures[f"copy_{name}_ms"] = 1000 * queue_seconds(copy, device, args)
        write_figures(args.json, figures)
        print(f"  copy behind busy device: the loader's images from pageable memory {figures['copy_pageable_ms']:8.2f} "
              f"ms to return, from pinned memory {figures['copy_pinned_ms']:8.2f} ms (medians)")
        if args.sync_check:
            figures["waited"] = first_wait(prepare)
            print("  sync check: " + (f"a call waited for the device:\n{figures['waited']}" if figures["waited"]
                                      else "no call waited for the device"))
            write_figures(args.json, figures)


def compare_stages(cfg: PretrainConfig, images: torch.Tensor, timing: argparse.Namespace,
                   device: torch.device) -> dict[str, float]:
    """The crops' ms with the pixel stages eager and compiled, and the largest difference between
    the crops each makes from one seed."""
    figures, made = {}, []
    for name, compiled in (("eager", False), ("compiled", True)):
        multi_crop = MultiCrop(cfg.crops.model_copy(update={"compile": compiled})).to(device)
        figures[f"crops_{name}_ms"] = 1000 * time_steps(lambda: multi_crop(images), timing, device)
        torch.manual_seed(cfg.seed)
        made.append(multi_crop(images))
    figures["crops_compiled_max_diff"] = max(float((a - b).abs().max()) for a, b in zip(*made))
    return figures


def queue_seconds(prepare: Callable[[], object], device: torch.device, args: argparse.Namespace) -> float:
    """Median host seconds ``prepare`` takes to return right after ``args.busy_ms`` of device work
    was queued."""
    queue = busy_work(device, args.busy_ms)
    queued = []
    for _ in range(args.batches):
        queue()
        tick = time.perf_counter()
        prepare()
        queued.append(time.perf_counter() - tick)
        torch.cuda.synchronize(device)
    return sorted(queued)[len(queued) // 2]


def first_wait(prepare: Callable[[], object]) -> str:
    """Where ``prepare`` first waits for the device (the traceback's last lines), '' if nowhere."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        prepare()
        return ""
    except RuntimeError:
        return "\n".join(traceback.format_exc().splitlines()[-8:])
    finally:
        torch.cuda.set_sync_debug_mode("default")


if __name__ == "__main__":
    main()
