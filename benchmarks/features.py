"""Feature-extraction throughput: our ViT against transformers' DINOv2 on the same weights.

Why: the Hugging Face export promises the same features; this checks it at a real size and
shows what our implementation (packed blocks, one fused qkv) costs or saves against
transformers' at inference. It prints numbers and never asserts on them.

The HF model is loaded from our own export (:func:`trainer.models.hf.export_hf`), so both run
identical weights. The position table is built for the benchmark size, so neither model
resizes it. Timed rounds alternate which model goes first, and the median round is reported.

    python benchmarks/features.py                      # ViT-S/14, 224 px, batch 16
    python benchmarks/features.py --registers 4 --threads 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import Tensor

from trainer.models.hf import export_hf
from trainer.models.vit import ARCHITECTURES, build_vit


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=list(ARCHITECTURES), default="vit_small")
    parser.add_argument("--registers", type=int, default=0, help="register tokens (0 or 4)")
    parser.add_argument("--size", type=int, default=224, help="square image side in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per model")
    parser.add_argument("--iters", type=int, default=5, help="timed batches per model and round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, alternating the order")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def images_per_second(run: Callable[[], Tensor], batches: int, batch_size: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        run()
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    transformers.utils.logging.disable_progress_bar()
    # LayerScale 1 instead of the training init 1e-5, so the blocks matter in the agreement check
    ours = build_vit(args.arch, num_register_tokens=args.registers, img_size=args.size,
                     layerscale_init=1.0).eval()
    with tempfile.TemporaryDirectory() as scratch:
        folder = export_hf(ours, Path(scratch) / "hf")
        theirs = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    images = torch.randn(args.batch_size, 3, args.size, args.size)

    def run_ours() -> Tensor:
        return ours.forward_features(images)["x_norm_patchtokens"]

    def run_theirs() -> Tensor:
        return theirs(pixel_values=images).last_hidden_state

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, HF attention: {theirs.config._attn_implementation}")
    print(f"{args.arch}/{ours.patch_size}, {args.registers} registers, {args.size} px, batch {args.batch_size}, "
          f"{args.warmup} warm-up + {args.rounds} rounds x {args.iters} batches per model")
    with torch.inference_mode():
        features = ours.forward_features(images)
        hidden = run_theirs()
        first_patch = 1 + args.registers
        gap = max((hidden[:, 0] - features["x_norm_clstoken"]).abs().max().item(),
                  (hidden[:, first_patch:] - features["x_norm_patchtokens"]).abs().max().item())
        print(f"max |ours - HF| over CLS and patch tokens: {gap:.2e}")
        for run in (run_ours, run_theirs):
            for _ in range(args.warmup):
                run()
        rates: dict[str, list[float]] = {"ours": [], "HF": []}
        runs = [("ours", run_ours), ("HF", run_theirs)]
        for round_index in range(args.rounds):
            for name, run in runs if round_index % 2 == 0 else runs[::-1]:
                rates[name].append(images_per_second(run, args.iters, args.batch_size))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"{name:>4}: {medians[name]:8.1f} img/s (median; rounds: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"ours / HF: {medians['ours'] / medians['HF']:.3f}")


if __name__ == "__main__":
    main()
