"""Does the training step compute the same thing on ``--device`` as on ``--reference``? From the
same weights and the same synthetic crops and masks:

* ``backbone_fp32``: the student backbone's pre-norm tokens (packed global + local crops, masked
  globals, eval mode) in fp32 on both devices;
* ``step_fp32``: one ``train_step``'s loss terms in fp32 on both devices;
* ``step_bf16``: the step's loss terms under bf16 autocast (as the engine trains on CUDA) against
  fp32 on ``--device``;
* ``step_compiled`` (``--compile``): the loss terms with compiled blocks and loss tails
  (``model.compile_blocks``, ``loss.compile``) against eager, fp32 on ``--device``; a
  compilation that fell back to eager fails it;
* ``subset_cudagraphs`` (``--compile``): stochastic depth's subset form (``trainer.models.layers``'
  gathers) compiled as CUDA graphs (``reduce-overhead``; plainly compiled off CUDA), replayed on the
  same tokens with a simple branch: each replay leaves exactly the dropped samples' rows as they
  were, adds the branch times ``B / k`` to the kept ones and gives the input the gradient of that
  formula (eager, from the kept samples read off the output), and the two replays draw different
  samples (the graph's random draws advance);
* ``side_stream``: the loop's batch (``make_batch`` from uint8 images) made on a second CUDA stream
  behind queued work there and handed over (``data.side_stream``), read on the step's stream at
  once, against the same batch made on the step's stream: bitwise equal (a missing wait would read
  crops not yet written). Off CUDA there is no second stream: the same call twice;
* ``lagged_skip``: a step with a non-finite loss queued with fused AdamW (``queue_step``), then a
  finite step queued behind it before its losses are read (``optim.lagged_loss_read``): the first
  read raises, the second gives finite losses, and every student weight is bitwise as it was
  (the fused kernel skipped both steps on the device, the second by the first's carried flag).

fp32 means fp32: TF32 is switched off for matmuls and convolutions (cuDNN would use it for the
patch embedding). Stochastic depth is off (its draws differ between devices) and LayerScale starts
at 1 (at the recipes' 1e-5 the blocks barely touch the tokens, and a wrong block would pass).
A difference passes when ``|device - reference| <= rtol * max(1, max |reference|)``.

Prints one line per check and rewrites ``--out`` (JSON, every figure) as each one completes;
exits 1 if any fails.
``--device cpu --reference cpu`` is the smoke test of the script itself.

    python benchmarks/gpu_correctness.py --device cuda --config vits14 --compile --out check.json -- optim.batch_size=4
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from drop_path import index_add_form  # this script's folder is first on sys.path
from train_step import preparation_inputs, write_figures
from dinoflow.config import PretrainConfig, load_config
from trainer.batches import CropBatch, SideStream, make_batch
from trainer.data.masking import sample_crop_masks
from trainer.engine import Objective, SSLNetwork, build_networks, queue_step, train_step
from trainer.losses import masked_positions
from trainer.models.compile import is_compiled
from trainer.optim import build_adamw
from trainer.schedules import schedule_values, total_steps

FORCED = ["model.drop_path_rate=0", "model.layerscale_init=1.0"]  # see the module docstring
RTOL = {"backbone_fp32": 1e-4, "step_fp32": 1e-3, "step_bf16": 2e-2, "step_compiled": 1e-3, "side_stream": 0.0,
        "subset_cudagraphs": 1e-5, "lagged_skip": 0.0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device checked")
    parser.add_argument("--reference", default="cpu", help="the device it is checked against")
    parser.add_argument("--config", default="vits14", help="pretraining preset name or YAML path")
    parser.add_argument("--compile", action="store_true", help="also check compiled blocks against eager")
    parser.add_argument("--out", default="", help="write the results to this JSON file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the preset (e.g. optim.batch_size=4)")
    return parser.parse_args()


def recipe(args: argparse.Namespace, compiled: bool) -> PretrainConfig:
    """The preset with ``args.overrides``, then :data:`FORCED`, blocks and loss tails compiled or not."""
    return load_config(PretrainConfig, args.config,
                       [*args.overrides, *FORCED, f"model.compile_blocks={compiled}", f"loss.compile={compiled}"])


def synthetic_batch(cfg: PretrainConfig) -> CropBatch:
    """Random crops and the recipe's masks, their index padded as in training, on the CPU, fixed by
    ``cfg.seed``."""
    batch, crops = cfg.optim.batch_size, cfg.crops
    generator = torch.Generator().manual_seed(cfg.seed)
    grid = crops.global_crop_size // cfg.model.patch_size
    masks, bound = sample_crop_masks(2 * batch, grid, grid, np.random.default_rng(cfg.seed),
                                     cfg.loss.mask_probability, (cfg.loss.mask_ratio_min, cfg.loss.mask_ratio_max))
    return CropBatch(
        torch.randn(2, batch, 3, crops.global_crop_size, crops.global_crop_size, generator=generator),
        torch.randn(crops.num_local_crops, batch, 3, crops.local_crop_size, crops.local_crop_size, generator=generator),
        masks, masked_positions(masks, bound))


def to_device(batch: CropBatch, device: torch.device) -> CropBatch:
    return CropBatch(batch.global_crops.to(device), batch.local_crops.to(device), batch.masks.to(device),
                     batch.mask_index.to(device))


def backbone_tokens(cfg: PretrainConfig, weights: dict[str, Tensor], batch: CropBatch,
                    device: torch.device) -> Tensor:
    """The student backbone's pre-norm tokens of both crop groups, flattened, back on the CPU."""
    student, _ = build_networks(cfg)
    student.load_state_dict(weights)
    backbone = student.backbone.to(device).eval()
    batch = to_device(batch, device)
    with torch.no_grad():
        outputs = backbone.forward_features_list([batch.global_crops.flatten(0, 1), batch.local_crops.flatten(0, 1)],
                                                 [batch.masks, None])
    return torch.cat([o["x_prenorm"].flatten() for o in outputs]).cpu()


def networks(cfg: PretrainConfig, weights: dict[str, Tensor], device: torch.device
             ) -> tuple[SSLNetwork, SSLNetwork, Objective]:
    """The student and teacher from ``weights`` (alike) and a fresh objective, on ``device``."""
    student, teacher = build_networks(cfg)
    student.load_state_dict(weights)
    teacher.load_state_dict(weights)
    return student.to(device), teacher.to(device), Objective(cfg).to(device)


def step_losses(cfg: PretrainConfig, weights: dict[str, Tensor], batch: CropBatch, device: torch.device,
                autocast_dtype: torch.dtype | None) -> tuple[dict[str, float], bool]:
    """One ``train_step`` from ``weights`` (student and teacher alike): its loss terms, and whether
    every block and loss tail still ran compiled (True when nothing was compiled)."""
    student, teacher, objective = networks(cfg, weights, device)
    sched = schedule_values(0, cfg.optim, cfg.loss, 1)
    losses = train_step(student, teacher, objective, [to_device(batch, device)], sched,
                        build_adamw(student, cfg, device), cfg.optim.clip_grad, autocast_dtype)
    blocks = (*student.backbone.blocks, *teacher.backbone.blocks)
    return losses, not cfg.model.compile_blocks or (all(is_compiled(b) for b in blocks) and objective.tails_compiled())


def lagged_skip(cfg: PretrainConfig, weights: dict[str, Tensor], batch: CropBatch,
                device: torch.device) -> dict[str, Any]:
    """The ``lagged_skip`` check: a non-finite step, then a finite one queued behind it unread, with
    fused AdamW (on any device); the largest change of a student weight must be 0."""
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"fused_adamw": "on"})})
    student, teacher, objective = networks(cfg, weights, device)
    optimizer = build_adamw(student, cfg, device)
    sched = schedule_values(total_steps(cfg.optim) // 2, cfg.optim, cfg.loss, 1)  # past the warm-up: lr > 0
    finite = to_device(batch, device)
    # the student's local crops only: the teacher's targets and centres stay finite for the next step
    spoiled = dataclasses.replace(finite, local_crops=torch.full_like(finite.local_crops, float("nan")))
    before = [p.detach().clone() for p in student.parameters()]
    first = queue_step(student, teacher, objective, [spoiled], sched, optimizer, cfg.optim.clip_grad)
    second = queue_step(student, teacher, objective, [finite], sched, optimizer, cfg.optim.clip_grad, after=first)
    try:
        first.read()
        raised = False
    except FloatingPointError:
        raised = True
    second_finite = all(math.isfinite(v) for v in second.read().values())
    changed = max((p.detach() - b).abs().max().item() for p, b in zip(student.parameters(), before))
    return {"name": "lagged_skip", "rtol": RTOL["lagged_skip"], "max_abs_reference": 1.0, "max_abs_diff": changed,
            "first_raised": raised, "second_finite": second_finite,
            "ok": raised and second_finite and changed == 0}


def side_stream_difference(cfg: PretrainConfig, device: torch.device) -> tuple[float, float]:
    """The largest difference between a batch made on the side stream (behind ~50 large matrix
    products queued there, then handed over and copied at once on the current stream) and the
    same batch made on the current stream, and the batch's largest value."""
    multi_crop, images = preparation_inputs(device, cfg)

    def make() -> CropBatch:
        torch.manual_seed(cfg.seed)
        return make_batch(images, 0, cfg, multi_crop)

    def values(batch: CropBatch) -> list[Tensor]:
        return [t.float().flatten() for t in (batch.global_crops, batch.local_crops, batch.masks, batch.mask_index)]

    want = torch.cat(values(make()))
    side = SideStream(device, enabled=True)
    if side.stream is not None:
        busy = torch.randn(4096, 4096, device=device)
        with torch.cuda.stream(side.stream):
            for _ in range(50):
                busy = busy @ busy / 64
    made = side.run(make)
    side.hand_over([made])
    got = torch.cat([v.clone() for v in values(made)])
    return (got - want).abs().max().item(), want.abs().max().item()


def subset_replays(device: torch.device) -> dict[str, Any]:
    """The ``subset_cudagraphs`` check (module docstring): one residual at rate 0.1 over two packed
    groups (20 and 40 samples: 18 and 36 kept), fp32, replayed twice after a warm-up call."""
    from unittest import mock

    from trainer.models import layers

    shapes, rate = [(20, 5), (40, 3)], 0.1
    keeps = [int(batch * (1 - rate)) for batch, _ in shapes]
    torch.manual_seed(0)
    tokens = torch.randn(sum(b * n for b, n in shapes), 32, device=device)
    weight = torch.randn(32, 32, device=device) / 32 ** 0.5
    upstream = torch.randn_like(tokens)

    def branch(rows: Tensor, groups: list[tuple[int, int]]) -> Tensor:
        return torch.tanh(rows @ weight)

    def replay(function: Any) -> tuple[Tensor, Tensor]:
        torch.compiler.cudagraph_mark_step_begin()
        x = tokens.clone().requires_grad_()
        out = function(x)
        out.backward(upstream)
        return out.detach().clone(), x.grad.clone()  # a replay's outputs are overwritten by the next

    def reference(out: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """The formula's output and input gradient (the original's form) with the kept samples read
        off ``out``, and how many samples of each group ``out`` left as they were."""
        kept, offset = [], 0
        for batch, length in shapes:
            same = (out[offset:offset + batch * length] == tokens[offset:offset + batch * length]).view(batch, -1)
            kept.append((~same.all(1)).nonzero().flatten())
            offset += batch * length
        x = tokens.clone().requires_grad_()
        want = index_add_form(x, shapes, kept, branch)
        want.backward(upstream)
        return want.detach(), x.grad, [batch - len(samples) for (batch, _), samples in zip(shapes, kept)]

    mode = "reduce-overhead" if device.type == "cuda" else "default"
    with mock.patch.object(layers, "SUBSET_DROP_ABOVE", 0.0):
        compiled = torch.compile(lambda x: layers.residual(x, shapes, branch, rate), mode=mode, dynamic=False)
        replay(compiled)  # warm-up: CUDA graph trees record from a later call
        replays = [replay(compiled) for _ in range(2)]
    diff, dropped, kept_sets = 0.0, [], []
    for out, grad in replays:
        want, want_grad, counts = reference(out)
        diff = max(diff, (out - want).abs().max().item(), (grad - want_grad).abs().max().item())
        dropped.append(counts)
        kept_sets.append((out != tokens).any(1).cpu())
    scale = max(1.0, tokens.abs().max().item(), upstream.abs().max().item())
    draws_differ = not torch.equal(*kept_sets)
    expected = [batch - keep for (batch, _), keep in zip(shapes, keeps)]
    return {"name": "subset_cudagraphs", "rtol": RTOL["subset_cudagraphs"], "mode": mode,
            "max_abs_reference": scale, "max_abs_diff": diff, "dropped": dropped, "draws_differ": draws_differ,
            "ok": diff <= RTOL["subset_cudagraphs"] * scale and all(d == expected for d in dropped) and draws_differ}


def compare(name: str, want: dict[str, float], got: dict[str, float]) -> dict[str, Any]:
    """One check over loss terms: each term's difference against ``RTOL[name]`` (the step's
    ``health_*`` figures are left out: a count of argmax picks may move by one with rounding)."""
    terms = {}
    for term, value in want.items():
        if term.startswith("health_"):
            continue
        diff = abs(got[term] - value)
        terms[term] = {"reference": value, "got": got[term], "abs_diff": diff,
                       "ok": diff <= RTOL[name] * max(1.0, abs(value))}
    return {"name": name, "rtol": RTOL[name], "terms": terms, "ok": all(t["ok"] for t in terms.values())}


def main() -> None:
    args = parse_args()
    device, reference = torch.device(args.device), torch.device(args.reference)
    # fp32 is fp32: no TF32 in matmuls nor in cuDNN (the patch embedding's convolution). The flags
    # torch calls legacy, because inductor reads them, and they refuse to be read once the new
    # per-backend ones (fp32_precision) disagree among themselves
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = recipe(args, compiled=False)
    torch.manual_seed(cfg.seed)
    weights = build_networks(cfg)[0].state_dict()
    batch = synthetic_batch(cfg)
    checks: list[dict[str, Any]] = []
    result = {"device": str(device), "reference": str(reference), "config": args.config,
              "overrides": [*args.overrides, *FORCED], "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "checks": checks, "ok": False}

    def record(check: dict[str, Any]) -> None:
        """Keep ``check``, print it, and rewrite ``--out`` (a step stopped midway keeps the checks done)."""
        checks.append(check)
        result["ok"] = all(c["ok"] for c in checks)
        detail = (f"max |diff| {check['max_abs_diff']:.3g} (scale {check['max_abs_reference']:.3g})"
                  if "terms" not in check else
                  ", ".join(f"{t} {v['got']:.5f} vs {v['reference']:.5f}" for t, v in check["terms"].items()))
        print(f"{'PASS' if check['ok'] else 'FAIL'} {check['name']} (rtol {check['rtol']}): {detail}"
              + ("" if check.get("stayed_compiled", True) else "; compilation fell back to eager"), flush=True)
        write_figures(args.out, result)

    want, got = (backbone_tokens(cfg, weights, batch, d) for d in (reference, device))
    scale = max(1.0, want.abs().max().item())
    diff = (got - want).abs().max().item()
    record({"name": "backbone_fp32", "rtol": RTOL["backbone_fp32"], "max_abs_reference": scale,
            "max_abs_diff": diff, "ok": diff <= RTOL["backbone_fp32"] * scale})
    reference_losses, _ = step_losses(cfg, weights, batch, reference, None)
    fp32, _ = step_losses(cfg, weights, batch, device, None)
    record(compare("step_fp32", reference_losses, fp32))
    bf16, _ = step_losses(cfg, weights, batch, device, torch.bfloat16)
    record(compare("step_bf16", fp32, bf16))
    if args.compile:
        compiled, stayed_compiled = step_losses(recipe(args, compiled=True), weights, batch, device, None)
        check = compare("step_compiled", fp32, compiled)
        check.update(stayed_compiled=stayed_compiled, ok=check["ok"] and stayed_compiled)
        record(check)
    diff, scale = side_stream_difference(recipe(args, compiled=False), device)
    record({"name": "side_stream", "rtol": RTOL["side_stream"], "max_abs_reference": scale, "max_abs_diff": diff,
            "ok": diff == 0})
    if args.compile:
        record(subset_replays(device))
    record(lagged_skip(cfg, weights, batch, device))  # last: the cap cuts diagnostics of the bar first
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
