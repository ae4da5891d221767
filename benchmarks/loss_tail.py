"""How close does the losses' element-wise tail come to reading its inputs once?

The DINO and iBOT losses run over blocks of ``(rows, K)`` logits
(``trainer.losses.prototype_cross_entropy``); over each block the tail
(``prototype_cross_entropy_tail``: the teacher's targets, the student's log-sum-exp, the loss and the
logits' gradient) is memory-bound. Its least traffic is the student's bf16 logits and the teacher's
rows read once and the bf16 gradient written once. For one block of ``--rows`` x ``--prototypes``
on ``--device``, with each kind of target the losses use:

- ``centred``: the teacher's bf16 logits softmaxed about a centre (iBOT under softmax centring);
- ``probabilities``: fp32 rows, one per student row (Sinkhorn-Knopp's);
- ``indexed``: fp32 rows shared by student rows through an index (DINO's: 3 rows per image, here
  ``rows / 4`` of them),

this prints the tail's time eager and compiled (``loss.compile``) and, measured in the same run, the
library's way: ``F.cross_entropy`` with probability targets on the fp32 logits and autograd's
backward for the gradient; the GB/s of the least traffic; and the largest difference of the
compiled tail's gradient from the library's (a check that both compute the same). Then the prototype
layer's weight norm (``W = g v / ||v||``, ``--prototypes`` x ``--bottleneck``, made at each call of the
head), forward and backward: autograd's way against the head's written-out backward
(``trainer.models.heads.normalized_rows``), with the largest difference of their gradients. Last,
the head shared by DINO and iBOT (``--head-dims``) on ``--head-rows`` CLS tokens and masked patches,
each with its fused loss, forward and backward (under bf16 autocast on CUDA, as training runs): one
call on both (``SSLNetwork.heads``) against a call each, with the largest difference of their
losses. Asserts nothing.

    python benchmarks/loss_tail.py --device cpu --rows 256
    python benchmarks/loss_tail.py --device cuda --json tail.json   # ViT-S/14's block (1024 x 65536) and head
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from train_step import time_steps, write_figures  # this script's folder is first on sys.path
from trainer.losses import (
    PATCH_LOSS_BLOCK_ELEMENTS,
    Targets,
    centered_softmax,
    prototype_cross_entropy,
    prototype_cross_entropy_tail,
)
from trainer.models.compile import compile_function
from trainer.models.heads import DINOHead, normalized_rows

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--rows", type=int, default=0, help="rows of the block (default: the losses' block)")
    parser.add_argument("--bottleneck", type=int, default=256, help="the prototypes' width, for the weight norm")
    parser.add_argument("--head-dims", type=int, nargs=2, default=(384, 2048), metavar=("IN", "HIDDEN"),
                        help="the shared head's input and hidden widths (default ViT-S/14's)")
    parser.add_argument("--head-rows", type=int, nargs=2, default=(1280, 9831), metavar=("CLS", "PATCHES"),
                        help="the head's CLS and masked-patch rows (default ViT-S/14's at batch 128: 10 crops, "
                             "the masked patches' bound)")
    parser.add_argument("--steps", type=int, default=20, help="timed calls, after 3 untimed")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    return parser.parse_args()


def library_tail(student_logits: Tensor, teacher: Tensor, center: Tensor | None, row_weights: Tensor,
                 student_temp: float, teacher_temp: float, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The tail's loss and logit gradient the plain way: targets as a tensor, ``F.cross_entropy``,
    autograd."""
    logits = student_logits.detach().requires_grad_()
    rows = teacher if index is None else teacher[index]
    targets = rows.float() if center is None else centered_softmax(rows, center, teacher_temp)
    loss = (F.cross_entropy(logits.float() / student_temp, targets, reduction="none") * row_weights).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


def block_inputs(kind: str, rows: int, prototypes: int, device: torch.device) -> tuple[tuple[Any, ...], int]:
    """The tail's arguments for a block of ``kind`` and the bytes of its least traffic."""
    generator = torch.Generator(device).manual_seed(0)

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, device=device)

    student = (3 * normal(rows, prototypes)).bfloat16()
    weights = torch.rand(rows, generator=generator, device=device) / rows
    center, index = None, None
    if kind == "centred":
        teacher, center = (2 * normal(rows, prototypes)).bfloat16(), normal(1, prototypes)
    elif kind == "probabilities":
        teacher = (3 * normal(rows, prototypes)).softmax(-1)
    else:
        teacher = (3 * normal(max(1, rows // 4), prototypes)).softmax(-1)
        index = torch.randint(0, teacher.shape[0], (rows,), generator=generator, device=device)
    least = 2 * student.numel() + teacher.numel() * teacher.element_size() + 2 * student.numel()
    return (student, teacher, center, weights, STUDENT_TEMP, TEACHER_TEMP, index), least


def weight_norm_figures(prototypes: int, bottleneck: int, device: torch.device,
                        timing: argparse.Namespace) -> dict[str, Any]:
    """The prototype layer's weight norm forward and backward (an upstream gradient given), autograd's
    way and the head's, in ms, and the largest difference of their ``v`` gradients."""
    generator = torch.Generator(device).manual_seed(0)
    v = torch.randn(prototypes, bottleneck, generator=generator, device=device).requires_grad_()
    g = (torch.rand(prototypes, 1, generator=generator, device=device) + 0.5).requires_grad_()
    upstream = torch.randn(prototypes, bottleneck, generator=generator, device=device)
    ways: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "autograd": lambda v, g: g * v / v.norm(dim=1, keepdim=True), "written": normalized_rows}
    figures: dict[str, Any] = {"prototypes": prototypes, "bottleneck": bottleneck}
    gradients = {}
    for name, way in ways.items():
        gradients[name] = torch.autograd.grad(way(v, g), (v, g), upstream)[0]
        seconds = time_steps(lambda: torch.autograd.grad(way(v, g), (v, g), upstream), timing, device)
        figures[f"{name}_ms"] = 1000 * seconds
    figures["max_grad_difference"] = (gradients["written"] - gradients["autograd"]).abs().max().item()
    figures["grad_scale"] = gradients["autograd"].abs().max().item()
    return figures


def shared_head_figures(args: argparse.Namespace, device: torch.device, timing: argparse.Namespace) -> dict[str, Any]:
    """The shared head's forward and backward on CLS rows and masked-patch rows, each with its fused
    prototype cross-entropy (random probability targets), in one call and in a call each, in ms; and
    the largest difference of their losses."""
    (dim, hidden), (cls_rows, patch_rows) = args.head_dims, args.head_rows
    torch.manual_seed(0)
    head = DINOHead(dim, args.prototypes, hidden, args.bottleneck).to(device)
    rows = [torch.randn(count, dim, device=device).requires_grad_() for count in (cls_rows, patch_rows)]
    fused = tuple(functools.partial(
        prototype_cross_entropy, targets=Targets(torch.randn(count, args.prototypes, device=device).softmax(-1)),
        row_weights=torch.full((count,), 1 / count, device=device), student_temp=STUDENT_TEMP)
        for count in (cls_rows, patch_rows))
    ways: dict[str, Callable[[], tuple[Tensor, Tensor]]] = {
        "one_call": lambda: head(tuple(rows), fused),
        "call_each": lambda: (head(rows[0], fused[0]), head(rows[1], fused[1]))}
    figures: dict[str, Any] = {"dims": [dim, hidden, hidden, args.bottleneck, args.prototypes],
                               "rows": [cls_rows, patch_rows]}
    losses = {}
    for name, way in ways.items():
        def step(way: Callable[[], tuple[Tensor, Tensor]] = way) -> Tensor:
            for tensor in (*rows, *head.parameters()):
                tensor.grad = None  # as each training step starts
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                total = sum(way())
            total.backward()
            return total

        losses[name] = step().item()
        figures[f"{name}_ms"] = 1000 * time_steps(step, timing, device)
    figures["max_loss_difference"] = abs(losses["one_call"] - losses["call_each"])
    figures["loss"] = losses["call_each"]
    return figures


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    rows = args.rows or max(1, PATCH_LOSS_BLOCK_ELEMENTS // args.prototypes)
    timing = argparse.Namespace(steps=args.steps, warmup=3)
    tails: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
        "library": library_tail, "eager": prototype_cross_entropy_tail,
        "compiled": compile_function(prototype_cross_entropy_tail)}
    figures: dict[str, Any] = {
        "config": f"a block of {rows} x {args.prototypes}", "overrides": [],
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "rows": rows, "prototypes": args.prototypes, "kinds": {}}

    print(f"loss tail, {figures['config']} on {figures['device_name']}, torch {torch.__version__}")
    print(f"{'targets':<14}{'tail':<10}{'ms':>9}{'GB/s':>9}{'library/this':>14}")
    for kind in ("centred", "probabilities", "indexed"):
        inputs, least = block_inputs(kind, rows, args.prototypes, device)
        row: dict[str, Any] = {"least_bytes": least}
        for name, tail in tails.items():
            seconds = time_steps(lambda: tail(*inputs), timing, device)
            row[f"{name}_ms"] = 1000 * seconds
            speedup = row["library_ms"] / row[f"{name}_ms"]
            print(f"{kind:<14}{name:<10}{1000 * seconds:9.3f}{least / seconds / 1e9:9.1f}{speedup:14.2f}")
        (_, want), (_, got) = library_tail(*inputs), tails["compiled"](*inputs)
        row["max_grad_difference"] = (got.float() - want.float()).abs().max().item()
        row["grad_scale"] = want.float().abs().max().item()
        print(f"{'':<14}compiled gradient vs the library's: max |difference| {row['max_grad_difference']:.2e} "
              f"of {row['grad_scale']:.2e}")
        figures["kinds"][kind] = row
        write_figures(args.json, figures)
    norm = weight_norm_figures(args.prototypes, args.bottleneck, device, timing)
    figures["weight_norm"] = norm
    write_figures(args.json, figures)
    print(f"prototypes' weight norm ({args.prototypes} x {args.bottleneck}, forward and backward): autograd "
          f"{norm['autograd_ms']:.3f} ms, written out {norm['written_ms']:.3f} ms "
          f"({norm['autograd_ms'] / norm['written_ms']:.2f}x); max |v gradient difference| "
          f"{norm['max_grad_difference']:.2e} of {norm['grad_scale']:.2e}")
    head = shared_head_figures(args, device, timing)
    figures["shared_head"] = head
    print(f"shared head ({' -> '.join(map(str, head['dims']))}) on {head['rows'][0]} CLS and {head['rows'][1]} "
          f"patch rows, fused losses, forward and backward: one call {head['one_call_ms']:.3f} ms, a call each "
          f"{head['call_each_ms']:.3f} ms ({head['call_each_ms'] / head['one_call_ms']:.2f}x); loss difference "
          f"{head['max_loss_difference']:.2e} of {head['loss']:.2e}")
    write_figures(args.json, figures)


if __name__ == "__main__":
    main()
