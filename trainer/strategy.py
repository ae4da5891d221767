"""Distribution strategies: how the networks are placed and sharded, and how ranks reduce.

Why a layer: the training step, the losses and the loop are written once. A strategy supplies
the few things that change with distribution, chosen by ``distributed.strategy`` in the config:

* ``wrap(student, teacher)``, once in setup: ``single`` leaves the networks whole; ``fsdp2``
  shards both with torch FSDP2 (``fully_shard`` per block, per backbone, per head) over the same
  device mesh, so a teacher parameter's local shard lines up with the student's and the EMA runs
  on local shards with no gather (see :func:`local_tensor`).
* ``all_reduce``: the cross-rank sum the losses take (Sinkhorn-Knopp, softmax centring).
* ``rank_slice``: which images of a global batch this rank reads (rank ``r`` of ``W`` takes the
  ``r``-th contiguous block), so a global batch means the same images whatever ``W`` is.
* ``mean``: a logged value averaged over ranks (losses are per-rank batch means).

Checkpoints hold whole tensors keyed by parameter name, the optimizer's state included (through
``torch.distributed.checkpoint.state_dict`` with ``full_state_dict``) for every strategy, so a run
written by W ranks resumes on any world size (keep the global batch: ``optim.batch_size`` is per
rank).

Gradients: FSDP2 averages them over ranks in its reduce-scatter, and every loss term is a mean
over the rank's images (equal counts on every rank), so W ranks x B images give the gradient of
1 rank x WB images. KoLeo is the exception, per rank as in the original (its nearest neighbour
is searched among the rank's images only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinoflow.config import DistributedConfig


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds: the local shard of a DTensor, else itself.

    The shard aliases the parameter's storage, so in-place ops on it update the parameter.
    """
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


class Strategy:
    """One process holding whole networks (``distributed.strategy: single``)."""

    name = "single"

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_main(self) -> bool:
        """The rank that logs, evaluates and writes files."""
        return self.rank == 0

    def wrap(self, student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
        return student, teacher

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over ranks (a new tensor; the input is left as it is)."""
        return tensor

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Scalars averaged over ranks (one collective for all of them)."""
        return values

    def full_state_dict(self, module: nn.Module) -> dict[str, Tensor]:
        """``module``'s whole tensors (gathered from all ranks; every rank must call it)."""
        return module.state_dict()

    def whole(self, module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
        """``module`` with whole parameters, to evaluate or save (every rank must call it); under
        sharding, a frozen copy made by ``build`` holding the gathered weights."""
        return module

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's whole state for a checkpoint, keyed by parameter name with whole
        tensors (gathered under sharding: every rank must call it). The same format for every
        strategy and world size, so a checkpoint resumes on any of them."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Restore :meth:`optimizer_state` (each rank keeps its shards of the whole tensors)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        if any(isinstance(key, int) for key in state["state"]):
            # written before checkpoints keyed the state by name: torch's own single-process format
            if self.world_size != 1:
                raise ValueError("this checkpoint's optimizer state is keyed by parameter index (an older "
                                 "single-process checkpoint): resume it with distributed.strategy=single")
            optimizer.load_state_dict(state)
            return
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def rank_slice(self, global_count: int) -> slice:
        """This rank's contiguous block of a global batch of ``global_count`` items."""
        if global_count % self.world_size:
            raise ValueError(f"a global batch of {global_count} does not split over {self.world_size} ranks")
        per_rank = global_count // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def close(self) -> None:
        """Release what :func:`build_strategy` started."""


class FSDP2Strategy(Strategy):
    """Student and teacher sharded with torch FSDP2 over one flat mesh of all ranks.

    Wrapping order (inner units first): each transformer block, the backbone (embeddings, norm),
    each head. The backbone's ``forward_features_list`` (which the step calls instead of
    ``forward``) is registered so that FSDP gathers the backbone's own parameters around it.
    Student and teacher get the same units on the same mesh, so their shards match one to one.
    """

    name = "fsdp2"

    def __init__(self, device: torch.device, owns_group: bool) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.device = device
        self.owns_group = owns_group
        self.mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    def wrap(self, student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
        self._shard(student, keep_heads_gathered=True)
        self._shard(teacher, keep_heads_gathered=False)
        return student, teacher

    def _shard(self, network: nn.Module, keep_heads_gathered: bool) -> None:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        backbone = network.backbone
        for block in backbone.blocks:
            fully_shard(block, mesh=self.mesh)
        fully_shard(backbone, mesh=self.mesh)
        register_fsdp_forward_method(backbone, "forward_features_list")
        heads = [h for h in (network.dino_head, network.ibot_head) if h is not None]
        for head in heads:
            # a student head runs up to three times per step (global, local, patch tokens): keep
            # it gathered from its first forward to its backward, which reshards it
            fully_shard(head, mesh=self.mesh, reshard_after_forward=not keep_heads_gathered)
        if not keep_heads_gathered:
            # the teacher has no backward, and FSDP keeps a root unit gathered after its forward
            # (expecting one): reshard explicitly, so its parameters are shards again for the EMA
            gathered = backbone.forward_features_list

            def forward_features_list(*args: Any, **kwargs: Any) -> Any:
                try:
                    return gathered(*args, **kwargs)
                finally:
                    backbone.reshard()

            backbone.forward_features_list = forward_features_list
            for module in (backbone, *heads):
                module.register_forward_hook(lambda module, args, output: module.reshard())

    def all_reduce(self, tensor: Tensor) -> Tensor:
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        names = sorted(values)
        stacked = self.all_reduce(torch.tensor([values[n] for n in names], dtype=torch.float64, device=self.device))
        return {n: float(v) / self.world_size for n, v in zip(names, stacked.tolist())}

    def full_state_dict(self, module: nn.Module) -> dict[str, Tensor]:
        return {name: value.full_tensor() if hasattr(value, "full_tensor") else value
                for name, value in module.state_dict().items()}

    def whole(self, module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
        copy = build().to(self.device)
        copy.load_state_dict(self.full_state_dict(module))
        return copy.requires_grad_(False).train(module.training)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def build_strategy(cfg: DistributedConfig, device: torch.device) -> Strategy:
    """The strategy ``cfg`` names. ``fsdp2`` joins the process group that ``torchrun`` (or a test)
    describes in ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``, unless one is already up;
    gloo on CPU, NCCL on CUDA."""
    if cfg.strategy == "single":
        return Strategy()
    owns_group = not dist.is_initialized()
    if owns_group:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"distributed.strategy={cfg.strategy} needs a process group: start it with "
                               f"torchrun (missing {', '.join(missing)})")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=cfg.timeout_seconds))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return FSDP2Strategy(device, owns_group)
