"""The KFP component of each stage: a typed signature and three lines that call the stage.

Why this shape: KFP ships a lightweight component as its function's source, so each body only
imports its stage from the embedded code bundle (:mod:`components.bundle`) and calls it; the
logic lives in the stage modules, where tests call it directly. Every component takes the same
context parameters (run root, MLflow store, parent run, pipeline run id, cache switch).
``build_components(images, gpus)`` makes them for their base images (:class:`Images`): the
training and evaluation stages (:data:`GPU_STAGES`) on the GPU image when they get GPUs, the others (and every
stage on a CPU-only cluster, ``gpus=0``) on the CPU image, both from one registry and tag; or one
image for every stage (any image with dinoflow's dependencies: the code itself always comes from
the bundle).

No ``from __future__ import annotations`` here: KFP reads the annotations as types.
"""

import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components.bundle import ARGUMENT_LIMIT, build_bundle, imported_modules, longest_argument, packed_bundle

REGISTRY = "ghcr.io/dinoflow"
TAG = "0.1.0"  # the project's version: images are built and tagged per release (infra/README.md)
# the stages that run a backbone over a data set
GPU_STAGES = frozenset({"pretrain", "distill", "finetune", "evaluate"})


@dataclass(frozen=True)
class Images:
    """Base images of the components: ``gpu`` for :data:`GPU_STAGES`, ``cpu`` for every other stage."""

    cpu: str
    gpu: str

    @classmethod
    def from_registry(cls, registry: str = REGISTRY, tag: str = TAG) -> "Images":
        """``<registry>/dinoflow-cpu:<tag>`` and ``<registry>/dinoflow-gpu:<tag>`` (infra/docker)."""
        registry = registry.rstrip("/")
        if not registry or not tag or tag == "latest":
            raise ValueError(f"give a registry and a fixed tag (not latest), got {registry!r} and {tag!r}")
        return cls(cpu=f"{registry}/dinoflow-cpu:{tag}", gpu=f"{registry}/dinoflow-gpu:{tag}")

    @classmethod
    def single(cls, image: str) -> "Images":
        """The same image for every stage."""
        return cls(cpu=image, gpu=image)

    def for_stage(self, stage: str, gpus: int = 1) -> str:
        """The GPU image for a stage of :data:`GPU_STAGES` that gets GPUs, else the CPU image."""
        return self.gpu if stage in GPU_STAGES and gpus > 0 else self.cpu


DEFAULT_IMAGES = Images.from_registry()


def open_run(run_root: str, tracking_uri: str, experiment: str, pipeline_run_id: str, pipeline: str) -> str:
    """Open the pipeline's parent MLflow run; returns its id."""
    from components.pipeline_run import open_pipeline_run
    from components.stage import StageContext

    ctx = StageContext(run_root, tracking_uri, experiment, "", pipeline_run_id)
    return open_pipeline_run(ctx, pipeline)


def close_run(run_root: str, tracking_uri: str, experiment: str, pipeline_run_id: str,
              status: dsl.PipelineTaskFinalStatus):
    """Exit handler: end the parent run FINISHED or FAILED, with the failed stages' errors."""
    from components.pipeline_run import close_pipeline_run
    from components.stage import StageContext

    print(close_pipeline_run(StageContext(run_root, tracking_uri, experiment, "", pipeline_run_id), status.state))


def ingest(run_root: str, tracking_uri: str, experiment: str, parent_run_id: str, pipeline_run_id: str,
           use_cache: bool, source: str) -> str:
    """Copy Fashion-MNIST into the pipeline's storage; returns the stored copy's URI."""
    from components.ingest import run_ingest
    from components.stage import StageContext

    return run_ingest(StageContext(run_root, tracking_uri, experiment, parent_run_id, pipeline_run_id, use_cache),
                      source)


def curate(run_root: str, tracking_uri: str, experiment: str, parent_run_id: str, pipeline_run_id: str,
           use_cache: bool, pool_uri: str, eval_uris: list, dedup_threshold: float, decontaminate_threshold: float,
           balance_target: int, balance_clusters: list, embed_weights: str, fallback_kind: str,
           fallback_uri: str) -> NamedTuple("CurateOutputs", [("data_kind", str), ("data_uri", str)]):
    """Curate ``pool_uri`` into shards; an empty ``pool_uri`` skips curation and passes the fallback
    data (``fallback_kind``, ``fallback_uri``) on. Returns what the pretrain stage reads."""
    from collections import namedtuple

    from components.curate import run_curate_stage
    from components.stage import StageContext

    ctx = StageContext(run_root, tracking_uri, experiment, parent_run_id, pipeline_run_id, use_cache)
    kind, uri = run_curate_stage(ctx, pool_uri, [str(u) for u in eval_uris], dedup_threshold,
                                 decontaminate_threshold, balance_target, [int(c) for c in balance_clusters],
                                 embed_weights, fallback_kind, fallback_uri)
    return namedtuple("CurateOutputs", ["data_kind", "data_uri"])(kind, uri)


def pretrain(run_root: str, tracking_uri: str, experiment: str, parent_run_id: str, pipeline_run_id: str,
             use_cache: bool, preset: str, overrides: list, data_kind: str, data_uri: str, max_minutes: float,
             seed: int, device: str, backbone: Output[Model], init: Input[Model] = None) -> NamedTuple(
                 "PretrainOutputs", [("steps", int), ("cached", bool)]):
    """Pretrain a recipe (from ``init``'s weights when given) on ``device`` (cpu or cuda; a
    ``device=`` in ``overrides`` wins); the teacher backbone is the output."""
    from collections import namedtuple

    from components.pretrain import run_pretrain_stage
    from components.stage import StageContext

    ctx = StageContext(run_root, tracking_uri, experiment, parent_run_id, pipeline_run_id, use_cache)
    result = run_pretrain_stage(ctx, backbone.path, preset, [f"device={device}", *(str(o) for o in overrides)],
                                data_kind, data_uri, max_minutes, seed, init.path if init is not None else None)
    backbone.metadata.update({"steps": result["steps"], "cached": result["cached"], "format": "safetensors"})
    return namedtuple("PretrainOutputs", ["steps", "cached"])(int(result["steps"]), bool(result["cached"]))


def distill(run_root: str, tracking_uri: str, experiment: str, parent_run_id: str, pipeline_run_id: str,
            use_cache: bool, teacher: Input[Model], student: str, overrides: list, data_kind: str, data_uri: str,
            max_minutes: float, seed: int, device: str, model_name: str, backbone: Output[Model]) -> NamedTuple(
                "DistillOutputs", [("steps", int), ("cached", bool), ("model_name", str)]):
    """Distil the frozen ``teacher`` backbone into the ``student`` preset on ``device``; the student
    EMA backbone is the output, ``model_name`` the name it registers under (``<model_name>-<student>``)."""
    from collections import namedtuple

    from components.distill import registered_name, run_distill_stage
    from components.stage import StageContext

    ctx = StageContext(run_root, tracking_uri, experiment, parent_run_id, pipeline_run_id, use_cache)
    result = run_distill_stage(ctx, backbone.path, teacher.path, student,
                               [f"device={device}", *(str(o) for o in overrides)], data_kind, data_uri, max_minutes,
                               seed)
    backbone.metadata.update({"steps": result["steps"], "cached": result["cached"], "format": "safetensors"})
    return namedtuple("DistillOutputs", ["steps", "cached", "model_name"])(
        int(result["steps"]), bool(result["cached"]), registered_name(model_name, student))


def finetune(run_root: str, tracking_uri: str, experiment: str, parent_run_id: str, pipeline_run_id: str,
             use_cache: bool, backbone: Input[Model], preset: str, overrides: list, data_uri: str, max_minutes: float,
             seed: int, device: str, tuned: Output[Model], report: Output[Artifact],
             metrics: Output[Metrics]) -> NamedTuple("FinetuneOutputs", [("top1", float), ("cached", bool)]):
    """Fine-tune ``backbone`` whole with a linear classifier (recipe ``preset``) on the labelled images
    at ``data_uri`` on ``device``; the fine-tuned backbone with its classifier is the output, its test
    top-1 the report's ``finetune_top1`` (the register stage's gate metric)."""
    from collections import namedtuple

    from components.finetune import run_finetune_stage
    from components.stage import StageContext

    ctx = StageContext(run_root, tracking_uri, experiment, parent_run_id, pipeline_run_id, use_cache)
    result = run_finetune_stage(ctx, tuned.path, report.path, backbone.path, preset,
                                [f"device={device}", *(str(o) for o in overrides)], data_uri, max_minutes, seed)
    for name, value in result["metrics"].items():
        metrics.log_metric(name, value)
    tuned.metadata.update({"steps": result["steps"], "cached": result["cached"], "format": "safetensors"})
    return namedtuple("FinetuneOutputs", ["top1", "cached"])(float(result["metrics"]["finetune_top1"]),
                                                             bool(result["cached"]))


def evaluate(run_root: str, tracking_uri: str, experiment: str, parent_run_id: str, pipeline_run_id: str,
             use_cache: bool, backbone: Input[Model], data_uri: str, train_limit: int, test_limit: int,
             knn_k: int, knn_temperature: float, tasks: list, report: Output[Artifact],
             metrics: Output[Metrics], eval_data_uri: str = "", device: str = "cpu", num_workers: int = 0,
             seg_data: str = "", depth_data: str = "", retrieval_data: str = "", image_size: int = 224,
             precision: str = "fp32", seg_steps: int = 0, depth_steps: int = 0, test_uri: str = "",
             depth_head: str = "linear", video_data: str = "", options: dict = {}) -> float:  # noqa: B006
    """The benchmark suite (``tasks`` of knn, linear, logreg, seg, depth, retrieval, video, finegrained) on the
    labelled images at ``eval_data_uri``, else ``data_uri`` (tested on ``test_uri``'s class folders when
    given), and seg, depth, retrieval, video on the data sets named (else
    synthetic ones; the dense heads trained ``seg_steps`` and ``depth_steps`` steps, 0: the suite's;
    ``depth_head``: linear or dpt; ``options``: the suite's other settings by name, e.g. ``video_frames``),
    on ``device`` (images decoded by ``num_workers`` processes); returns k-NN top-1 (k=20), NaN when
    k-NN was not run."""
    from components.evaluate import run_evaluate_stage
    from components.stage import StageContext

    ctx = StageContext(run_root, tracking_uri, experiment, parent_run_id, pipeline_run_id, use_cache)
    result = run_evaluate_stage(ctx, backbone.path, report.path, eval_data_uri or data_uri, train_limit, test_limit,
                                [int(knn_k)], knn_temperature, [str(t) for t in tasks], device, num_workers,
                                seg_data, depth_data, retrieval_data, image_size, precision, seg_steps, depth_steps,
                                test_uri, depth_head, video_data, dict(options))
    for name, value in result["metrics"].items():
        metrics.log_metric(name, value)
    return float(result["metrics"].get("knn_top1_k20", float("nan")))


def register(run_root: str, tracking_uri: str, experiment: str, parent_run_id: str, pipeline_run_id: str,
             backbone: Input[Model], report: Input[Artifact], model_name: str, metric: str, margin: float,
             decision: Output[Artifact]) -> NamedTuple("RegisterOutputs", [("version", str), ("promoted", bool)]):
    """Register the backbone and move ``champion`` only if the gate passes."""
    from collections import namedtuple

    from components.register import run_register_stage
    from components.stage import StageContext

    ctx = StageContext(run_root, tracking_uri, experiment, parent_run_id, pipeline_run_id)
    result = run_register_stage(ctx, backbone.path, report.path, decision.path, model_name, metric, margin)
    return namedtuple("RegisterOutputs", ["version", "promoted"])(result["version"], result["promoted"])


def champion(run_root: str, tracking_uri: str, experiment: str, parent_run_id: str, pipeline_run_id: str,
             model_name: str, backbone: Output[Model]) -> str:
    """A registered backbone as an artifact (with the heads registered with it): ``model_name`` is
    ``<name>`` (its ``champion``), ``<name>@<alias>`` or ``<name>/<version>``; returns the version."""
    from components.register import run_champion_stage
    from components.stage import StageContext

    ctx = StageContext(run_root, tracking_uri, experiment, parent_run_id, pipeline_run_id)
    return run_champion_stage(ctx, model_name, backbone.path)


def promote(run_root: str, tracking_uri: str, experiment: str, parent_run_id: str, pipeline_run_id: str,
            model_name: str, version: str, alias: str, reason: str) -> str:
    """Point ``alias`` of ``model_name`` at ``version`` past the gate (a rollback); returns the
    version it pointed at before ("" when none)."""
    from components.promote import run_promote_stage
    from components.stage import StageContext

    ctx = StageContext(run_root, tracking_uri, experiment, parent_run_id, pipeline_run_id)
    return run_promote_stage(ctx, model_name, version, alias, reason)["previous"]


STAGES = (open_run, close_run, ingest, curate, pretrain, distill, finetune, evaluate, register, champion, promote)


def build_components(images: Images | str = DEFAULT_IMAGES, gpus: int = 1) -> SimpleNamespace:
    """KFP components of every stage on ``images`` (a str: one image for all), all shipping the
    code bundle of what it imports; with ``gpus=0`` the GPU stages take the CPU image too.

    Raises ``ValueError`` naming the stage when a container argument, the component's program with
    its bundle inside, would be over :data:`~components.bundle.ARGUMENT_LIMIT`: its pod could not start."""
    chosen = Images.single(images) if isinstance(images, str) else images
    made = {}
    for func in STAGES:
        component = dsl.component(func, base_image=chosen.for_stage(func.__name__, gpus),
                                  embedded_artifact_path=str(packed_bundle(stage_bundle(func))),
                                  install_kfp_package=False)
        container = component.component_spec.implementation.container
        size = longest_argument([*container.command, *(container.args or [])])
        if size > ARGUMENT_LIMIT:
            raise ValueError(f"the {func.__name__} component's program is {size // 1024} KiB, over the "
                             f"{ARGUMENT_LIMIT // 1024} KiB one container argument holds; trim the modules it imports")
        made[func.__name__] = component
    return SimpleNamespace(**made)


def stage_bundle(func: Callable[..., Any]) -> Path:
    """The code bundle of a component function: the import closure of the imports in its body."""
    return build_bundle(roots=imported_modules(textwrap.dedent(inspect.getsource(func))))
