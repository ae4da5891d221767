"""What stochastic depth costs in one compiled block, in its mask form and its subset forms.

One pre-norm ViT block (``--dim``, ``--heads``; ViT-S/14's by default) compiled as training compiles
its blocks, forward and backward on the packed tokens of a DINOv2 step's student crops (``--batch``
images: 2 global crops of ``--global-tokens`` tokens and ``--locals`` local crops of
``--local-tokens``) at drop rate ``--rate`` (ViT-S/14's 0.1 by default), in three forms:

- ``mask``: every sample's branch computed, the dropped samples' multiplied by 0;
- ``subset``: ``trainer.models.layers``' subset form, only the kept samples' rows through the branch,
  moved in and out by gathers both ways (``PickRows``);
- ``index_add``: the original's subset form, written here for comparison: a gather in and
  ``index_add`` out, whose gradients are scatters (atomic adds on a GPU).

Each form is timed in ``--rounds`` alternating rounds (the order reversed every other round); this
prints each form's median ms and its ratio to the mask's, the peak memory of a step on a GPU, and
the subset forms' largest output difference from the same draws (with ``--json``, written once the
forms are compiled and again when they are timed). Under bf16 autocast on CUDA, as training runs.
Asserts nothing.

    python benchmarks/drop_path.py --device cpu --batch 10 --rounds 3
    python benchmarks/drop_path.py --device cuda --batch 128   # ViT-S/14's block at batch 128
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from torch import Tensor

from train_step import alternating_rounds, write_figures  # this script's folder is first on sys.path
from trainer.models import layers

FORMS = ("mask", "subset", "index_add")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128, help="images: 2 global and --locals local crops each")
    parser.add_argument("--locals", type=int, default=8)
    parser.add_argument("--global-tokens", type=int, default=257)
    parser.add_argument("--local-tokens", type=int, default=50)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each form in each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    args.shapes = [(2 * args.batch, args.global_tokens), (args.locals * args.batch, args.local_tokens)]
    if not 0 < args.rate < 1:
        parser.error(f"--rate takes a rate in (0, 1), got {args.rate}")
    if subset_keeps(args.shapes, args.rate) is None:
        parser.error(f"at --rate {args.rate} the groups {args.shapes} cannot keep their share in whole samples "
                     f"(within {layers.SUBSET_KEEP_TOLERANCE}): pick another --batch")
    return args


def subset_keeps(shapes: layers.Shapes, rate: float) -> list[int] | None:
    """The samples the subset forms keep of each group, whatever ``layers.SUBSET_DROP_ABOVE`` is."""
    with mock.patch.object(layers, "SUBSET_DROP_ABOVE", 0.0):
        return layers.subset_sizes(shapes, rate)


def index_add_form(tokens: Tensor, shapes: layers.Shapes, kept: list[Tensor],
                   branch: Callable[[Tensor, layers.Shapes], Tensor]) -> Tensor:
    """The original's subset form given each group's kept samples ``kept[g]``: their rows gathered,
    their branch scaled by ``B / k`` and added back by ``index_add``."""
    rows, scales, kept_shapes, offset = [], [], [], 0
    for (batch, length), samples in zip(shapes, kept):
        rows.append((offset + samples.unsqueeze(1) * length + torch.arange(length, device=tokens.device)).flatten())
        scales.append(torch.full((len(samples) * length,), batch / len(samples), dtype=tokens.dtype,
                                 device=tokens.device))
        kept_shapes.append((len(samples), length))
        offset += batch * length
    index = torch.cat(rows)
    update = branch(tokens[index], kept_shapes) * torch.cat(scales).unsqueeze(1)
    return tokens.index_add(0, index, update.to(tokens.dtype))


def index_add_residual(tokens: Tensor, shapes: layers.Shapes, branch: Callable[[Tensor, layers.Shapes], Tensor],
                       drop_rate: float) -> Tensor:
    """:func:`index_add_form` on the samples ``layers.residual`` would keep (one ``randperm`` a
    group, the same draws)."""
    keeps = subset_keeps(shapes, drop_rate)
    assert keeps is not None
    kept = [torch.randperm(batch, device=tokens.device)[:keep] for (batch, _), keep in zip(shapes, keeps)]
    return index_add_form(tokens, shapes, kept, branch)


@contextlib.contextmanager
def form(name: str) -> Iterator[None]:
    """``layers`` set to run drop path in the form ``name`` (each form its own compiled graph:
    dynamo guards on the patched globals)."""
    threshold = 1.0 if name == "mask" else 0.0
    with mock.patch.object(layers, "SUBSET_DROP_ABOVE", threshold), contextlib.ExitStack() as stack:
        if name == "index_add":
            stack.enter_context(mock.patch.object(layers, "residual", index_add_residual))
        yield


def main() -> None:
    args = parse_args()
    device, shapes = torch.device(args.device), args.shapes  # the packed crop groups: (samples, tokens)
    torch.manual_seed(0)
    block = layers.Block(args.dim, args.heads, drop_path=args.rate).to(device).train()
    tokens = torch.randn(sum(b * n for b, n in shapes), args.dim, device=device, requires_grad=True)
    compiled = torch.compile(block.forward, dynamic=False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(name: str) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with form(name), autocast:
                out = compiled(tokens, shapes)
            out.float().square().mean().backward()
            return out.detach()
        return run

    steps = {name: step(name) for name in FORMS}
    figures: dict[str, Any] = {
        "config": f"one block of width {args.dim} at drop rate {args.rate}", "overrides": [],
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dim": args.dim, "heads": args.heads, "shapes": shapes, "rate": args.rate,
        "kept": subset_keeps(shapes, args.rate), "forms": {}}

    outputs = {}
    for name in FORMS:  # compiled, and each form's one step from the same draws
        steps[name]()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        since = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        torch.manual_seed(1)
        outputs[name] = steps[name]().float()
        figures["forms"][name] = {"peak_mib": (torch.cuda.max_memory_allocated(device) - since) / 2**20
                                  if device.type == "cuda" else None}
    figures["subset_vs_index_add_max_difference"] = (outputs["subset"] - outputs["index_add"]).abs().max().item()
    write_figures(args.json, figures)  # the rounds take most of the run: a timeout during them keeps the above
    seconds = alternating_rounds(steps, args.rounds, args.steps, device)
    print(f"drop path at rate {args.rate} in one compiled block (dim {args.dim}, {args.heads} heads) on "
          f"{figures['device_name']}, groups {shapes}, kept {figures['kept']}; torch {torch.__version__}; "
          f"forward and backward, median of {args.rounds} alternating rounds of {args.steps} steps")
    print(f"{'form':<10}{'ms':>10}{'vs mask':>9}{'peak MiB':>10}")
    mask_ms = 1000 * statistics.median(seconds["mask"])
    for name in FORMS:
        row = figures["forms"][name]
        row["ms"] = 1000 * statistics.median(seconds[name])
        row["mask_over_this"] = mask_ms / row["ms"]
        peak = f"{row['peak_mib']:10.0f}" if row["peak_mib"] is not None else f"{'-':>10}"
        print(f"{name:<10}{row['ms']:10.2f}{row['mask_over_this']:9.2f}{peak}")
    print(f"subset against index_add from the same draws: max |output difference| "
          f"{figures['subset_vs_index_add_max_difference']:.2e}")
    write_figures(args.json, figures)


if __name__ == "__main__":
    main()
