"""The training AdamW: its parameter groups (layer-wise learning-rate decay, no weight decay
on biases and norms, the prototypes' own schedule) and its kernel (fused or torch's default),
the same when a checkpoint written with another kernel is resumed."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dinoflow.config import PretrainConfig

if TYPE_CHECKING:
    from trainer.engine import SSLNetwork

_log = logging.getLogger(__name__)


def param_groups(student: SSLNetwork, cfg: PretrainConfig) -> list[dict[str, Any]]:
    """AdamW groups of pretraining's ``student`` (:func:`layer_groups` with the recipe's decays);
    the heads' prototype layers follow the last-layer schedule."""
    return layer_groups(student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)


def layer_groups(network: nn.Module, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict[str, Any]]:
    """AdamW groups of a network holding a ``backbone`` by (lr multiplier, weight-decay
    multiplier, last layer), for pretraining's and fine-tuning's layer-wise decay alike.

    Layer-wise decay ``r^(depth + 1 - layer)`` (embeddings are layer 0, block i layer i + 1, the
    final norm and everything outside the backbone, heads or classifier, ``depth + 1``), patch
    embedding x ``patch_embed_lr_mult``; no weight decay on biases, norms and LayerScale gammas;
    ``is_last_layer`` marks the DINO heads' prototype layers (``last_layer``).
    """
    depth = network.backbone.depth
    groups: dict[tuple[float, float, bool], list[nn.Parameter]] = {}
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = depth + 1
        if name.startswith("backbone."):
            inner = name.removeprefix("backbone.")
            if inner.startswith(("cls_token", "pos_embed", "mask_token", "register_tokens", "patch_embed")):
                layer = 0
            elif inner.startswith("blocks."):
                layer = int(inner.split(".")[1]) + 1
        lr_mult = layerwise_decay ** (depth + 1 - layer)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        groups.setdefault((lr_mult, wd_mult, "last_layer" in name), []).append(parameter)
    return [{"params": params, "lr_multiplier": lr, "wd_multiplier": wd, "is_last_layer": last}
            for (lr, wd, last), params in groups.items()]


def use_fused_adamw(cfg: PretrainConfig, device: torch.device) -> bool:
    """Whether pretraining's AdamW runs torch's fused kernel (``optim.fused_adamw``) on parameters
    on ``device``: :func:`fused_adamw_on` under the run's strategy.

    Under ``distributed.strategy=deepspeed`` ``auto`` does not fuse: ZeRO-3 steps the optimizer on
    its own flat fp32 partitions, and that combination has been checked on CPU only (2 ranks train
    like one fused process; see ``DeepSpeedStrategy.load_optimizer_state`` for where fused keeps its
    ``step``), not on GPUs; ``on`` asks for it explicitly.
    """
    if cfg.optim.fused_adamw == "auto" and cfg.distributed.strategy == "deepspeed":
        return False
    return fused_adamw_on(cfg.optim.fused_adamw, device)


def fused_adamw_on(choice: str, device: torch.device) -> bool:
    """A ``fused_adamw`` setting (``auto``, ``on``, ``off``) on ``device``: ``auto`` fuses on CUDA,
    where one kernel per device and dtype does the whole update that torch's default foreach path
    spreads over several launches, and keeps torch's default elsewhere."""
    return device.type == "cuda" if choice == "auto" else choice == "on"


def build_adamw(student: nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The training AdamW: :func:`param_groups` of ``student`` (parameters on ``device``), the
    recipe's betas, fused per :func:`use_fused_adamw` (the choice is logged). "Not fused" passes
    ``fused=None``, torch's default (foreach where it applies), never ``False``, which would force
    the slow per-tensor loop."""
    fused = use_fused_adamw(cfg, device)
    _log.info("AdamW on %s: %s (optim.fused_adamw=%s)", device, "fused" if fused else "torch default",
              cfg.optim.fused_adamw)
    return torch.optim.AdamW(param_groups(student, cfg), betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
                             fused=True if fused else None)


def with_kernel_choice(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint's optimizer ``state`` carrying ``optimizer``'s kernel choice (``fused``,
    ``foreach``) in its param groups, to load into ``optimizer``.

    Why: torch's ``load_state_dict`` takes every group setting from the checkpoint, so a run
    resumed with another ``optim.fused_adamw`` or on another device (or from a checkpoint written
    before the option existed) would silently keep the writer's kernel, and torch places each
    ``step`` counter by the flag it loads (fused: on the parameter's device; else on the CPU)."""
    choice = {key: optimizer.param_groups[0][key] for key in ("fused", "foreach")}
    return {**state, "param_groups": [{**group, **choice} for group in state["param_groups"]]}
