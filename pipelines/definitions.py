"""The pipelines: ``full``, ``evaluate_only`` and ``retrain``, as KFP v2 DAGs.

Every pipeline opens a parent MLflow run first and closes it in an exit handler (FAILED with the
failing stage's error when a stage fails); every stage gets the same context parameters. The
defaults point at the cluster layout (``s3://dinoflow/...``, the in-cluster MLflow service), so
the compiled YAML holds no local paths; :mod:`pipelines.local` passes local ones.

    full:           ingest -> pretrain -> evaluate -> register (+ gate)
    evaluate_only:  import weights -> evaluate
    retrain:        champion -> pretrain (from the champion's weights) -> evaluate -> register (+ gate)

No ``from __future__ import annotations``: KFP reads the pipeline signatures' annotations as types.
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl

from components.definitions import DEFAULT_IMAGE, build_components

CLUSTER_RUN_ROOT = "s3://dinoflow/runs"
CLUSTER_TRACKING_URI = "http://mlflow.dinoflow.svc.cluster.local:5000"
CLUSTER_DATA = "s3://dinoflow/datasets/fashion-mnist"
EXPERIMENT = "dinoflow"
RUN_ID = dsl.PIPELINE_JOB_ID_PLACEHOLDER


def build_pipelines(image: str = DEFAULT_IMAGE) -> dict[str, Callable[..., Any]]:
    """The pipeline functions (``@dsl.pipeline``) for components on ``image``, by name."""
    c = build_components(image)

    def uncached(task: Any) -> Any:
        return task.set_caching_options(False)

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
        scored = c.evaluate(**ctx, use_cache=use_cache, backbone=backbone, data_uri=data_uri, **eval_params)
        uncached(c.register(**ctx, backbone=backbone, report=scored.outputs["report"], model_name=model_name,
                            metric=metric, margin=margin))

    @dsl.pipeline(name="full", description="Ingest, pretrain, evaluate, register with a promotion gate.")
    def full(run_root: str = CLUSTER_RUN_ROOT, tracking_uri: str = CLUSTER_TRACKING_URI,
             experiment: str = EXPERIMENT, use_cache: bool = True, data_source: str = CLUSTER_DATA,
             preset: str = "tiny", overrides: list = [], max_minutes: float = 3.0, seed: int = 0,  # noqa: B006
             train_limit: int = 0, test_limit: int = 0, knn_k: int = 20, knn_temperature: float = 0.07,
             eval_tasks: list = ["knn", "linear"], model_name: str = "dinoflow-tiny",  # noqa: B006
             metric: str = "knn_top1_k20", margin: float = 0.0) -> None:
        with dsl.ExitHandler(closer(run_root, tracking_uri, experiment)):
            parent = open_parent(run_root, tracking_uri, experiment, "full")
            ctx = context(run_root, tracking_uri, experiment, parent)
            data = c.ingest(**ctx, use_cache=use_cache, source=data_source)
            trained = c.pretrain(**ctx, use_cache=use_cache, preset=preset, overrides=overrides,
                                 data_kind="fashion_mnist", data_uri=data.output, max_minutes=max_minutes, seed=seed)
            score_and_register(ctx, use_cache, trained.outputs["backbone"], data.output,
                               {"train_limit": train_limit, "test_limit": test_limit, "knn_k": knn_k,
                                "knn_temperature": knn_temperature, "tasks": eval_tasks},
                               model_name, metric, margin)

    @dsl.pipeline(name="evaluate-only", description="Benchmark given backbone weights on frozen features.")
    def evaluate_only(weights_uri: str, run_root: str = CLUSTER_RUN_ROOT, tracking_uri: str = CLUSTER_TRACKING_URI,
                      experiment: str = EXPERIMENT, use_cache: bool = True, data_uri: str = CLUSTER_DATA,
                      train_limit: int = 0, test_limit: int = 0, knn_k: int = 20,
                      knn_temperature: float = 0.07, eval_tasks: list = ["knn", "linear"]) -> None:  # noqa: B006
        with dsl.ExitHandler(closer(run_root, tracking_uri, experiment)):
            parent = open_parent(run_root, tracking_uri, experiment, "evaluate_only")
            ctx = context(run_root, tracking_uri, experiment, parent)
            weights = dsl.importer(artifact_uri=weights_uri, artifact_class=dsl.Model, reimport=False)
            c.evaluate(**ctx, use_cache=use_cache, backbone=weights.output, data_uri=data_uri,
                       train_limit=train_limit, test_limit=test_limit, knn_k=knn_k, knn_temperature=knn_temperature,
                       tasks=eval_tasks)

    @dsl.pipeline(name="retrain", description="Continue from the registry's champion; promote only if better.")
    def retrain(run_root: str = CLUSTER_RUN_ROOT, tracking_uri: str = CLUSTER_TRACKING_URI,
                experiment: str = EXPERIMENT, use_cache: bool = True, data_uri: str = CLUSTER_DATA,
                preset: str = "tiny", overrides: list = [], max_minutes: float = 3.0, seed: int = 1,  # noqa: B006
                train_limit: int = 0, test_limit: int = 0, knn_k: int = 20, knn_temperature: float = 0.07,
                eval_tasks: list = ["knn", "linear"], model_name: str = "dinoflow-tiny",  # noqa: B006
                metric: str = "knn_top1_k20", margin: float = 0.0) -> None:
        with dsl.ExitHandler(closer(run_root, tracking_uri, experiment)):
            parent = open_parent(run_root, tracking_uri, experiment, "retrain")
            ctx = context(run_root, tracking_uri, experiment, parent)
            start = uncached(c.champion(**ctx, model_name=model_name))
            trained = c.pretrain(**ctx, use_cache=use_cache, preset=preset, overrides=overrides,
                                 data_kind="fashion_mnist", data_uri=data_uri, max_minutes=max_minutes, seed=seed,
                                 init=start.outputs["backbone"])
            score_and_register(ctx, use_cache, trained.outputs["backbone"], data_uri,
                               {"train_limit": train_limit, "test_limit": test_limit, "knn_k": knn_k,
                                "knn_temperature": knn_temperature, "tasks": eval_tasks},
                               model_name, metric, margin)

    return {"full": full, "evaluate_only": evaluate_only, "retrain": retrain}
