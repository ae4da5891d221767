"""The pipelines: ``full``, ``evaluate_only``, ``retrain``, ``distill``, ``finetune`` and ``promote``, as KFP v2 DAGs.

Every pipeline opens a parent MLflow run first and closes it in an exit handler (FAILED with the
failing stage's error when a stage fails); every stage gets the same context parameters. The
defaults point at the cluster layout (``s3://dinoflow/...``, the in-cluster MLflow service), so
the compiled YAML holds no local paths; :mod:`pipelines.local` passes local ones.

    full:           ingest (none with an empty ``data_source``) -> curate (a pass-through without
                    ``pool_uri``) -> pretrain -> evaluate
                    -> register (+ gate)
    evaluate_only:  import weights (or fetch a registered version) -> evaluate
    retrain:        champion -> pretrain (from the champion's weights and heads; on ``data_kind`` images:
                    Fashion-MNIST, a folder or curated shards) -> evaluate -> register (+ gate)
    distill:        champion (or import teacher weights) -> per student: distill -> evaluate -> register (+ gate)
    finetune:       champion (or import weights) -> finetune (the whole backbone and a linear classifier, on
                    labelled images) -> register as ``finetuned_name`` (+ gate on its test top-1)
    promote:        an alias moved to a version by hand, past the gate (a rollback from the UI)

``full`` evaluates (and gates) on the ingested Fashion-MNIST, or with ``eval_data_uri`` on one's own
labelled images in class folders (``train/<class>/``, ``val/<class>/``): a model pretrained on a
curated pool of one's own is judged on one's own labels. Every evaluating pipeline runs seg,
depth, retrieval and video (in ``eval_tasks``) on ADE20K or VOC, NYU-Depth v2, revisited Oxford or
Paris and class folders of videos when ``seg_data``, ``depth_data``, ``retrieval_data``
(``<data set>:<root>``) and ``video_data`` (a root) name them (images at ``eval_image_size``), else
on synthetic sets, so a gate's ``metric`` may be ``seg_miou`` too. ``eval_options`` sets any other
setting of the suite by name (``{video_frames: 16, video_pool: concat, layers: 4, multiscale: true,
seg_head.lr: 0.0003}``; :func:`evaluators.suite.with_options`), so a new setting needs no new parameter.

On a cluster every task reads the S3 credentials from the Secret ``s3_secret`` and the S3
endpoint and MLflow address (``AWS_ENDPOINT_URL``, ``MLFLOW_TRACKING_URI``) from the ConfigMap
``settings_config_map`` (infra/k8s/pipelines), as environment variables; the compiled YAML names
them and holds no value. Every task requests CPU and memory (:data:`STAGE_RESOURCES`); the
training and evaluation stages get ``gpus`` GPUs each (``nvidia.com/gpu``, 0: a CPU-only cluster),
tolerate the GPU nodes' taint, and run on ``cuda``. ``kfp.local`` ignores this Kubernetes configuration (it warns
that the resources have no effect): local tasks inherit the caller's environment and share the
machine, so local callers build with ``gpus=0``.

No ``from __future__ import annotations``: KFP reads the pipeline signatures' annotations as types.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import Input, Model

from components.definitions import DEFAULT_IMAGES, GPU_STAGES, Images, build_components

CLUSTER_RUN_ROOT = "s3://dinoflow/runs"
CLUSTER_TRACKING_URI = "http://mlflow.dinoflow.svc.cluster.local:5000"
CLUSTER_DATA = "s3://dinoflow/datasets/fashion-mnist"
EXPERIMENT = "dinoflow"
RUN_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER
S3_SECRET = "dinoflow-s3"  # infra/README.md step 3, copied into the pipelines' namespace
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # Secret key = env var name
SETTINGS_CONFIG_MAP = "dinoflow-pipeline-settings"  # infra/k8s/pipelines
SETTINGS_KEYS = ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI")  # ConfigMap key = env var name
GPUS = 1  # GPUs of the training and evaluation tasks on a cluster: each runs in one process
EVAL_WORKERS = 3  # evaluate's decoding processes beside the GPU's (its pod has 4 CPUs)
# the NVIDIA device plugin's resource, and the taint key of GPU nodes (infra/README.md step 0)
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Resources:
    """CPU and memory a stage's pod requests and may use at most (Kubernetes quantities);
    ``shared_memory``: a memory-backed ``/dev/shm`` of this size (DataLoader workers), or none."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    shared_memory: str = ""


_MLFLOW_ONLY = Resources("250m", "1", "512Mi", "2Gi")  # MLflow calls
STAGE_RESOURCES = {
    "open_run": _MLFLOW_ONLY,
    "close_run": _MLFLOW_ONLY,
    "ingest": Resources("500m", "2", "1Gi", "4Gi"),
    "curate": Resources("2", "4", "4Gi", "16Gi"),  # embeds and indexes the pool
    # one GPU's share of a training node (infra/k8s/training: 4 CPUs and 32Gi per GPU); the
    # shared memory counts against the memory limit
    "pretrain": Resources("4", "8", "16Gi", "32Gi", shared_memory="4Gi"),
    "distill": Resources("4", "8", "16Gi", "32Gi", shared_memory="4Gi"),  # a student and the frozen teacher
    "finetune": Resources("4", "8", "16Gi", "32Gi", shared_memory="4Gi"),
    # features of the train and test sets held once (ImageNet's 1.28M with the probe's views: 10 GB
    # with ViT-S/14, 20 with ViT-B/14; ViT-L/14's 26 and ViT-g/14's 39 want a limit of 48Gi and
    # 64Gi), probes; with a GPU, the images decoded by EVAL_WORKERS processes through the shared memory
    "evaluate": Resources("4", "8", "16Gi", "32Gi", shared_memory="4Gi"),
    "register": Resources("500m", "2", "1Gi", "4Gi"),
    "champion": Resources("250m", "1", "1Gi", "2Gi"),
    "promote": _MLFLOW_ONLY,
}


def request_resources(task: Any, resources: Resources, gpus: int = 0) -> None:
    """``task`` requests ``resources`` (and ``gpus`` GPUs, tolerating the GPU nodes' taint) on Kubernetes."""
    task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
    if resources.shared_memory:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=resources.shared_memory)
    if gpus > 0:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")


def on_cluster(component: Any, s3_secret: str, settings_config_map: str, resources: Resources,
               gpus: int = 0) -> Callable[..., Any]:
    """``component`` whose tasks get the S3 Secret and the settings ConfigMap as env vars, and
    request ``resources`` and ``gpus`` GPUs, on Kubernetes."""

    def task(**arguments: Any) -> Any:
        made = component(**arguments)
        kubernetes.use_secret_as_env(made, secret_name=s3_secret, secret_key_to_env={k: k for k in S3_SECRET_KEYS})
        kubernetes.use_config_map_as_env(made, config_map_name=settings_config_map,
                                         config_map_key_to_env={k: k for k in SETTINGS_KEYS})
        request_resources(made, resources, gpus)
        return made

    return task


def build_pipelines(images: Images | str = DEFAULT_IMAGES, s3_secret: str = S3_SECRET,
                    settings_config_map: str = SETTINGS_CONFIG_MAP, gpus: int = GPUS) -> dict[str, Callable[..., Any]]:
    """The pipeline functions (``@dsl.pipeline``) by name, for components on ``images`` (a str: one
    image for every stage) whose tasks read the Secret and ConfigMap of these names on a cluster;
    the training and evaluation stages get ``gpus`` GPUs (0 or 1; 0: they run on the CPU image, on CPU).

    Built once a process for each set of arguments (a new dict of the same pipelines after): KFP's
    resource setters each call ``inspect.stack()``, which reads every frame's source, so a build
    took seconds (~20 s under pytest's deep stacks, for each test that built them), and the compiler and
    the local runner only read a pipeline."""
    return dict(_built_pipelines(images, s3_secret, settings_config_map, gpus))


@functools.lru_cache(maxsize=8)
def _built_pipelines(images: Images | str, s3_secret: str, settings_config_map: str,
                     gpus: int) -> dict[str, Callable[..., Any]]:
    if gpus not in (0, 1):
        raise ValueError(f"gpus must be 0 (a CPU-only cluster) or 1: the pretrain task trains in one process "
                         f"(multi-GPU training: the PyTorchJob, infra/README.md step 7), got {gpus}")
    built = build_components(images, gpus)
    c = SimpleNamespace(**{name: on_cluster(component, s3_secret, settings_config_map, STAGE_RESOURCES[name],
                                            gpus if name in GPU_STAGES else 0)
                           for name, component in vars(built).items()})
    device = "cuda" if gpus > 0 else "cpu"
    on_device = {"device": device, "num_workers": EVAL_WORKERS if gpus > 0 else 0}  # evaluate's

    def uncached(task: Any) -> Any:
        return task.set_caching_options(False)

    def data_sets(test_uri: Any, seg_data: Any, depth_data: Any, retrieval_data: Any, video_data: Any,
                  image_size: Any, precision: Any, seg_steps: Any, depth_steps: Any, depth_head: Any,
                  options: Any) -> dict:
        """The evaluate task's test set of its own (empty: the labelled images' val/), real benchmark
        data sets (empty: the synthetic ones), image settings, the dense heads' training steps (0: the
        suite's), the depth head (linear or dpt) and the suite's other settings by name."""
        return {"test_uri": test_uri, "seg_data": seg_data, "depth_data": depth_data, "retrieval_data": retrieval_data,
                "video_data": video_data, "image_size": image_size, "precision": precision, "seg_steps": seg_steps,
                "depth_steps": depth_steps, "depth_head": depth_head, "options": options}

    def closer(run_root: str, tracking_uri: str, experiment: str) -> Any:
        return uncached(c.close_run(run_root=run_root, tracking_uri=tracking_uri, experiment=experiment,
                                    pipeline_run_id=RUN_ID))

    def context(run_root: str, tracking_uri: str, experiment: str, parent: Any) -> dict[str, Any]:
        return {"run_root": run_root, "tracking_uri": tracking_uri, "experiment": experiment,
                "parent_run_id": parent.output, "pipeline_run_id": RUN_ID}

    def open_parent(run_root: str, tracking_uri: str, experiment: str, name: str) -> Any:
        return uncached(c.open_run(run_root=run_root, tracking_uri=tracking_uri, experiment=experiment,
                                   pipeline_run_id=RUN_ID, pipeline=name))

    def score_and_register(ctx: dict[str, Any], use_cache: bool, backbone: Any, data_uri: Any, eval_params: dict,
                           model_name: str, metric: str, margin: float) -> None:
        """Evaluate ``backbone`` (on ``eval_params``' eval_data_uri when given, else ``data_uri``) and register it."""
        scored = c.evaluate(**ctx, use_cache=use_cache, backbone=backbone, data_uri=data_uri, **eval_params,
                            **on_device)
        uncached(c.register(**ctx, backbone=backbone, report=scored.outputs["report"], model_name=model_name,
                            metric=metric, margin=margin))

    # A pipeline of its own so that the loop reads the teacher's stages' outputs as its inputs:
    # kfp.local resolves an outer task's output parameter inside a ParallelFor as the loop item.
    @dsl.pipeline(name="distil-students", description="Distil each student from the teacher in parallel, then "
                                                      "evaluate and register it as <model_name>-<student>.")
    def distil_students(run_root: str, tracking_uri: str, experiment: str, parent_run_id: str, use_cache: bool,
                        teacher: Input[Model], students: list, overrides: list, data_kind: str, data_uri: str,
                        max_minutes: float, seed: int, data_for_eval: str, eval_data_uri: str, eval_test_uri: str,
                        train_limit: int,
                        test_limit: int, knn_k: int, knn_temperature: float, eval_tasks: list, seg_data: str,
                        depth_data: str, retrieval_data: str, video_data: str, eval_image_size: int,
                        eval_precision: str,
                        eval_seg_steps: int, eval_depth_steps: int, eval_depth_head: str, eval_options: dict,
                        model_name: str, metric: str, margin: float) -> None:
        ctx = {"run_root": run_root, "tracking_uri": tracking_uri, "experiment": experiment,
               "parent_run_id": parent_run_id, "pipeline_run_id": RUN_ID}
        with dsl.ParallelFor(students) as student:  # each a distill preset name, e.g. distill-tiny
            distilled = c.distill(**ctx, use_cache=use_cache, teacher=teacher, student=student, overrides=overrides,
                                  data_kind=data_kind, data_uri=data_uri, max_minutes=max_minutes, seed=seed,
                                  device=device, model_name=model_name)
            score_and_register(ctx, use_cache, distilled.outputs["backbone"], data_for_eval,
                               {"train_limit": train_limit, "test_limit": test_limit, "knn_k": knn_k,
                                "knn_temperature": knn_temperature, "tasks": eval_tasks,
                                "eval_data_uri": eval_data_uri,
                                **data_sets(eval_test_uri, seg_data, depth_data, retrieval_data, video_data,
                                            eval_image_size, eval_precision, eval_seg_steps, eval_depth_steps,
                                            eval_depth_head, eval_options)},
                               distilled.outputs["model_name"], metric, margin)

    @dsl.pipeline(name="full", description="Ingest, curate (with a pool), pretrain, evaluate, register with a "
                                           "promotion gate; distil each of `students` from the pretrained "
                                           "teacher in parallel, then evaluate and register each.")
    def full(run_root: str = CLUSTER_RUN_ROOT, tracking_uri: str = CLUSTER_TRACKING_URI,
             experiment: str = EXPERIMENT, use_cache: bool = True, data_source: str = CLUSTER_DATA,
             pool_uri: str = "", curation_eval_uris: list = [], curation_dedup_threshold: float = 0.9,  # noqa: B006
             curation_decontaminate_threshold: float = 0.45, curation_balance_target: int = 0,
             curation_balance_clusters: list = [], curation_embed_weights: str = "",  # noqa: B006
             preset: str = "tiny", overrides: list = [], max_minutes: float = 3.0, seed: int = 0,  # noqa: B006
             train_limit: int = 0, test_limit: int = 0, knn_k: int = 20, knn_temperature: float = 0.07,
             eval_tasks: list = ["knn", "linear"], eval_data_uri: str = "", eval_test_uri: str = "",  # noqa: B006
             seg_data: str = "", depth_data: str = "", retrieval_data: str = "", video_data: str = "",
             eval_image_size: int = 224, eval_precision: str = "fp32", eval_seg_steps: int = 0,
             eval_depth_steps: int = 0,
             eval_depth_head: str = "linear", eval_options: dict = {}, model_name: str = "dinoflow-tiny",  # noqa: B006
             metric: str = "knn_top1_k20", margin: float = 0.0,
             students: list = [], student_overrides: list = [], student_minutes: float = 3.0) -> None:  # noqa: B006
        with dsl.ExitHandler(closer(run_root, tracking_uri, experiment)):
            parent = open_parent(run_root, tracking_uri, experiment, "full")
            ctx = context(run_root, tracking_uri, experiment, parent)
            data = c.ingest(**ctx, use_cache=use_cache, source=data_source)
            # pool_uri empty: no curation, pretrain reads the ingested Fashion-MNIST
            curated = c.curate(**ctx, use_cache=use_cache, pool_uri=pool_uri, eval_uris=curation_eval_uris,
                               dedup_threshold=curation_dedup_threshold,
                               decontaminate_threshold=curation_decontaminate_threshold,
                               balance_target=curation_balance_target, balance_clusters=curation_balance_clusters,
                               embed_weights=curation_embed_weights, fallback_kind="fashion_mnist",
                               fallback_uri=data.output)
            trained = c.pretrain(**ctx, use_cache=use_cache, preset=preset, overrides=overrides,
                                 data_kind=curated.outputs["data_kind"], data_uri=curated.outputs["data_uri"],
                                 max_minutes=max_minutes, seed=seed, device=device)
            eval_params = {"train_limit": train_limit, "test_limit": test_limit, "knn_k": knn_k,
                           "knn_temperature": knn_temperature, "tasks": eval_tasks, "eval_data_uri": eval_data_uri,
                           **data_sets(eval_test_uri, seg_data, depth_data, retrieval_data, video_data,
                                       eval_image_size, eval_precision, eval_seg_steps, eval_depth_steps,
                                       eval_depth_head, eval_options)}
            score_and_register(ctx, use_cache, trained.outputs["backbone"], data.output, eval_params,
                               model_name, metric, margin)
            distil_students(run_root=run_root, tracking_uri=tracking_uri, experiment=experiment,
                            parent_run_id=parent.output, use_cache=use_cache, teacher=trained.outputs["backbone"],
                            students=students, overrides=student_overrides, data_kind=curated.outputs["data_kind"],
                            data_uri=curated.outputs["data_uri"], max_minutes=student_minutes, seed=seed,
                            data_for_eval=data.output, eval_data_uri=eval_data_uri, eval_test_uri=eval_test_uri,
                            train_limit=train_limit,
                            test_limit=test_limit, knn_k=knn_k,
                            knn_temperature=knn_temperature, eval_tasks=eval_tasks, seg_data=seg_data,
                            depth_data=depth_data, retrieval_data=retrieval_data, video_data=video_data,
                            eval_image_size=eval_image_size,
                            eval_precision=eval_precision, eval_seg_steps=eval_seg_steps,
                            eval_depth_steps=eval_depth_steps, eval_depth_head=eval_depth_head,
                            eval_options=eval_options, model_name=model_name, metric=metric, margin=margin)

    @dsl.pipeline(name="evaluate-only", description="Benchmark backbone weights (weights_uri) or a registered "
                                                    "model (model: <name>, <name>@<alias>, <name>/<version>) on "
                                                    "frozen features.")
    def evaluate_only(weights_uri: str = "", model: str = "", run_root: str = CLUSTER_RUN_ROOT,
                      tracking_uri: str = CLUSTER_TRACKING_URI, experiment: str = EXPERIMENT, use_cache: bool = True,
                      data_uri: str = CLUSTER_DATA, eval_test_uri: str = "", train_limit: int = 0,
                      test_limit: int = 0, knn_k: int = 20,
                      knn_temperature: float = 0.07, eval_tasks: list = ["knn", "linear"],  # noqa: B006
                      seg_data: str = "", depth_data: str = "", retrieval_data: str = "", video_data: str = "",
                      eval_image_size: int = 224, eval_precision: str = "fp32", eval_seg_steps: int = 0,
                      eval_depth_steps: int = 0, eval_depth_head: str = "linear",
                      eval_options: dict = {}) -> None:  # noqa: B006
        with dsl.ExitHandler(closer(run_root, tracking_uri, experiment)):
            parent = open_parent(run_root, tracking_uri, experiment, "evaluate_only")
            ctx = context(run_root, tracking_uri, experiment, parent)
            benchmark = {"use_cache": use_cache, "data_uri": data_uri, "train_limit": train_limit,
                         "test_limit": test_limit, "knn_k": knn_k, "knn_temperature": knn_temperature,
                         "tasks": eval_tasks, **on_device,
                         **data_sets(eval_test_uri, seg_data, depth_data, retrieval_data, video_data,
                                     eval_image_size, eval_precision, eval_seg_steps, eval_depth_steps,
                                     eval_depth_head, eval_options)}
            with dsl.If(model == ""):
                weights = dsl.importer(artifact_uri=weights_uri, artifact_class=dsl.Model, reimport=False)
                c.evaluate(**ctx, backbone=weights.output, **benchmark)
            with dsl.Else():  # picked from the registry, as the Kubeflow UI's users pick models
                picked = uncached(c.champion(**ctx, model_name=model))
                c.evaluate(**ctx, backbone=picked.outputs["backbone"], **benchmark)

    @dsl.pipeline(name="retrain", description="Continue from the registry's champion; promote only if better.")
    def retrain(run_root: str = CLUSTER_RUN_ROOT, tracking_uri: str = CLUSTER_TRACKING_URI,
                experiment: str = EXPERIMENT, use_cache: bool = True, data_kind: str = "fashion_mnist",
                data_uri: str = CLUSTER_DATA, preset: str = "tiny", overrides: list = [],  # noqa: B006
                max_minutes: float = 3.0, seed: int = 1, eval_data_uri: str = "",
                eval_test_uri: str = "", train_limit: int = 0, test_limit: int = 0, knn_k: int = 20,
                knn_temperature: float = 0.07,
                eval_tasks: list = ["knn", "linear"], model_name: str = "dinoflow-tiny",  # noqa: B006
                metric: str = "knn_top1_k20", margin: float = 0.0, seg_data: str = "", depth_data: str = "",
                retrieval_data: str = "", video_data: str = "", eval_image_size: int = 224,
                eval_precision: str = "fp32",
                eval_seg_steps: int = 0, eval_depth_steps: int = 0, eval_depth_head: str = "linear",
                eval_options: dict = {}) -> None:  # noqa: B006
        with dsl.ExitHandler(closer(run_root, tracking_uri, experiment)):
            parent = open_parent(run_root, tracking_uri, experiment, "retrain")
            ctx = context(run_root, tracking_uri, experiment, parent)
            start = uncached(c.champion(**ctx, model_name=model_name))
            trained = c.pretrain(**ctx, use_cache=use_cache, preset=preset, overrides=overrides,
                                 data_kind=data_kind, data_uri=data_uri, max_minutes=max_minutes, seed=seed,
                                 device=device, init=start.outputs["backbone"])
            score_and_register(ctx, use_cache, trained.outputs["backbone"], data_uri,
                               {"train_limit": train_limit, "test_limit": test_limit, "knn_k": knn_k,
                                "knn_temperature": knn_temperature, "tasks": eval_tasks, "eval_data_uri": eval_data_uri,
                                **data_sets(eval_test_uri, seg_data, depth_data, retrieval_data, video_data,
                                            eval_image_size, eval_precision, eval_seg_steps, eval_depth_steps,
                                            eval_depth_head, eval_options)},
                               model_name, metric, margin)

    @dsl.pipeline(name="distill", description="Distil each of `students` from a registered teacher (teacher_model: "
                                              "<name>, its champion, or <name>@<alias>, <name>/<version>; with "
                                              "the DINO/iBOT heads registered beside it) or from teacher weights "
                                              "(teacher_uri), then evaluate and register each as "
                                              "<model_name>-<student>.")
    def distill(teacher_model: str = "dinoflow-tiny", teacher_uri: str = "", run_root: str = CLUSTER_RUN_ROOT,
                tracking_uri: str = CLUSTER_TRACKING_URI, experiment: str = EXPERIMENT, use_cache: bool = True,
                data_kind: str = "fashion_mnist", data_uri: str = CLUSTER_DATA,
                students: list = ["distill-tiny"], student_overrides: list = [],  # noqa: B006
                student_minutes: float = 3.0, seed: int = 0, eval_data_uri: str = "", eval_test_uri: str = "",
                train_limit: int = 0, test_limit: int = 0, knn_k: int = 20, knn_temperature: float = 0.07,
                eval_tasks: list = ["knn", "linear"], seg_data: str = "", depth_data: str = "",  # noqa: B006
                retrieval_data: str = "", video_data: str = "", eval_image_size: int = 224,
                eval_precision: str = "fp32",
                eval_seg_steps: int = 0, eval_depth_steps: int = 0, eval_depth_head: str = "linear",
                eval_options: dict = {}, model_name: str = "dinoflow-tiny", metric: str = "knn_top1_k20",  # noqa: B006
                margin: float = 0.0) -> None:
        with dsl.ExitHandler(closer(run_root, tracking_uri, experiment)):
            parent = open_parent(run_root, tracking_uri, experiment, "distill")
            ctx = context(run_root, tracking_uri, experiment, parent)
            fan_out = {"run_root": run_root, "tracking_uri": tracking_uri, "experiment": experiment,
                       "parent_run_id": parent.output, "use_cache": use_cache, "students": students,
                       "overrides": student_overrides, "data_kind": data_kind, "data_uri": data_uri,
                       "max_minutes": student_minutes, "seed": seed, "data_for_eval": data_uri,
                       "eval_data_uri": eval_data_uri, "eval_test_uri": eval_test_uri, "train_limit": train_limit,
                       "test_limit": test_limit, "knn_k": knn_k, "knn_temperature": knn_temperature,
                       "eval_tasks": eval_tasks, "seg_data": seg_data, "depth_data": depth_data,
                       "retrieval_data": retrieval_data, "video_data": video_data, "eval_image_size": eval_image_size,
                       "eval_precision": eval_precision, "eval_seg_steps": eval_seg_steps,
                       "eval_depth_steps": eval_depth_steps, "eval_depth_head": eval_depth_head,
                       "eval_options": eval_options, "model_name": model_name, "metric": metric,
                       "margin": margin}
            with dsl.If(teacher_uri == ""):  # picked from the registry, its heads with it
                picked = uncached(c.champion(**ctx, model_name=teacher_model))
                distil_students(teacher=picked.outputs["backbone"], **fan_out)
            with dsl.Else():
                weights = dsl.importer(artifact_uri=teacher_uri, artifact_class=dsl.Model, reimport=False)
                distil_students(teacher=weights.output, **fan_out)

    @dsl.pipeline(name="finetune", description="Fine-tune a registered backbone (model: <name>, its champion, or "
                                               "<name>@<alias>, <name>/<version>) or backbone weights (weights_uri) "
                                               "whole, with a linear classifier, on labelled images (data_uri: "
                                               "Fashion-MNIST or class folders); register it as finetuned_name, "
                                               "promoted if its test top-1 passes the gate.")
    def finetune(model: str = "dinoflow-tiny", weights_uri: str = "", run_root: str = CLUSTER_RUN_ROOT,
                 tracking_uri: str = CLUSTER_TRACKING_URI, experiment: str = EXPERIMENT, use_cache: bool = True,
                 data_uri: str = CLUSTER_DATA, preset: str = "finetune-tiny", overrides: list = [],  # noqa: B006
                 max_minutes: float = 10.0, seed: int = 0, finetuned_name: str = "dinoflow-tiny-finetuned",
                 metric: str = "finetune_top1", margin: float = 0.0) -> None:
        with dsl.ExitHandler(closer(run_root, tracking_uri, experiment)):
            parent = open_parent(run_root, tracking_uri, experiment, "finetune")
            ctx = context(run_root, tracking_uri, experiment, parent)
            recipe = {"use_cache": use_cache, "preset": preset, "overrides": overrides, "data_uri": data_uri,
                      "max_minutes": max_minutes, "seed": seed, "device": device}
            gate = {"model_name": finetuned_name, "metric": metric, "margin": margin}
            with dsl.If(weights_uri == ""):  # picked from the registry, as the Kubeflow UI's users pick models
                picked = uncached(c.champion(**ctx, model_name=model))
                tuned = c.finetune(**ctx, backbone=picked.outputs["backbone"], **recipe)
                uncached(c.register(**ctx, backbone=tuned.outputs["tuned"], report=tuned.outputs["report"], **gate))
            with dsl.Else():
                weights = dsl.importer(artifact_uri=weights_uri, artifact_class=dsl.Model, reimport=False)
                tuned = c.finetune(**ctx, backbone=weights.output, **recipe)
                uncached(c.register(**ctx, backbone=tuned.outputs["tuned"], report=tuned.outputs["report"], **gate))

    @dsl.pipeline(name="promote", description="Point a registered model's alias (champion by default) at a "
                                              "version by hand, past the gate: a rollback. The move is written "
                                              "on the version (alias.<alias>: when, why).")
    def promote(model_name: str = "dinoflow-tiny", version: str = "", alias: str = "champion", reason: str = "",
                run_root: str = CLUSTER_RUN_ROOT, tracking_uri: str = CLUSTER_TRACKING_URI,
                experiment: str = EXPERIMENT) -> None:
        with dsl.ExitHandler(closer(run_root, tracking_uri, experiment)):
            parent = open_parent(run_root, tracking_uri, experiment, "promote")
            ctx = context(run_root, tracking_uri, experiment, parent)
            uncached(c.promote(**ctx, model_name=model_name, version=version, alias=alias, reason=reason))

    return {"full": full, "evaluate_only": evaluate_only, "retrain": retrain, "distill": distill, "finetune": finetune,
            "promote": promote}
