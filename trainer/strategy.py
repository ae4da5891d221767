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
rank). Every rank takes part in the gathers; only the main rank, which writes the file, keeps
what they gather (``full_state_dict_on_main``, ``optimizer_state``). Alike on resume, only the
main rank reads the file: the others receive its small parts from it (``broadcast_from_main``)
and its tensors one at a time (``load_whole``, ``load_optimizer_state``).

Gradients: FSDP2 averages them over ranks in its reduce-scatter, and every loss term is a mean
over the rank's images (equal counts on every rank), so W ranks x B images give the gradient of
1 rank x WB images. KoLeo is the exception, per rank as in the original (its nearest neighbour
is searched among the rank's images only).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinoflow.config import DistributedConfig
from trainer.models.layers import external_parameters


T = TypeVar("T")
MAIN_WORK_TIMEOUT = timedelta(days=2)  # how long ranks wait for the main rank's work (Strategy.on_main)
KEYED_BY_INDEX = ("this checkpoint's optimizer state is keyed by parameter index (an older single-process "
                  "checkpoint): resume it with distributed.strategy=single")


def keyed_by_index(state: dict[str, Any]) -> bool:
    """An optimizer state written before checkpoints keyed it by parameter name: torch's own
    single-process format."""
    return any(isinstance(key, int) for key in state["state"])


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds: the local shard of a DTensor, else itself.

    The shard aliases the parameter's storage, so in-place ops on it update the parameter.
    """
    partition = getattr(tensor, "ds_tensor", None)  # a DeepSpeed ZeRO-3 parameter: its flat partition
    if partition is not None:
        return partition
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

    def wrap_one(self, network: nn.Module) -> nn.Module:
        """One trained network holding a ``backbone`` (a fine-tuned classifier), prepared as
        :meth:`wrap` prepares student and teacher."""
        return network

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over ranks (a new tensor; the input is left as it is)."""
        return tensor

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Scalars averaged over ranks (one collective for all of them)."""
        return values

    def full_state_dict(self, module: nn.Module) -> dict[str, Tensor]:
        """``module``'s whole tensors (gathered from all ranks; every rank must call it)."""
        return module.state_dict()

    def full_state_dict_on_main(self, module: nn.Module) -> dict[str, Tensor]:
        """:meth:`full_state_dict` for a file the main rank writes (a checkpoint): whole tensors on
        the main rank (on the CPU under sharding), nothing on the others, which only take part in
        the gathers (every rank must call it). Why: every rank holding what one rank writes cost a
        sharded ViT-g's ranks host memory for a whole copy each (estimated ~18 GB) at every checkpoint."""
        return self.full_state_dict(module)

    def broadcast_from_main(self, value: T | None) -> T:
        """``value`` as the main rank passes it, on every rank (every rank must call it; the others
        pass None). For small things only (pickled whole): a checkpoint's settings and counters."""
        return value

    def load_whole(self, module: nn.Module, state: dict[str, Tensor] | None) -> None:
        """Load a checkpoint's whole tensors into ``module`` before :meth:`wrap` (every rank must
        call it): ``state`` is the main rank's, None on the others, which receive each tensor from
        the main rank (a broadcast into their own copy of ``module``). Why: every rank reading the
        checkpoint file cost a ViT-g's 8 ranks of a node ~18 GB of host memory each at every resume."""
        module.load_state_dict(state)

    def read_on_main(self, read: Callable[[], T], what: str) -> T:
        """``read()`` on the main rank alone, its (small: pickled whole) result on every rank (every
        rank must call it): a run's source weights, read and loaded into the main rank's modules,
        whose tensors then reach the others through :meth:`load_whole`. An error of ``read`` raises
        on every rank: as it was on the main rank, on the others naming it (``the main rank could not
        <what>: ...``), where they would have waited for the main rank in the next collective."""
        result, refused, failure = None, None, None
        if self.is_main:
            try:
                result = read()
            except Exception as err:  # noqa: BLE001 - said to every rank, then raised here as it was
                failure, refused = err, f"{type(err).__name__}: {err}"
        result, refused = self.broadcast_from_main((result, refused))
        if failure is not None:
            raise failure
        if refused is not None:
            raise RuntimeError(f"the main rank could not {what}: {refused}")
        return result

    def whole(self, module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
        """``module`` with whole parameters, to evaluate or save (every rank must call it); under
        sharding, a frozen copy made by ``build`` holding the gathered weights."""
        return module

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's whole state for a checkpoint, keyed by parameter name with whole
        tensors. The same format for every strategy and world size, so a checkpoint resumes on any
        of them. Under sharding it is gathered (every rank must call it) to the main rank alone, on
        the CPU, as :meth:`full_state_dict_on_main`: the other ranks get ``{}``."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        # cpu_offload with full_state_dict: each tensor gathered in turn, kept by rank 0 alone
        options = StateDictOptions(full_state_dict=True, cpu_offload=self.world_size > 1)
        return get_optimizer_state_dict(model, optimizer, options=options)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any] | None) -> None:
        """Restore :meth:`optimizer_state` (every rank must call it): ``state`` is the main rank's,
        None on the others (as :meth:`load_whole`); torch broadcasts each whole tensor from the main
        rank and each rank keeps its shards of it."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        if self.broadcast_from_main(self.is_main and keyed_by_index(state)):
            if self.world_size != 1:
                raise ValueError(KEYED_BY_INDEX)
            optimizer.load_state_dict(state)
            return
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.world_size > 1)
        set_optimizer_state_dict(model, optimizer, state if self.is_main else {}, options=options)

    def prepare_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Called once, with the optimizer of the wrapped ``model``; returns the optimizer whose
        ``param_groups`` the step sets (lr, weight decay) and whose state is checkpointed."""
        return optimizer

    def backward(self, loss: Tensor) -> None:
        """Gradients of ``loss`` (accumulated over the calls before :meth:`step`)."""
        loss.backward()

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> Tensor:
        """Scale the gradients of ``parameters`` to a total 2-norm of at most ``max_norm``."""
        return nn.utils.clip_grad_norm_(parameters, max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the accumulated gradients, then clear them."""
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def rank_slice(self, global_count: int) -> slice:
        """This rank's contiguous block of a global batch of ``global_count`` items."""
        if global_count % self.world_size:
            raise ValueError(f"a global batch of {global_count} does not split over {self.world_size} ranks")
        per_rank = global_count // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def on_main(self, work: Callable[[], T]) -> T | None:
        """``work()`` on the main rank alone (an evaluation), the others waiting for it; its result
        on the main rank, None on the others. Every collective the work needs (a whole network:
        :meth:`whole`) must be made before, by all ranks."""
        return work()

    def close(self, finished: bool = True) -> None:
        """Release what :func:`build_strategy` started. ``finished``: every rank got through the
        run, so the ranks wait for each other before tearing down; after an error they must not
        (a rank that died would never arrive)."""


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
        self._waiting_group: Any = None  # on_main's

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

    def wrap_one(self, network: nn.Module) -> nn.Module:
        """Each block, the backbone (its ``forward_features``, which a classifier calls, gathering
        its own parameters) and the network's root with the rest (a classifier's head), sharded."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        backbone = network.backbone
        for block in backbone.blocks:
            fully_shard(block, mesh=self.mesh)
        fully_shard(backbone, mesh=self.mesh)
        register_fsdp_forward_method(backbone, "forward_features")
        fully_shard(network, mesh=self.mesh)
        return network

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

    def full_state_dict_on_main(self, module: nn.Module) -> dict[str, Tensor]:
        whole = {}
        for name, value in module.state_dict().items():
            tensor = value.full_tensor() if hasattr(value, "full_tensor") else value  # an all-gather: every rank
            if self.is_main:
                whole[name] = tensor.cpu()
        return whole

    def broadcast_from_main(self, value: T | None) -> T:
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def load_whole(self, module: nn.Module, state: dict[str, Tensor] | None) -> None:
        def load() -> None:  # keys or shapes the module lacks raise on every rank: the others would wait below
            module.load_state_dict(state)

        self.read_on_main(load, "load the checkpoint")
        for tensor in module.state_dict().values():  # the same order on every rank: one tensor at a time
            on_device = tensor.to(self.device).contiguous()  # (NCCL moves device tensors only)
            dist.broadcast(on_device, src=0)
            if on_device is not tensor:
                tensor.copy_(on_device)

    def whole(self, module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
        copy = build().to(self.device)
        copy.load_state_dict(self.full_state_dict(module))
        return copy.requires_grad_(False).train(module.training)

    def on_main(self, work: Callable[[], T]) -> T | None:
        """As :meth:`Strategy.on_main`; the other ranks wait in a barrier of a gloo group of their
        own whose timeout is :data:`MAIN_WORK_TIMEOUT`, not the run's collective timeout
        (``distributed.timeout_seconds``, there to catch hangs): a final k-NN and linear probe on
        ImageNet takes hours, and a rank timing out in its next collective killed the run at every
        resume. If the work fails, torchrun stops the waiting ranks."""
        if self._waiting_group is None:  # made by every rank, at the same call
            self._waiting_group = dist.new_group(backend="gloo", timeout=MAIN_WORK_TIMEOUT)
        result = work() if self.is_main else None
        dist.barrier(group=self._waiting_group)
        return result

    def close(self, finished: bool = True) -> None:
        if self.owns_group and dist.is_initialized():
            if finished:
                # no rank may leave while another still talks to it: a process group torn down
                # under a peer's last collective can abort that peer at exit
                dist.barrier()
            dist.destroy_process_group()


class DeepSpeedStrategy(FSDP2Strategy):
    """Student and teacher partitioned with DeepSpeed ZeRO stage 3 (fp32) over all ranks.

    The student is a ZeRO-3 engine with the AdamW that the engine builds (its ``param_groups``
    dicts stay the ones the step sets lr and weight decay on; DeepSpeed swaps their ``params`` for
    its flat fp32 partitions). The teacher is a second ZeRO-3 engine without an optimizer: its
    parameters are partitioned exactly as the student's (same shapes, same ranks), so the EMA
    runs on ``param.ds_tensor`` of both (see :func:`local_tensor`), with no gather. Parameters
    are never kept gathered (persistence threshold 0), so ``ds_tensor`` is the only copy.

    Backward, step and clipping go through the engine: gradients are reduce-scattered (averaged
    over ranks) during backward into the optimizer's partitions; per-module clipping takes the
    norm of the local partitions, summed over ranks. Gradient accumulation is the training step's
    micro-batch loop (one :meth:`backward` per micro-batch, one :meth:`step`), not DeepSpeed's
    ``gradient_accumulation_steps`` (kept at 1): the micro-batches' gradients add up in the
    partitions until the step, as under the other strategies.

    Optimizer state is saved and restored in the same whole-tensor, by-name format as the other
    strategies (gathered with ``safe_get_full_optimizer_state``, kept by the main rank alone; on
    resume broadcast from it a tensor at a time, each rank keeping its partition), so checkpoints
    move between strategies and world sizes.
    """

    name = "deepspeed"

    def __init__(self, device: torch.device, owns_group: bool) -> None:
        import deepspeed

        self.device = device
        self.owns_group = owns_group
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        self._waiting_group: Any = None  # on_main's
        self.student_engine: Any = None
        self.teacher_engine: Any = None
        self._student: nn.Module | None = None
        self._group_names: list[list[str]] = []

    def close(self, finished: bool = True) -> None:
        for engine in (self.student_engine, self.teacher_engine):
            if engine is not None:
                engine.destroy()  # its hooks and partition buffers go before the process group does
        super().close(finished)

    def _config(self) -> dict[str, Any]:
        return {
            "train_micro_batch_size_per_gpu": 1,  # the loop feeds the batches; only the ratio matters
            "gradient_accumulation_steps": 1,  # micro-batches accumulate in the partitions until step
            "gradient_clipping": 0.0,  # per module, by clip_grad_norm_
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
            "zero_optimization": {
                "stage": 3,
                "stage3_param_persistence_threshold": 0,  # nothing stays gathered: ds_tensor is the truth
                "stage3_model_persistence_threshold": 0,
                "stage3_prefetch_bucket_size": 0,
                "contiguous_gradients": True,
                "overlap_comm": False,
            },
        }

    @staticmethod
    def _route_through_call(module: nn.Module, method_name: str) -> None:
        """Make ``module.method_name(...)`` run as ``module(...)``, so ZeRO-3's module hooks gather
        the module's own parameters (cls token, position table...) around it and for backward."""
        method = getattr(module, method_name)
        active = [False]

        def routed(*args: Any, **kwargs: Any) -> Any:
            if active[0]:  # already inside the module's call (e.g. forward -> forward_features)
                return method(*args, **kwargs)
            active[0] = True
            module.forward = method
            try:
                return module(*args, **kwargs)
            finally:
                del module.forward
                active[0] = False

        setattr(module, method_name, routed)

    def _prepare(self, network: nn.Module, method_name: str) -> None:
        """Route the backbone's ``method_name`` (what the step calls) through its call, and tell
        ZeRO-3 which parameters a block reads from modules other than its own."""
        import deepspeed

        self._route_through_call(network.backbone, method_name)
        for block in network.backbone.blocks:
            for module, parameter in external_parameters(block):
                deepspeed.zero.register_external_parameter(module, parameter)

    def wrap(self, student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
        import deepspeed

        for network in (student, teacher):
            self._prepare(network, "forward_features_list")
        self.teacher_engine, *_ = deepspeed.initialize(model=teacher, config=self._config())
        self._student = student
        return student, teacher

    def wrap_one(self, network: nn.Module) -> nn.Module:
        """A trained network (a classifier calling its backbone's ``forward_features``) becomes the
        student: partitioned when :meth:`prepare_optimizer` gives it its optimizer. One with no
        trainable parameter (a fine-tuning run's EMA) is partitioned at once, as the teacher is,
        and alike, so an EMA runs on the partitions."""
        import deepspeed

        self._prepare(network, "forward_features")
        if any(p.requires_grad for p in network.parameters()):
            self._student = network
        else:
            self.teacher_engine, *_ = deepspeed.initialize(model=network, config=self._config())
        return network

    def prepare_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        import deepspeed

        if model is not self._student or self.student_engine is not None:
            raise RuntimeError("deepspeed: prepare_optimizer takes the student wrapped by wrap(), once")
        names = {id(p): n for n, p in model.named_parameters()}
        self._group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        self.student_engine, ds_optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                     config=self._config())
        self._ds_optimizer = ds_optimizer
        if ds_optimizer.optimizer is not optimizer:
            raise RuntimeError("deepspeed wrapped a different optimizer than the one given")
        return optimizer  # its param_groups are DeepSpeed's: the step's lr/wd settings reach it

    def backward(self, loss: Tensor) -> None:
        # The step calls the backbone and heads, never the engine's forward, which is where
        # DeepSpeed marks the start of a micro-batch: mark it here, so that the gradients of a
        # second micro-batch add to the partitions instead of overwriting them (the step clears
        # the mark, so the first micro-batch after it copies).
        self._ds_optimizer.clear_backward_seen_flag()
        self.student_engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> Tensor:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        params = [p for p in parameters if p.requires_grad]
        grads = []
        for p in params:
            grad = safe_get_local_grad(p)
            real = max(0, min(p.partition_numel(), p.ds_numel - self.rank * p.partition_numel()))
            grads.append(grad.flatten()[:real] if grad is not None else None)
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for grad in grads:
            if grad is not None:
                squares += grad.double().square().sum()
        total = self.all_reduce(squares).sqrt()
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            for p, grad in zip(params, grads):
                if grad is not None:
                    local = safe_get_local_grad(p).clone()
                    local.flatten()[: grad.numel()] = grad * coef
                    safe_set_local_grad(p, local)
        return total.float()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.student_engine.step()  # also clears the gradients

    def full_state_dict(self, module: nn.Module) -> dict[str, Tensor]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {name: value.detach().clone() for name, value in module.state_dict().items()}

    def full_state_dict_on_main(self, module: nn.Module) -> dict[str, Tensor]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):  # every rank
            if not self.is_main:
                return {}
            return {name: value.detach().to("cpu", copy=True) for name, value in module.state_dict().items()}

    def _flat(self, param: nn.Parameter) -> Tensor:
        """The flat fp32 partition (of a ZeRO sub-group) holding ``param``'s local part: the tensor
        the wrapped torch optimizer keys its state by."""
        opt = self._ds_optimizer
        sub_group = opt.grad_position[opt.get_param_id(param)][0]
        return opt.fp32_partitioned_groups_flat[sub_group]

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        params = dict(model.named_parameters())
        flat_state = self._ds_optimizer.optimizer.state
        groups, state = [], {}
        for group, names in zip(optimizer.param_groups, self._group_names):
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(names)})
            for name in names:
                if self._flat(params[name]) not in flat_state:
                    continue  # no step yet: no state, as torch's optimizers
                moments = {key: safe_get_full_optimizer_state(params[name], key)  # all-gathers: every rank
                           for key in ("exp_avg", "exp_avg_sq")}
                if not self.is_main:
                    continue
                step = flat_state[self._flat(params[name])]["step"]
                state[name] = {"step": step.clone() if isinstance(step, Tensor) else torch.tensor(float(step)),
                               **{key: full.detach().view(params[name].ds_shape).cpu().clone()
                                  for key, full in moments.items()}}
        return {"state": state, "param_groups": groups} if self.is_main else {}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any] | None) -> None:
        if self.broadcast_from_main(self.is_main and keyed_by_index(state)):
            raise ValueError(KEYED_BY_INDEX)
        outline = self.broadcast_from_main({  # all but the moments, which follow a tensor at a time
            "param_groups": state["param_groups"],
            "steps": {name: entry["step"] for name, entry in state["state"].items()}} if self.is_main else None)
        params = dict(model.named_parameters())
        by_first = {g["params"][0]: g for g in outline["param_groups"] if g["params"]}
        flat_state = self._ds_optimizer.optimizer.state
        for index, (group, names) in enumerate(zip(optimizer.param_groups, self._group_names)):
            saved = by_first.get(names[0])
            if saved is None or list(saved["params"]) != names:
                raise ValueError(f"deepspeed: the checkpoint's optimizer groups do not match this model's "
                                 f"(group {index} starts with {names[0]})")
            group.update({k: v for k, v in saved.items() if k != "params"})
            for name in names:
                if name not in outline["steps"]:
                    continue
                p = params[name]
                flat = self._flat(p)
                entry = flat_state.setdefault(flat, {})
                # where torch keeps it: on the partition's device for the fused kernel, else on the CPU
                step_device = flat.device if group.get("fused") else torch.device("cpu")
                entry["step"] = torch.as_tensor(outline["steps"][name], dtype=torch.float32,
                                                device=step_device).clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    buffer = entry.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
                    local, _ = self._ds_optimizer._get_fp32_opt_state_partition(p, False, key)
                    start = self.rank * p.partition_numel()
                    full = self._flat_from_main(state["state"][name][key] if self.is_main else None, p.ds_numel,
                                                buffer.dtype)
                    local.copy_(full[start : start + local.numel()])

    def _flat_from_main(self, tensor: Tensor | None, numel: int, dtype: torch.dtype) -> Tensor:
        """The main rank's whole ``tensor`` (None on the others) of ``numel`` elements, flat, as
        ``dtype`` on this rank's device, on every rank (a broadcast)."""
        if self.is_main:
            full = tensor.to(self.device, dtype).flatten()
        else:
            full = torch.empty(numel, dtype=dtype, device=self.device)
        dist.broadcast(full, src=0)
        return full


def leave_rank() -> None:
    """End this process without the interpreter's teardown when it is one of several ``torchrun``
    ranks (``WORLD_SIZE`` > 1) whose work is done (outputs written, process group destroyed); a
    single process returns.

    Why: a DeepSpeed ZeRO-3 rank on CPU sometimes aborted after a finished run, in C++ teardown
    with no Python frame left ("terminate called without an active exception", SIGABRT), and
    torchrun then failed the whole run although every output was written (1 run in 6-8 with the
    CPU busy; twice in a day's CI). Nothing is left to release here, so the rank exits at once,
    its output streams and log handlers flushed first.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


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
    if cfg.strategy == "deepspeed":
        return DeepSpeedStrategy(device, owns_group)
    return FSDP2Strategy(device, owns_group)
