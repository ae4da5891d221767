"""Host memory of holding a split's probe features: joined as the parts come, against gathered.

Why: the classification benchmarks hold the features of the whole train split with the linear
probe's views (ImageNet's 1.28M images: 10 GB with ViT-S/14, 26 with ViT-L/14) in the evaluate
pod's memory. Gathered as a list of parts, then concatenated, they took twice that at the join,
over the pod's 32Gi from ViT-B/14 on; :func:`~evaluators.feature_parts.join_rows` copies each part
into the split's tensor as it is made. Each mode runs in a fresh process, a part's features made
by ``torch.randn`` (the backbone's work is not what is measured), and prints its peak resident
memory over the features' own size; then the probe's ``last1+avgpool`` view is taken, which was a
copy and is now a slice (its figure: the peak again).

    python benchmarks/feature_memory.py --rows 400000 --dim 384
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(mode: str, rows: int, dim: int, part_rows: int) -> None:
    """In this process: the features of ``rows`` images in parts, joined or gathered, then one view."""
    import torch

    import evaluators.feature_parts as feature_parts
    from evaluators.classification import view

    width = 5 * dim  # the last 4 blocks' CLS tokens and the mean patch token
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def part(picked: list[int]) -> dict[str, torch.Tensor]:
        return {"features": torch.randn(len(picked), width)}

    feature_parts.PART_ROWS = part_rows
    pieces = feature_parts.in_parts("train", rows, None, part)
    if mode == "joined":
        features = feature_parts.join_rows(pieces, rows)["features"]
    else:
        features = torch.cat([piece["features"] for piece in list(pieces)])
    held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    probe = view(features, "last1+avgpool", dim) if mode == "joined" else torch.cat(
        [features[:, 3 * dim : 4 * dim], features[:, 4 * dim :]], dim=1)
    viewed = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    size = features.numel() * 4
    print(f"{mode:>8}: features {size / 2**30:.2f} GiB; peak while joining {held / 2**30:.2f} GiB "
          f"({held / size:.2f}x); with the probe's last1+avgpool view {viewed / 2**30:.2f} GiB "
          f"({viewed / size:.2f}x; the view {tuple(probe.shape)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=384, help="the backbone's width (ViT-S/14: 384)")
    parser.add_argument("--part-rows", type=int, default=16384)
    parser.add_argument("--mode", choices=("joined", "gathered"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        measure(args.mode, args.rows, args.dim, args.part_rows)
        return
    for mode in ("gathered", "joined"):  # each in a fresh process: ru_maxrss only grows
        subprocess.run([sys.executable, __file__, "--mode", mode, "--rows", str(args.rows), "--dim", str(args.dim),
                        "--part-rows", str(args.part_rows)], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})


if __name__ == "__main__":
    main()
