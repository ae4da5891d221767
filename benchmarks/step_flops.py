"""How much work is one dinoflow training step per image, next to the ceiling probe's?

``train_step.py --probe`` sets dinoflow's img/s against a plain ViT step's (``step_probe.py``) and
turns both into TFLOP/s with the probe's hand count. dinoflow's step does other work: its stochastic
depth (above rate 0.1, the subset form) skips a share of the student's branch rows, its losses add
small products of their own, and it never computes the patch embedding's input gradient, which the
probe's count includes. This counts what dinoflow's step really multiplies, so that an img/s ratio
can be read as the probe's work over ours, times our FLOP rate over the probe's.

Counted by torch's ``FlopCounterMode`` (matmul FLOPs, 2 per multiply-add; norms, element-wise ops,
the optimizer and the EMA left out, as in the probe's count) over the engine's own
:func:`~trainer.engine.loss_terms` and its backward, with the crops as fake tensors: every activation
a shape only, no arithmetic and no activation memory (the weights are real), so the full recipes
(ViT-L/14 at batch 64, 65,536 prototypes) count on a laptop CPU. Attention runs torch's math
backend here, so that its two products are counted. The step's masks are the recipe's (their
count padded to the recipe's bound, as in training). ``backbone`` is
the teacher's forward and the student's forward and backward through the backbones alone; ``heads and
losses`` is the rest of the step.

    python benchmarks/step_flops.py --config vits14 -- optim.batch_size=128 crops.global_crop_size=224 \
        crops.local_crop_size=98 crops.num_local_crops=8 heads.num_prototypes=65536
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gpu_correctness import synthetic_batch  # this script's folder is first on sys.path
from step_probe import probe_flops_per_image, probe_shape  # this script's folder is first on sys.path
from train_step import write_figures  # this script's folder is first on sys.path
from dinoflow.config import PretrainConfig, load_config
from trainer.batches import CropBatch
from trainer.engine import Objective, SSLNetwork, build_networks, crop_outputs, loss_terms


def _counted(work: Any) -> int:
    """Matmul FLOPs of ``work()`` (forward and the backward it runs) on fake tensors, attention by
    torch's math backend so that its products are counted."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def _backbones(student: SSLNetwork, teacher: SSLNetwork, batch: CropBatch) -> None:
    """The backbones' share of a step, as :func:`~trainer.engine.loss_terms` calls them: the
    teacher's forward on the global crops, the student's forward on both crop groups (the global
    ones masked) and a backward through every output token."""
    with torch.no_grad():
        teacher.backbone.forward_features(batch.global_crops.flatten(0, 1))
    outputs = crop_outputs(student.backbone, batch)
    sum(output["x_norm_clstoken"].sum() + output["x_norm_patchtokens"].sum() for output in outputs).backward()


def step_flops(cfg: PretrainConfig) -> dict[str, Any]:
    """Matmul FLOPs per image of one training step of ``cfg`` (its batch, crops and masks): the
    whole step, its backbone part, and the ceiling probe's hand count at the same sizes. Counted on
    the eager step (the GPU presets' compiled blocks and loss tails off): compiling does the same
    products, and the counter sees them as operators."""
    eager_model = cfg.model.model_copy(update={"compile_blocks": False, "compile_mode": "default"})
    cfg = cfg.model_copy(update={"model": eager_model, "loss": cfg.loss.model_copy(update={"compile": False})})
    batch = synthetic_batch(cfg)
    student, teacher = build_networks(cfg)  # real weights (loss code reads them); the inputs are fake
    objective = Objective(cfg)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        crops = CropBatch(*(fake.from_tensor(t) for t in (batch.global_crops, batch.local_crops, batch.masks,
                                                          batch.mask_index)))

    def whole_step() -> None:
        terms = loss_terms(student, teacher, objective, crops, cfg.loss.teacher_temp)
        sum(terms.values()).backward()

    with fake:
        total, backbone = _counted(whole_step), _counted(lambda: _backbones(student, teacher, crops))
    images = cfg.optim.batch_size
    probe = probe_flops_per_image(probe_shape(cfg))
    return {"batch": images, "masked_rows": len(batch.mask_index), "gflop_per_image": total / images / 1e9,
            "backbone_gflop_per_image": backbone / images / 1e9,
            "heads_and_losses_gflop_per_image": (total - backbone) / images / 1e9,
            "probe_gflop_per_image": probe / 1e9, "ours_vs_probe": total / images / probe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="pretraining preset name or YAML path")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the preset")
    args = parser.parse_args()
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    figures = {"config": args.config, "overrides": args.overrides, **step_flops(cfg)}
    print(f"One training step of preset {args.config!r}, batch {figures['batch']} "
          f"({figures['masked_rows']} masked-patch rows), matmul GFLOP per image:")
    for label, key in (("backbones", "backbone_gflop_per_image"),
                       ("heads and losses", "heads_and_losses_gflop_per_image"),
                       ("dinoflow's step", "gflop_per_image"), ("ceiling probe", "probe_gflop_per_image")):
        print(f"  {label:<18} {figures[key]:>10.2f}")
    print(f"  {'ours / probe':<18} {figures['ours_vs_probe']:>10.3f}")
    write_figures(args.json, figures)


if __name__ == "__main__":
    main()
