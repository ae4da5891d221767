"""Typed, validated run configurations: YAML presets plus dotted command-line overrides.

Why: a wrong field must fail before any work starts, in one line that names the field, the
value given and what is allowed. Configs are frozen pydantic models, passed explicitly; derived
values are computed by functions, never written back into a config.

A preset is a YAML file under ``configs/`` (or any path). It may start from another preset with
``_base_: NAME`` and override a few keys, like the original's experiment files do.
Overrides are ``a.b.c=value`` strings; the value is read as YAML, and scalars are left for the
schema to coerce, so ``optim.lr=1e-3`` and ``name=123`` both mean what a user expects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_KEY = "_base_"

Schema = TypeVar("Schema", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the field."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, numbers finite and values immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrackingConfig(Section):
    """Where and how often a run reports to MLflow (the store URI comes from the environment)."""

    experiment: str = Field("dinoflow", min_length=1)
    metric_every: int = Field(10, ge=1, description="log step metrics every N steps")


class FashionMnistConfig(Section):
    """Fashion-MNIST in its IDX form (Debian's ``dataset-fashion-mnist`` or any copy)."""

    source: str = Field("/usr/share/datasets/fashion-mnist", min_length=1)
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)


class DemoConfig(Section):
    """The demo job: the ``full`` pipeline on this machine, on Fashion-MNIST."""

    name: str = Field("demo", min_length=1)
    out: str = Field("runs/demo", min_length=1, description="run root: a path or URI")
    seed: int = 0
    data: FashionMnistConfig = FashionMnistConfig()
    tracking: TrackingConfig = TrackingConfig()
    device: Literal["cpu", "cuda"] = "cpu"
    pretrain_preset: str = Field("tiny", min_length=1, description="pretraining recipe of the demo")
    pretrain_minutes: float = Field(3.0, gt=0, description="training time of the pretrain stage")
    pretrain_overrides: list[str] = Field(default_factory=list, description="dotted overrides of the recipe")
    eval_train_limit: int = Field(0, ge=0, description="labelled train images the benchmarks use (0: all)")
    eval_test_limit: int = Field(0, ge=0, description="test images the benchmarks use (0: all)")
    model_name: str = Field("dinoflow-tiny", min_length=1, description="registered model in MLflow")
    gate_margin: float = Field(0.0, description="a new version becomes champion if it beats it by more")


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that replay CUDA graphs


class ModelConfig(Section):
    """The backbone: a named architecture, optionally shrunk for CPU runs."""

    arch: Literal["vit_small", "vit_base", "vit_large", "vit_giant2"] = "vit_small"
    patch_size: int = Field(14, ge=1)
    embed_dim: int | None = Field(None, ge=8, description="overrides the architecture's width")
    depth: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    ffn_layer: Literal["mlp", "swiglu"] | None = None
    num_register_tokens: int = Field(0, ge=0)
    layerscale_init: float = Field(1e-5, gt=0)
    drop_path_rate: float = Field(0.3, ge=0, lt=1)
    drop_path_uniform: bool = True
    compile_blocks: bool = Field(
        False, description="torch.compile each transformer block of the networks being trained (static "
        "shapes; a block whose compilation fails runs eagerly, with a warning); state-dict names unchanged",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = Field(
        "default", description="torch.compile mode of compile_blocks (inductor's options of that name): "
        "'reduce-overhead' replays each compiled block's kernels as CUDA graphs on a GPU (one process only; "
        "no effect on CPU), the max-autotune modes tune the matrix products (long compilation)",
    )

    @model_validator(mode="after")
    def _mode_needs_compile(self) -> ModelConfig:
        if self.compile_mode != "default" and not self.compile_blocks:
            raise ValueError(f"model.compile_mode = {self.compile_mode!r} needs model.compile_blocks = true")
        return self


class HeadsConfig(Section):
    """DINO head (and the iBOT head when separate): MLP -> bottleneck -> K prototypes."""

    num_prototypes: int = Field(65536, ge=2)
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    num_layers: int = Field(3, ge=1)
    ibot_separate_head: bool = False
    ibot_num_prototypes: int = Field(65536, ge=2)
    ibot_bottleneck_dim: int = Field(256, ge=1)


class LossConfig(Section):
    """Weights, temperatures and teacher normalisation of the DINOv2 objective."""

    dino_weight: float = Field(1.0, ge=0)
    ibot_weight: float = Field(1.0, ge=0)
    koleo_weight: float = Field(0.1, ge=0)
    centering: Literal["softmax", "sinkhorn_knopp"] = "softmax"
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.07, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_epochs: float = Field(30, ge=0)
    mask_probability: float = Field(0.5, ge=0, le=1)
    mask_ratio_min: float = Field(0.1, ge=0, le=1)
    mask_ratio_max: float = Field(0.5, ge=0, le=1)
    compile: bool = Field(
        False, description="torch.compile the element-wise tails of the DINO/iBOT cross-entropies and the "
        "teacher's targets (centred softmax, Sinkhorn-Knopp): fused passes over the (rows, prototypes) "
        "logits; eager fallback with a warning on failure",
    )

    @model_validator(mode="after")
    def _mask_ratios_ordered(self) -> LossConfig:
        if self.mask_ratio_min > self.mask_ratio_max:
            raise ValueError(f"loss.mask_ratio_min = {self.mask_ratio_min} must be at most loss.mask_ratio_max = "
                             f"{self.mask_ratio_max}")
        return self


class CropsConfig(Section):
    """Multi-crop augmentation (sizes in pixels; scales as fractions of the image area)."""

    load_size: int = Field(256, ge=8, description="images are decoded to load_size x load_size")
    max_aspect: float = Field(1.0, ge=1, description="the decoded square holds an image's centred region of aspect "
                              "ratio up to this (its longer side over its shorter), squeezed; the crops are drawn "
                              "over that region in its own pixels. 1: the centre square; the original draws them "
                              "over the whole image")
    global_crop_size: int = Field(224, ge=8)
    local_crop_size: int = Field(98, ge=8)
    num_local_crops: int = Field(8, ge=0)
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    blur_kernel_size: int = Field(9, ge=1)
    compile: bool = Field(False, description="torch.compile the augmentation's pixel work after the crops (the "
                          "jitter steps and the rest, each fused; eager fallback); the GPU recipes turn it on")
    original_blur_probabilities: bool = Field(
        True, description="use the original's effective blur probabilities 0 / 0.9 / 0.5 "
        "(its inverted RandomApply) instead of the nominal 1.0 / 0.1 / 0.5",
    )
    highres_steps: int = Field(0, ge=0, description="final steps of the schedule at high resolution")
    highres_global_crop_size: int = Field(518, ge=8)
    highres_local_crop_size: int = Field(224, ge=8)
    highres_load_size: int = Field(
        0, ge=0, description="the high-resolution phase's images decoded to this square (its batches read at "
        "this size from the phase's first step, resumed runs too), so that its crops get detail: the recipe's "
        "load_size / global_crop_size ratio at 518 px is 592; 0: load_size, the crops then upsample",
    )

    @model_validator(mode="after")
    def _scales_ordered(self) -> CropsConfig:
        for name in ("global_crop_scale", "local_crop_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"crops.{name} = {list(getattr(self, name))} must hold 0 < low <= high <= 1 "
                                 "(fractions of the image's area)")
        return self


class OptimConfig(Section):
    """AdamW, schedules and clipping; an epoch is ``epoch_length`` steps, whatever the data size."""

    epochs: float = Field(100, gt=0)
    epoch_length: int = Field(1250, ge=1)
    batch_size: int = Field(64, ge=2, description="images per rank per step")
    base_lr: float = Field(4e-3, gt=0, description="for a global batch of 1024, sqrt scaling")
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(10, ge=0)
    weight_decay: float = Field(0.04, ge=0)
    weight_decay_end: float = Field(0.4, ge=0)
    momentum_teacher: float = Field(0.992, ge=0, le=1)
    final_momentum_teacher: float = Field(1.0, ge=0, le=1)
    freeze_last_layer_epochs: float = Field(1, ge=0)
    layerwise_decay: float = Field(0.9, gt=0, le=1)
    patch_embed_lr_mult: float = Field(0.2, ge=0)
    clip_grad: float = Field(3.0, ge=0, description="per-module max norm; 0 disables")
    adamw_beta1: float = Field(0.9, ge=0, lt=1)
    adamw_beta2: float = Field(0.999, ge=0, lt=1)
    grad_accumulation: int = Field(
        1, ge=1, description="micro-batches of batch_size per optimiser step, their gradients summed: the step and "
        "the learning rate's batch scaling count batch_size x grad_accumulation images a rank, and the softmax "
        "centres move once a step by all its teacher rows; Sinkhorn-Knopp normalises over one micro-batch's rows",
    )
    fused_adamw: Literal["auto", "on", "off"] = Field(
        "auto", description="torch's fused AdamW kernel: auto: on CUDA (except under distributed.strategy="
        "deepspeed), else torch's default (foreach on CUDA, a per-tensor loop on CPU); on: always; off: "
        "torch's default",
    )
    lagged_loss_read: bool = Field(
        True, description="with fused AdamW in one process, read a step's losses while the next step runs, so "
        "that the GPU does not wait for the host between steps; a non-finite loss still stops the run with every "
        "weight as it was before it, a step later; false: read them before queuing the next step",
    )


class DataConfig(Section):
    """Where training images come from."""

    kind: Literal["fashion_mnist", "folder", "shards"] = "folder"
    uri: str = Field("", description="folder, shard folder or Fashion-MNIST folder")
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    num_workers: int = Field(0, ge=0)
    side_stream: bool = Field(False, description="on CUDA, make the next step's batch on a second stream, beside "
                              "the step's kernels rather than after them (benchmarks/train_step.py measures both)")


class EvalConfig(Section):
    """Frozen-feature benchmarks run during and after training (labelled data only)."""

    every_steps: int = Field(0, ge=0, description="0: only at the end")
    at_minutes: list[float] = Field(default_factory=list, description="also after these minutes of training")
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    train_limit: int = Field(0, ge=0, description="labelled train images used (0: all; class folders: a "
                             "seeded random subset)")
    test_limit: int = Field(0, ge=0)
    data_uri: str = Field("", description="labelled images to score on: Fashion-MNIST's folder, or class folders "
                          "train/<class>/ and val/<class>/; empty: the training data when it is Fashion-MNIST")
    image_size: int = Field(0, ge=0, description="class folders: the centre crop's side (0: crops.global_crop_size)")


class DistributedConfig(Section):
    """How a run (pretraining, distillation, fine-tuning) is spread over processes (one per rank, started by
    ``torchrun``)."""

    strategy: Literal["single", "fsdp2", "deepspeed"] = Field(
        "single", description="single: one process, whole networks; fsdp2: student and teacher sharded "
        "with torch FSDP2 over all ranks (gloo on CPU, NCCL on CUDA); deepspeed: student and teacher "
        "partitioned with DeepSpeed ZeRO stage 3 (fp32), the optimizer state partitioned too",
    )
    timeout_seconds: float = Field(1800, gt=0, description="collective timeout of the process group")


class PretrainConfig(Section):
    """Self-supervised pretraining (DINO + iBOT + KoLeo) of a backbone."""

    name: str = Field("pretrain", min_length=1)
    out: str = Field("runs/pretrain", min_length=1, description="run root: a path or URI")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds numpy and torch (both take 0 <= seed < 2**32)")
    device: Literal["cpu", "cuda"] = "cpu"
    max_steps: int = Field(0, ge=0, description="stop after this many steps (0: the schedule)")
    max_minutes: float = Field(0, ge=0, description="stop after this much training time, evaluations "
                               "excluded, over all resumes (0: no limit)")
    checkpoint_every: int = Field(100, ge=1)
    init_weights: str = Field("", description="backbone weights (path or URI) the networks start from on a "
                              "fresh run: a run or pipeline output folder, a registered model (models:/<name>@<alias>, "
                              "models:/<name>/<version>; fetched by the CLI), Meta's released .pth (its position "
                              "table resized to the global crop), a training dump, a Hugging Face folder; empty: "
                              "random init. The recipe's model.* must match their architecture (an error names what "
                              "differs)")
    init_weights_source: Literal["auto", "official", "training", "safetensors", "hf"] = Field(
        "auto", description="layout of init_weights; auto: from the path (*.safetensors: safetensors, a folder "
        "with config.json: hf, a run folder: its backbone.safetensors, else official); a training dump must be named")
    init_heads: Literal["auto", "fresh"] = Field(
        "auto", description="with init_weights: auto starts the DINO/iBOT heads (and the teacher's centres) from "
        "the heads trained with those weights where there are (a run folder's heads.safetensors, one beside a "
        "backbone.safetensors, a training dump's teacher heads), else fresh; the recipe's heads.* must match them "
        "(an error names what differs); fresh: new heads whatever the weights come with")
    model: ModelConfig = ModelConfig()
    heads: HeadsConfig = HeadsConfig()
    loss: LossConfig = LossConfig()
    crops: CropsConfig = CropsConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _crops_fit_patches(self) -> PretrainConfig:
        """Every crop side (and the evaluation's) must be a multiple of the patch size (the patch grid
        must tile it)."""
        for name in ("global_crop_size", "local_crop_size", "highres_global_crop_size", "highres_local_crop_size"):
            size = getattr(self.crops, name)
            if size % self.model.patch_size:
                raise ValueError(f"crops.{name} = {size} is not a multiple of model.patch_size = "
                                 f"{self.model.patch_size}")
        if self.eval.image_size % self.model.patch_size:
            raise ValueError(f"eval.image_size = {self.eval.image_size} is not a multiple of model.patch_size = "
                             f"{self.model.patch_size}")
        return self

    @model_validator(mode="after")
    def _cuda_graphs_in_one_process(self) -> PretrainConfig:
        """CUDA graphs replay fixed parameter addresses: a sharded strategy gathers its parameters
        into buffers it may free and remake each step."""
        if self.model.compile_mode in CUDA_GRAPH_MODES and self.distributed.strategy != "single":
            raise ValueError(f"model.compile_mode = {self.model.compile_mode!r} (CUDA graphs) runs with "
                             f"distributed.strategy = 'single', not {self.distributed.strategy!r}")
        return self


def preset_names(kind: str) -> list[str]:
    """The names of the built-in presets of ``kind``: those in its folder, ``configs/<kind>/``
    (``demo``: ``configs/`` itself)."""
    folder = CONFIG_DIR if kind == "demo" else CONFIG_DIR / kind
    return sorted(path.stem for path in folder.glob("*.yaml"))


def preset_path(name_or_path: str | Path, kinds: Sequence[str] = ()) -> Path:
    """Find a preset: an existing file, else ``configs/**/<name>.yaml`` (one match) for a bare name.
    A name not found is said with the presets of ``kinds`` (:data:`PRESET_KINDS`; none: of every kind).

    Why not any path's name: a mistyped path to one's own recipe (``runs/tiny.yaml``) would run the
    built-in preset of that name instead. Why the kinds: a pretraining's name is no answer to a
    mistyped fine-tuning recipe."""
    path = Path(name_or_path)
    try:
        if path.is_file():
            return path
    except OSError as err:  # a name too long for the file system, say
        raise ConfigError(f"preset {str(name_or_path)[:80]!r} cannot be a file: {err.strerror}") from err
    if len(path.parts) > 1:
        raise ConfigError(f"preset file {str(name_or_path)!r} not found (a bare name, such as {path.stem!r}, "
                          f"picks a preset under {CONFIG_DIR})")
    stem = path.name.removesuffix(".yaml")
    matches = sorted(CONFIG_DIR.rglob(f"{stem}.yaml"))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        names = [name for kind in kinds for name in preset_names(kind)] if kinds else [
            p.stem for p in CONFIG_DIR.rglob("*.yaml")]
        raise ConfigError(f"preset {str(name_or_path)!r} not found; available: {', '.join(sorted(names))}")
    raise ConfigError(f"preset {str(name_or_path)!r} is ambiguous: {[str(m) for m in matches]}")


def load_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset, resolving its ``_base_`` chain (child keys win, sections merge)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"preset {path} includes itself through {BASE_KEY}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: impossible dates like 2001-02-30
        raise ConfigError(f"preset {path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must hold a mapping, not {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    base_path = path.parent / (str(base) if str(base).endswith(".yaml") else f"{base}.yaml")
    if not base_path.is_file():
        base_path = preset_path(base)
    return merge(load_yaml(base_path, (*_seen, path)), data)


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two mappings; sections merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _override_value(text: str) -> Any:
    """YAML-read an override; scalars stay text so the schema coerces them to its own type, and
    nothing (``data.uri=``) is the empty text, not YAML's null (``null`` or ``~`` is)."""
    if not text:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    except (ValueError, RecursionError) as err:  # an impossible date (2001-02-30), a 1000-deep nesting
        raise ConfigError(f"override value {text[:40]!r} cannot be read: {' '.join(str(err).split())[:200]}") from None
    if value is None or isinstance(value, (list, dict)):
        return value
    return text


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested mapping (new keys are left for validation)."""
    result = merge({}, data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.field=value")
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {item!r}: {where!r} is a value ({child!r}), not a section"
                )
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = _override_value(text.strip())
    return result


def _allowed_keys(schema: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """Field names of the section that holds ``loc`` (for 'unknown key' messages)."""
    model = schema
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def describe_error(schema: type[BaseModel], err: ValidationError) -> str:
    """One line per problem, naming the dotted field, the value given and what is allowed."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "<root>"
        if not problem["loc"] or problem["type"] == "value_error":  # a check across fields names them itself
            lines.append(problem["msg"].removeprefix("Value error, "))
        elif problem["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(schema, problem["loc"]))
            lines.append(f"unknown key {where!r} (allowed: {allowed})")
        else:
            lines.append(f"{where} = {problem['input']!r}: {problem['msg']}")
    return "; ".join(lines)


def validate(schema: type[Schema], data: Mapping[str, Any]) -> Schema:
    """Build a config from plain data, or raise ConfigError in one line."""
    try:
        return schema.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(f"invalid {schema.__name__}: {describe_error(schema, err)}") from None


def load_config(
    schema: type[Schema], preset: str | Path | None = None, overrides: Sequence[str] = ()
) -> Schema:
    """Load a preset (or the schema's defaults), apply overrides, validate."""
    data = load_yaml(preset_path(preset, PRESET_KINDS.get(schema, ()))) if preset is not None else {}
    return validate(schema, apply_overrides(data, overrides))


class TeacherConfig(Section):
    """The frozen teacher of a distillation run."""

    uri: str = Field("", description="a dinoflow run folder (its checkpoints/latest.json), backbone weights "
                     "(path or URI) or a registered model (models:/<name>@<alias>, models:/<name>/<version>; "
                     "fetched by the CLI with the heads registered with it)")
    source: Literal["auto", "checkpoint", "backbone", "training"] = Field(
        "auto", description="auto: checkpoint when teacher.uri holds checkpoints/latest.json, else backbone; "
        "checkpoint: the teacher network of a pretrain (or distill) run, with its "
        "frozen DINO/iBOT heads and its centres (a distill run's: its student EMA and heads, no centres; "
        "distill.objective=features reads its backbone only); backbone: "
        "backbone weights in any layout found from the path (a .safetensors, a run folder's, Meta's released .pth, "
        "a Hugging Face folder), with the heads trained with them, frozen, where there are (a heads.safetensors "
        "beside the backbone's file or in the run folder), else frozen, randomly "
        "initialised heads built from `heads` (seeded by `seed`); none for distill.objective=features; "
        "training: a training dump (a .pth like the original's, {'teacher': ...}: never found from the path, "
        "a .pth being Meta's released layout too), its teacher's backbone and DINO/iBOT heads, read once",
    )


class DistillObjectiveConfig(Section):
    """What the student learns from the frozen teacher."""

    objective: Literal["heads", "features"] = Field(
        "heads", description="heads: DINO on CLS and the patch loss on every global-crop patch, against the "
        "teacher's DINO/iBOT head outputs (the student has its own heads; weights loss.dino_weight, "
        "loss.ibot_weight); features: the student's CLS (every crop) and global-crop patch tokens, each through "
        "a linear projector to the teacher's width, pulled in cosine to the teacher's backbone CLS and patch "
        "tokens (no heads built or run; the projectors are not released). KoLeo (loss.koleo_weight) in both",
    )
    patch_weight: float = Field(1.0, ge=0, description="features: weight of the patch-token cosine loss "
                                "(the CLS cosine loss has weight 1)")
    centering: Literal["sinkhorn_knopp", "softmax"] = Field(
        "sinkhorn_knopp", description="heads: how the frozen teacher's DINO/iBOT outputs become the student's "
        "targets, distillation's own choice (loss.centering, the student recipe's pretraining one, is not read): "
        "sinkhorn_knopp (the original's: its distillation keeps the ViT-g recipe's loop; DINOv3 distils so too) "
        "or softmax (a running centre, started from the teacher's where its checkpoint or heads file holds one); "
        "unused with features")


class DistillConfig(PretrainConfig):
    """Distillation of a frozen teacher into a student: the pretraining recipe of the student
    (``model``, ``heads``, ``loss``, ``crops``, ``optim``...) plus where the teacher comes from
    (``teacher``) and what the student learns from it (``distill``).

    Compared with pretraining: the teacher is frozen (never updated), the student has no
    stochastic depth and no masking, the patch loss covers every patch of the global crops, and
    an EMA of the student (momentum schedule ``optim.momentum_teacher``) is the released model.
    """

    init_heads: Literal["auto", "fresh"] = Field(
        "fresh", description="with init_weights: fresh (the paper's) gives the student new heads; auto starts them "
        "from the heads trained with those weights where there are (as pretraining's init_heads; the teacher's "
        "centres stay the teacher's)")
    teacher: TeacherConfig = TeacherConfig()
    distill: DistillObjectiveConfig = DistillObjectiveConfig()


class FinetuneDataConfig(Section):
    """The labelled images of a fine-tuning run (:func:`evaluators.classification.labelled_images`)."""

    uri: str = Field("", description="Fashion-MNIST's folder, or class folders train/<class>/ and val/<class>/ "
                     "(test/<class>/ when there is no val/)")
    kind: Literal["auto", "fashion_mnist", "folder"] = "auto"
    test_uri: str = Field("", description="a test set of class folders of its own instead of <uri>/val (its classes "
                          "among train's; holding fewer, scored over its own)")
    train_limit: int = Field(0, ge=0, description="train images used (0: all; class folders: a seeded random subset)")
    test_limit: int = Field(0, ge=0, description="test images scored (0: all)")
    num_workers: int = Field(0, ge=0, description="decoding processes")
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    max_aspect: float = Field(1.0, ge=1, description="class folders: the training crops are drawn over each image's "
                              "centred region of aspect ratio up to this (1: the centre square; crops.max_aspect)")
    val_fraction: float = Field(0.0, ge=0, lt=0.5, description="share of each class's train images held out of "
                                "training (seeded), scored at each evaluation to pick by (keep, the EMA) instead of "
                                "test (0: none, the pick on test)")


class FinetuneAugmentConfig(Section):
    """The training images' augmentation, on the device (the DeiT/MAE fine-tuning recipe's parts)."""

    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="random resized crop's area range")
    horizontal_flip: bool = True
    rand_augment_ops: int = Field(2, ge=0, description="RandAugment's operations per image (kornia's; 0: off)")
    rand_augment_magnitude: int = Field(9, ge=0, le=30)
    random_erasing: float = Field(0.25, ge=0, le=1, description="probability of erasing a random box")
    mixup_alpha: float = Field(0.8, ge=0, description="Beta(a, a) of the mixup weight (0: no mixup)")
    cutmix_alpha: float = Field(1.0, ge=0, description="Beta(a, a) of the cutmix area (0: no cutmix)")
    mix_probability: float = Field(1.0, ge=0, le=1, description="batches mixed (mixup or cutmix)")
    cutmix_share: float = Field(0.5, ge=0, le=1, description="of the mixed batches, those cut-mixed when both are on")
    label_smoothing: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _scale_ordered(self) -> FinetuneAugmentConfig:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"augment.crop_scale = {list(self.crop_scale)} must hold 0 < low <= high <= 1")
        return self


class FinetuneOptimConfig(Section):
    """AdamW with layer-wise learning-rate decay, warm-up then cosine; an epoch is a pass over the
    training images (fine-tuning's, unlike pretraining's fixed-length epochs)."""

    epochs: float = Field(100, gt=0)
    batch_size: int = Field(128, ge=2, description="images per micro-batch (per step without accumulation)")
    grad_accumulation: int = Field(1, ge=1, description="micro-batches per step, their gradients summed: a step "
                                   "sees batch_size x grad_accumulation images")
    base_lr: float = Field(5e-4, gt=0, description="for a step of 256 images, scaled linearly")
    min_lr: float = Field(1e-6, ge=0)
    warmup_epochs: float = Field(5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    layerwise_decay: float = Field(0.65, gt=0, le=1, description="block i's rate x decay^(depth - i); the head's x 1")
    patch_embed_lr_mult: float = Field(1.0, ge=0)
    clip_grad: float = Field(0.0, ge=0, description="max gradient norm of the whole model; 0 disables")
    adamw_beta1: float = Field(0.9, ge=0, lt=1)
    adamw_beta2: float = Field(0.999, ge=0, lt=1)
    fused_adamw: Literal["auto", "on", "off"] = Field("auto", description="torch's fused AdamW: auto: on CUDA")


class FinetuneConfig(Section):
    """Supervised fine-tuning of a whole backbone with a linear classifier on labelled images."""

    name: str = Field("finetune", min_length=1)
    out: str = Field("runs/finetune", min_length=1, description="run root: a path or URI")
    seed: int = Field(0, ge=0, lt=2**32)
    device: Literal["cpu", "cuda"] = "cpu"
    weights: str = Field("", description="the backbone to fine-tune (path or URI): a run or pipeline output folder, a "
                         "registered model (models:/<name>@<alias>; fetched by the CLI), a .safetensors, Meta's "
                         "released .pth, a training dump, a Hugging Face folder")
    weights_source: Literal["auto", "official", "training", "safetensors", "hf"] = Field(
        "auto", description="layout of weights; auto: from the path")
    image_size: int = Field(224, ge=1, description="side of the training crops and of the test images' centre crop; a "
                            "multiple of the backbone's patch")
    head_input: Literal["cls", "cls+avgpool"] = Field(
        "cls+avgpool", description="the classifier's input: the final CLS token, or it and the mean patch token")
    drop_path_rate: float = Field(0.1, ge=0, lt=1, description="stochastic depth of every block while fine-tuning")
    max_steps: int = Field(0, ge=0, description="stop after this many steps (0: the schedule)")
    max_minutes: float = Field(0, ge=0, description="stop after this much training time, over all resumes (0: none)")
    checkpoint_every: int = Field(200, ge=1)
    eval_every_epochs: float = Field(1, ge=0, description="score the test split (and the held-out images) every "
                                     "N epochs (0: at the end only)")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="a moving average of the weights, ema <- d x ema + "
                             "(1 - d) x weights after every step (DeiT's 0.99996), scored beside them at each "
                             "evaluation (0: none)")
    ema_warmup: bool = Field(False, description="the decay after step t (1, 2, ...) is min(ema_decay, (1 + t) / (10 + "
                             "t)), TensorFlow's num_updates rule: the start's weights fade fast")
    keep: Literal["last", "best"] = Field(
        "last", description="the weights written out: the last step's, or the evaluation's of the best top-1 on "
        "data.val_fraction's held-out images (on test without them: optimistic); the EMA's where they score higher")
    data: FinetuneDataConfig = FinetuneDataConfig()
    augment: FinetuneAugmentConfig = FinetuneAugmentConfig()
    optim: FinetuneOptimConfig = FinetuneOptimConfig()
    tracking: TrackingConfig = TrackingConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _ema_warmup_has_an_ema(self) -> FinetuneConfig:
        if self.ema_warmup and not self.ema_decay:
            raise ValueError("ema_warmup is on but ema_decay = 0 keeps no moving average: set ema_decay (e.g. 0.9999)")
        return self


# the kinds of built-in presets (configs/<kind>/; demo: configs/ itself) each schema reads: a distillation's
# student recipe may be a pretraining's
PRESET_KINDS: dict[type[BaseModel], tuple[str, ...]] = {
    DemoConfig: ("demo",), PretrainConfig: ("pretrain",), DistillConfig: ("distill", "pretrain"),
    FinetuneConfig: ("finetune",)}
