"""The ``dinoflow`` command line.

Why: this is one of the two places (with the KFP components) that reads the outside world:
argv, environment variables (S3 endpoint and credentials, ``MLFLOW_TRACKING_URI``) and the
terminal. It builds configs, storage and trackers and hands them to library code.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from pydantic import BaseModel
from typer.core import TyperGroup

from dinoflow.config import (CONFIG_DIR, PRESET_KINDS, DemoConfig, DistillConfig, FinetuneConfig, PretrainConfig,
                             load_config, preset_names, preset_path)
from dinoflow.config_dump import to_yaml

if TYPE_CHECKING:
    from dinoflow.storage import Storage
    from serve.model import ServedModel
    from trainer.models.vit import DinoVisionTransformer


def _unreachable() -> tuple[type[BaseException], ...]:
    """The errors of an endpoint that cannot be reached or refuses for good: the storage's (S3, after
    its retries), MLflow's, and the HTTP clients' connection errors and refusals (Kubeflow's API, an
    artifact server's 403), each taken only when its module is loaded (one not loaded raised none,
    and importing mlflow takes seconds)."""
    from dinoflow.storage import StorageError

    found: list[type[BaseException]] = [StorageError]
    for module, names in (("mlflow.exceptions", ("MlflowException",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout", "HTTPError")),
                          ("urllib3.exceptions", ("MaxRetryError", "NewConnectionError", "TimeoutError"))):
        if module in sys.modules:
            found += [getattr(sys.modules[module], name) for name in names]
    return tuple(found)


class _OneLineErrors(TyperGroup):
    """The command group: an endpoint a command cannot reach (S3, MLflow, Kubeflow) is said in one
    line, its client's own message naming it, with exit status 1, not a traceback of retries."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _unreachable() as err:
            typer.echo(f"error: {' '.join(str(err).split())}", err=True)
            raise typer.Exit(1) from None


# The help prints a command docstring's first paragraph as one line and keeps the line breaks of
# the others: write those in lines of at most 76 characters.
app = typer.Typer(
    cls=_OneLineErrors,
    name="dinoflow",
    help="Train, distil, evaluate and ship DINOv2 vision backbones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
pipeline_app = typer.Typer(help="Kubeflow pipelines: compile, run locally, submit to a cluster.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")

SCHEMAS: dict[str, type[BaseModel]] = {"demo": DemoConfig, "pretrain": PretrainConfig, "distill": DistillConfig,
                                       "finetune": FinetuneConfig}

Overrides = Annotated[
    list[str] | None, typer.Argument(help="dotted overrides, e.g. out=runs/x data.knn_k=10")
]
WeightsOption = Annotated[str, typer.Option(help="backbone weights (path or URI: a .safetensors, a run folder, "
                                                 "Meta's .pth, a Hugging Face folder) or a registered model "
                                                 "(models:/<name>@<alias>, models:/<name>/<version>)")]
SourceOption = Annotated[str, typer.Option(help="layout of --weights: auto (from the path: *.safetensors; a folder "
                                                "with config.json: hf; a run folder: its backbone.safetensors; "
                                                "else Meta's .pth), official, training, safetensors or hf")]


@contextlib.contextmanager
def _bad_input() -> Iterator[None]:
    """Bad input a command meets (a missing file, weights that do not fit, an image that does not
    decode, a setting out of range) said in one line with exit status 2, not a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


# the suite's settings `dinoflow eval` sets through flags of its own, refused in --option
EVAL_FLAGS = {"data_uri": "--data-uri", "test_uri": "--test-uri", "train_limit": "--train-limit",
              "test_limit": "--test-limit", "image_size": "--image-size", "num_workers": "--num-workers",
              "seg_data": "--seg-data", "depth_data": "--depth-data", "retrieval_data": "--retrieval-data",
              "video_data": "--video-data", "video_frames": "--video-frames", "video_pool": "--video-pool",
              "multiscale": "--ms", "layers": "--ms", "precision": "--precision",
              "dense_cache_gib": "--dense-cache-gib",
              "dense_augment": "--dense-augment", "depth_head_kind": "--depth-head", "work_dir": "--work-dir",
              "seg_head.steps": "--seg-steps", "depth_head.steps": "--depth-steps",
              "seg_head.batch_size": "--head-batch-size", "depth_head.batch_size": "--head-batch-size"}
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _suite_options(items: list[str] | None, config: Any) -> dict[str, Any]:
    """``--option name=value`` pairs, each value read as its setting's type in ``config`` (a
    :class:`~evaluators.suite.SuiteConfig`); an unknown name is passed on as text, for
    :func:`~evaluators.suite.with_options` to refuse naming the allowed ones."""
    from evaluators.suite import settable_options

    kinds = settable_options(config)
    options: dict[str, Any] = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--option {item!r}: give name=value, e.g. met_whiten=true")
        kind = kinds.get(name, str)
        try:
            if kind is bool:
                if text.lower() not in TRUE + FALSE:
                    raise ValueError(text)
                options[name] = text.lower() in TRUE
            else:
                options[name] = kind(text)
        except ValueError:
            article = "an" if kind is int else "a"
            raise ValueError(f"--option {item!r}: {name} takes {article} {kind.__name__}") from None
    return options


# MLflow's HTTP settings for the commands that read the registry and stop (models, eval, serve...): a dead
# server said in about 10-20 s, not after MLflow's ~4 minutes of backoff (its defaults, kept for training runs
# that must outlast a rate limit)
QUICK_REGISTRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@contextlib.contextmanager
def _quick_registry() -> Iterator[None]:
    """:data:`QUICK_REGISTRY` in the environment (where MLflow reads them at each request) for the
    block, except a setting the user gave; put back as it was after."""
    added = {name: value for name, value in QUICK_REGISTRY.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _served(uri: str, image_size: int | None, device: str, storage: Storage) -> ServedModel:
    """:func:`serve.model.load_served_model` with MLflow's retries capped (:func:`_quick_registry`):
    a ``models:/`` URI on a store that does not answer fails in seconds, as the ``models`` commands do."""
    from serve.model import load_served_model

    with _quick_registry():
        return load_served_model(uri, image_size, device, storage)


def _backbone(weights: str, source: str, storage: Storage,
              arch_kwargs: dict[str, Any] | None = None) -> DinoVisionTransformer:
    """The backbone of a registered MLflow model (``models:/...``, ``runs:/...``, registry URI from
    the environment), or at ``weights`` in the layout ``source`` (auto: found from the path, said)."""
    from serve.model import is_mlflow_model
    from trainer.models.hub import load_backbone, locate_weights

    if is_mlflow_model(weights):
        return _served(weights, None, "cpu", storage).backbone  # type: ignore[return-value]
    if source == "auto":
        weights, source = locate_weights(weights, storage)
        typer.echo(f"weights: {weights} ({source}, from the path; --source to choose)", err=True)
    return load_backbone(weights, source, storage, arch_kwargs)  # type: ignore[arg-type]


CACHE_ENV = "DINOFLOW_CACHE_DIR"  # where registered versions are fetched to and kept (see _cache_root)


def _cache_root() -> Path:
    """The cache that registered versions are fetched into and kept in
    (:func:`~dinoflow.registry.cached_version`): ``$DINOFLOW_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dinoflow``, else ``~/.cache/dinoflow``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dinoflow"


def _registered(uri: str) -> str:
    """``uri`` itself, or for a registered model (``models:/<name>@<alias>``, ``models:/<name>/<version>``,
    ``models:/<name>``: its champion) a folder holding its backbone and the heads registered with it,
    fetched from the registry (``MLFLOW_TRACKING_URI``, else the demo's store) into the cache
    (:func:`_cache_root`). An alias is resolved at each start: after it moved, a rerun finds
    another version, and a fine-tuning refuses to resume with it; the version's URI resumes it."""
    if not uri.startswith("models:/"):
        return uri
    from components.register import BACKBONE_IN_RUN
    from dinoflow.registry import cached_version, pick_version, registry_client, registry_store

    store = registry_store()
    client = registry_client(store)
    found = pick_version(client, uri)
    cache = _cache_root()
    try:
        fetched = cached_version(client, store, found, BACKBONE_IN_RUN, cache)
    except OSError as err:  # e.g. a read-only home in a container; other OSErrors (the artifact server's) go on
        if not str(getattr(err, "filename", None) or "").startswith(str(cache)):
            raise
        raise ValueError(f"{uri}: version {found.version} of {found.name} could not be fetched into the cache "
                         f"{cache}: {err} (the cache is ${CACHE_ENV}, else $XDG_CACHE_HOME/dinoflow, else "
                         "~/.cache/dinoflow: set it to a folder that can be written)") from None
    pinned = f"models:/{found.name}/{found.version}"
    typer.echo(f"{uri}: version {found.version} of {found.name}, "
               f"{'downloaded into' if fetched.downloaded else 'in'} {fetched.folder}"
               + ("" if uri == pinned else f" (to resume after the alias moves: {pinned})"), err=True)
    return str(fetched.folder)


def _pinned(settings: dict[str, str]) -> list[str]:
    """``<setting>=models:/<name>/<version>`` for each of ``settings`` (setting: URI) that names a
    registered model by an alias or by its bare name, resolved now. Why: each rank of ``--nproc``
    re-runs the command; given the alias, each would resolve it and, were it moved meanwhile, the
    ranks would start from different weights. Passed to them as overrides, the version is one."""
    registered = {setting: uri for setting, uri in settings.items() if uri.startswith("models:/")}
    if not registered:
        return []
    from dinoflow.registry import pinned_uri, registry_client

    with _bad_input():
        client = registry_client()
        pins = {setting: pinned_uri(client, uri) for setting, uri in registered.items()}
    pinned = {setting: pin for setting, pin in pins.items() if pin != registered[setting]}
    for setting, pin in pinned.items():  # the ranks see only the version: said here, to resume after the alias moves
        typer.echo(f"{setting}: {registered[setting]} is {pin}", err=True)
    return [f"{setting}={pin}" for setting, pin in pinned.items()]


def _preset_kind(preset: str, kinds: tuple[str, ...] = ()) -> str | None:
    """The kind of a built-in preset, its folder under configs/ (``pretrain`` for configs/pretrain/tiny.yaml,
    ``demo`` for configs/demo.yaml, ``pipelines`` for a parameter set); None for a YAML file elsewhere.
    A name not found is said with the presets of ``kinds`` (:func:`~dinoflow.config.preset_path`)."""
    path = preset_path(preset, kinds).resolve()
    if path.parent == CONFIG_DIR:
        return "demo"
    return path.parent.name if path.parent.parent == CONFIG_DIR else None


def _check_kind(preset: str, kind: str) -> None:
    """Refuse (``ValueError``) a built-in preset of a kind schema ``kind`` does not read, naming its
    kind and the presets that fit: else the schema lists every key of it that it lacks."""
    kinds = PRESET_KINDS[SCHEMAS[kind]]
    found = _preset_kind(preset, kinds)
    if found == "pipelines":
        raise ValueError(f"{preset!r} is a pipeline parameter set (configs/pipelines/): give it to "
                         "`dinoflow pipeline run|submit|compile|params NAME --params`")
    if found is not None and found not in kinds:
        raise ValueError(f"{preset!r} is a {found} preset (configs/{found}/), not a {kind} one; "
                         f"{' and '.join(kinds)} presets: {', '.join(name for k in kinds for name in preset_names(k))}")


def _load(kind: str, preset: str, overrides: list[str] | None) -> BaseModel:
    """The config of schema ``kind`` (:data:`SCHEMAS`): ``preset`` (:func:`_check_kind`) with ``overrides``."""
    with _bad_input():
        _check_kind(preset, kind)
        return load_config(SCHEMAS[kind], preset, overrides or [])


def _check_device(device: str) -> None:
    """A run's device refused in one line before anything is created (no MLflow run, no folder)."""
    from trainer.devices import available_device

    with _bad_input():
        available_device(device)


@app.command()
def version() -> None:
    """Print the dinoflow version."""
    typer.echo(f"dinoflow {metadata.version('dinoflow')}")


@config_app.command("show")
def config_show(
    preset: Annotated[str, typer.Argument(help="preset name under configs/ or a YAML path")],
    overrides: Overrides = None,
    kind: Annotated[str | None, typer.Option(help=f"config schema: {', '.join(SCHEMAS)} \\[default: a built-in "
                                                  "preset's folder, configs/<kind>/; else demo]")] = None,
) -> None:
    """Print a resolved config (preset + overrides) as YAML, after validating it."""
    if kind is not None and kind not in SCHEMAS:
        typer.echo(f"error: unknown kind {kind!r}; allowed: {', '.join(SCHEMAS)}", err=True)
        raise typer.Exit(2)
    if kind is None:
        with _bad_input():
            found = _preset_kind(preset)
        kind = found if found in SCHEMAS else "demo"
    typer.echo(to_yaml(_load(kind, preset, overrides)), nl=False)


@app.command()
def demo(
    overrides: Overrides = None,
    config: Annotated[str, typer.Option(help="preset name or YAML path")] = "demo",
) -> None:
    """Run the main job: the full pipeline (ingest, pretrain, evaluate, register) on this machine."""
    from pipelines.demo import check_recipe, demo_params
    from pipelines.local import PipelineFailed, local_root, run_locally

    cfg = _load("demo", config, overrides)
    assert isinstance(cfg, DemoConfig)
    key = "pretrain_preset"
    try:
        _check_kind(cfg.pretrain_preset, "pretrain")  # (one not found: a ConfigError, a ValueError)
        key = "pretrain_overrides" if cfg.pretrain_overrides else key
        check_recipe(cfg)
    except ValueError as err:  # named by the setting that holds the problem
        typer.echo(f"error: {key}: {err}", err=True)
        raise typer.Exit(2) from None
    storage, tracking_uri = _run_root(cfg.out)
    root = local_root(cfg.out)
    kfp_root = os.path.join(root if "://" not in root else "runs", "kfp")
    typer.echo(
        f"dinoflow demo: the 'full' pipeline on kfp.local: Fashion-MNIST into {cfg.out} -> pretrain "
        f"{cfg.pretrain_preset!r} for {cfg.pretrain_minutes:g} min -> k-NN + linear probe -> MLflow registry "
        f"{cfg.model_name!r} with the champion gate.", err=True,
    )
    started = time.perf_counter()
    try:
        stages = run_locally(_pipeline("full", None), "full", cfg.out, kfp_root, tracking_uri, demo_params(cfg),
                             storage)
    except PipelineFailed as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    _print_summary("full", stages, time.perf_counter() - started, kfp_root, tracking_uri,
                   f"models:/{cfg.model_name}@champion")


def _print_summary(name: str, stages: list[Any], seconds: float, kfp_root: str, tracking_uri: str,
                   model: str | None = None) -> None:
    from pipelines.local import format_summary

    typer.echo(f"\npipeline {name!r} finished in {seconds:.0f} s\n{format_summary(stages)}\n")
    typer.echo(f"stage outputs: {os.path.abspath(kfp_root)}")
    typer.echo(f"MLflow store:  {tracking_uri}")
    if model:
        typer.echo(f"model:         {model}  (mlflow.pyfunc.load_model with MLFLOW_TRACKING_URI set to the store)")
        from dinoflow.registry import parse_registry_uri

        name = parse_registry_uri(model)[0]  # type: ignore[index]
        typer.echo(f"its versions:  dinoflow models list {name} --tracking-uri {tracking_uri}")
    typer.echo(f"browse it:     mlflow ui --backend-store-uri {tracking_uri}")


@app.command()
def pretrain(
    overrides: Overrides = None,
    config: Annotated[str, typer.Option(help="preset name (e.g. tiny, vits14) or YAML path")] = "tiny",
    nproc: Annotated[int, typer.Option(min=1, help="ranks on this machine: N > 1 re-runs this command under "
                                       "torchrun with N processes (distributed.strategy=fsdp2 unless the "
                                       "config names another distributed strategy)")] = 1,
) -> None:
    """Pretrain a backbone with DINO + iBOT + KoLeo; resumes when OUT holds a checkpoint."""
    from dinoflow.tracking import NullTracker
    from trainer.run import run_pretrain

    cfg = _load("pretrain", config, overrides)
    assert isinstance(cfg, PretrainConfig)
    _check_device(cfg.device)
    if nproc > 1:
        _rerun_on_ranks(nproc, ["pretrain", "--config", config, *(overrides or []),
                                *_pinned({"init_weights": cfg.init_weights})], cfg.distributed.strategy)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # torchrun's; rank 0 alone tracks and reports
    storage, tracking_uri = _run_root(cfg.out)
    with (_run_tracker(cfg, "pretrain", tracking_uri) if main_rank else contextlib.nullcontext(NullTracker())) \
            as tracker, _bad_input():
        cfg = cfg.model_copy(update={"init_weights": _registered(cfg.init_weights)})  # fetched, with its heads
        summary = run_pretrain(cfg, storage, tracker)  # bad input met as it starts: a missing data folder, ...
    if main_rank:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    from trainer.strategy import leave_rank

    leave_rank()  # a torchrun rank ends here, its run finished and written


@app.command()
def distill(
    overrides: Overrides = None,
    teacher: Annotated[str, typer.Option(help="the frozen teacher: a pretrain/distill run folder (its latest "
                                         "checkpoint, with its heads for distill.objective=heads), backbone "
                                         "weights: a .safetensors, Meta's released .pth, a Hugging Face folder "
                                         "(path or URI), or a registered model (models:/<name>@<alias>, "
                                         "models:/<name>/<version>: with the heads registered with it)")] = "",
    teacher_source: Annotated[str, typer.Option(help="auto (checkpoint for a folder holding checkpoints, else "
                                                "backbone), checkpoint, backbone (with distill.objective=heads, "
                                                "the heads.safetensors beside it, else frozen random "
                                                "heads) or training (a training dump: its teacher's backbone "
                                                "and heads)")] = "auto",
    student: Annotated[str, typer.Option(help="the student's recipe: a preset name (distill-tiny, distill-vits14: "
                                              "the paper's, or a pretrain preset such as vits14) or a YAML "
                                              "path")] = "distill-tiny",
) -> None:
    """Distil a frozen teacher into a smaller student (its EMA is released); resumes when OUT holds a checkpoint.

    The preset's distill.objective says what the student learns: features
    (default: the teacher backbone's CLS and patch tokens, through linear
    projectors) or heads (the DINO and patch losses against the teacher's
    heads, as in DINOv2).
    """
    from trainer.distill import run_distill

    given = [f"teacher.uri={teacher}"] if teacher else []
    cfg = _load("distill", student, [*given, f"teacher.source={teacher_source}", *(overrides or [])])
    assert isinstance(cfg, DistillConfig)
    _check_device(cfg.device)
    storage, tracking_uri = _run_root(cfg.out)
    with _run_tracker(cfg, "distill", tracking_uri) as tracker, _bad_input():
        teacher_uri = _registered(cfg.teacher.uri)  # registered models: fetched, with their heads
        cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"uri": teacher_uri}),
                                     "init_weights": _registered(cfg.init_weights)})
        summary = run_distill(cfg, storage, tracker)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


@app.command()
def finetune(
    overrides: Overrides = None,
    weights: Annotated[str, typer.Option(help="the backbone to fine-tune: a run or pipeline output folder, a "
                                         ".safetensors, Meta's released .pth, a Hugging Face folder (path or "
                                         "URI), or a registered model (models:/<name>@<alias>, "
                                         "models:/<name>/<version>)")] = "",
    config: Annotated[str, typer.Option(help="the fine-tuning recipe: a preset name or YAML path")] = "finetune-tiny",
    nproc: Annotated[int, typer.Option(min=1, help="ranks on this machine: N > 1 re-runs this command under "
                                       "torchrun with N processes, the backbone and classifier sharded over them "
                                       "(distributed.strategy=fsdp2 unless the config names deepspeed)")] = 1,
) -> None:
    """Fine-tune a whole backbone with a linear classifier on labelled images; resumes when OUT holds a checkpoint.

    The recipe is the one that fine-tunes self-supervised ViTs: layer-wise
    learning-rate decay, warm-up and cosine, stochastic depth, RandAugment,
    random erasing, mixup/cutmix and label smoothing (each set in the preset).
    The data (data.uri) is Fashion-MNIST's folder or class folders,
    train/<class>/ and val/<class>/. OUT gets the fine-tuned
    backbone.safetensors, classifier.safetensors, a confusion matrix and the
    training curves; the test split's top-1 is logged every epoch.
    """
    from dinoflow.tracking import NullTracker
    from trainer.finetune import finetune as run_finetune
    from trainer.strategy import leave_rank

    given = [*([f"weights={weights}"] if weights else []), *(overrides or [])]
    cfg = _load("finetune", config, given)
    assert isinstance(cfg, FinetuneConfig)
    _check_device(cfg.device)
    if nproc > 1:
        _rerun_on_ranks(nproc, ["finetune", "--config", config, *given, *_pinned({"weights": cfg.weights})],
                        cfg.distributed.strategy)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # torchrun's; rank 0 alone tracks and reports
    storage, tracking_uri = _run_root(cfg.out)
    with (_run_tracker(cfg, "finetune", tracking_uri) if main_rank else contextlib.nullcontext(NullTracker())) \
            as tracker, _bad_input():
        summary = run_finetune(cfg.model_copy(update={"weights": _registered(cfg.weights)}), storage, tracker)
    if main_rank:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    leave_rank()  # a torchrun rank ends here, its run finished and written


@app.command("eval")
def evaluate(
    benchmark: Annotated[str, typer.Argument(help="knn, linear, logreg, video, suite (the tasks in --tasks), or "
                                                  "classify (a fine-tuned model's classifier on the labelled test "
                                                  "images)")],
    weights: WeightsOption,
    source: SourceOption = "auto",
    tasks: Annotated[str, typer.Option(help="for suite: comma-separated knn, linear, logreg, seg, depth, "
                                       "retrieval, video, finegrained (--option finegrained_data=<root>,...: "
                                       "logreg on each set of class folders or VOC)")] = (
        "knn,linear,seg,depth,retrieval"),
    data_uri: Annotated[str, typer.Option(help="labelled images for knn, linear, logreg: Fashion-MNIST's folder, "
                                                "one of class folders, train/<class>/ and val/<class>/ (ImageNet's "
                                                "layout), or a set as released (iNaturalist, Food-101, ...; "
                                                "path or URI)")] = "/usr/share/datasets/fashion-mnist",
    test_uri: Annotated[str, typer.Option(help="knn, linear, logreg: a test set of class folders of its own instead of "
                                               "<data-uri>/val, e.g. ImageNet-R beside ImageNet's train/; with "
                                               "fewer classes than train it is scored over its own (ImageNet-A "
                                               "and -R's protocol)")] = "",
    train_limit: Annotated[int, typer.Option(help="labelled train images used (0: all; class folders: a seeded "
                                                  "random subset)", min=0)] = 0,
    test_limit: Annotated[int, typer.Option(min=0, help="test images used (0: all)")] = 0,
    image_size: Annotated[int, typer.Option(help="class folders: the centre crop's side, after the shorter side "
                                                 "is resized to it / 0.875 (256 for 224); real dense data sets: "
                                                 "their images' shorter side, the heads' training crops' and the "
                                                 "test windows' side; Oxford/Paris: the longer side", min=1)] = 224,
    num_workers: Annotated[int, typer.Option(min=0, help="class folders, real dense and retrieval data sets: "
                                                         "decoding processes")] = 0,
    seg_data: Annotated[str, typer.Option(help="seg on a real data set, ade20k:<root>, voc:<root> or "
                                               "cityscapes:<root> (its own "
                                               "layout; images at --image-size; default: synthetic scenes)")] = "",
    depth_data: Annotated[str, typer.Option(help="depth on NYU-Depth v2, nyu:<root> (nyu_{train,test}.txt as the "
                                                 "depth toolbox lists it, or train/*.npz, test/*.npz), or "
                                                 "KITTI's Eigen split, kitti:<root> (kitti_eigen_{train,test}.txt, "
                                                 "input/, gt_depth/); trained on one, tested on another: "
                                                 "nyu:<root>->sunrgbd:<root> (SUNRGBD_val_splits.txt); default: "
                                                 "synthetic scenes")] = "",
    retrieval_data: Annotated[str, typer.Option(help="retrieval on revisited Oxford or Paris, roxford5k:<root> "
                                                     "or rparis6k:<root> (gnd_<name>.pkl, jpg/), or AmsterTime, "
                                                     "amstertime:<root> (old/ and new/, pairs by stem), or the Met's "
                                                     "GAP, met:<root> (ground_truth/, images/); the longer side at "
                                                     "--image-size; default: synthetic sets")] = "",
    video_data: Annotated[str, typer.Option(help="video on UCF-101 (UCF-101/, ucfTrainTestlist/), Kinetics-400 "
                                                 "(CVDF's k400/) or SSv2 (20bn-something-something-v2/, labels/) as "
                                                 "released, or on class folders of videos, <root>/train/<class>/"
                                                 "<video> and val/ (a video a file or a folder of frames); "
                                                 "default: synthetic clips")] = "",
    video_frames: Annotated[int, typer.Option(min=1, help="video: frames of each video through the backbone")] = 8,
    video_pool: Annotated[str, typer.Option(help="video: the frames' CLS tokens averaged (mean: UCF-101, Kinetics) "
                                                 "or concatenated in time order (concat: SSv2); auto: concat on "
                                                 "Something-Something v2, else mean")] = "auto",
    seg_steps: Annotated[int, typer.Option(min=1, help="seg: the linear head's training steps (AdamW, lr 1e-3; "
                                                      "the scenes' default; a real data set may want more)")] = 2000,
    depth_steps: Annotated[int, typer.Option(min=1, help="depth: the linear head's training steps")] = 1000,
    depth_head: Annotated[str, typer.Option(help="depth: linear (lin.1; lin.4 with --ms), or dpt (DPT's decoder on "
                                                 "4 evenly spaced blocks)")] = "linear",
    head_batch_size: Annotated[int, typer.Option(min=1, help="seg and depth: images in a head's training "
                                                            "batch")] = 32,
    dense_cache_gib: Annotated[float, typer.Option(min=0, help="seg and depth: patch features of both splits are "
                                                            "held in memory up to this size, else the backbone "
                                                            "runs on every head batch (ADE20K's: 40 GB with "
                                                            "ViT-S/14)")] = 4.0,
    dense_augment: Annotated[bool, typer.Option("--dense-augment/--no-dense-augment", help="seg and depth on a "
                                                "real data set: the heads' training crops drawn anew at each step, "
                                                "flipped, their colours jittered, seg's resized 0.5-2x, depth's "
                                                "turned up to 2.5 degrees, as the original's (the backbone then "
                                                "runs on every head batch)")] = True,
    work_dir: Annotated[str, typer.Option(help="save the long work under this folder (path or URI): knn and "
                                               "linear's feature pass in parts (ImageNet's: an hour on a GPU), "
                                               "the seg and depth heads' training; the same command run again "
                                               "resumes it")] = "",
    ms: Annotated[bool, typer.Option("--ms", help="seg by the +ms protocol (the last 4 blocks' patch tokens, "
                                                  "all of a shallower model's, trained at resize ratios 1-3, over "
                                                  "scales 1, 1.32, 1.73, 2.28, 3 with flips) and depth by lin.4 "
                                                  "(4 evenly spaced blocks)")] = False,
    device: Annotated[str, typer.Option(help="where the backbone runs: cpu or cuda")] = "cpu",
    precision: Annotated[str, typer.Option(help="every feature pass in fp32, or the backbone under autocast in "
                                                "bf16 or fp16 (the original evaluates in half precision; 2-3x "
                                                "faster on a GPU); heads and probes train in fp32")] = "fp32",
    k: Annotated[int, typer.Option(min=1, help="neighbours for k-NN (with knn, k=20 is always reported too)")] = 20,
    option: Annotated[list[str] | None, typer.Option(help="any other setting of the suite, name=value, repeatable: "
                                                          "e.g. met_whiten=true, seg_head.lr=3e-4, seed=1 (the "
                                                          "names: a pipeline's eval_options)")] = None,
    out: Annotated[str | None, typer.Option(help="write the JSON report here (path or URI)")] = None,
    pictures: Annotated[str | None, typer.Option(help="folder (path or URI) for the pictures: attention maps; "
                                                      "with seg or depth, PCA features and predictions")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the run, recorded when "
                                                 "MLFLOW_TRACKING_URI is set")] = "dinoflow",
) -> None:
    """Benchmark frozen features of a backbone: k-NN, linear probe, logistic regression, video, or the whole suite.

    Classification on Fashion-MNIST or on your class folders (ImageNet's
    layout); segmentation and depth on synthetic scenes, or on ADE20K, VOC
    or Cityscapes and on NYU-Depth v2, KITTI or SUN RGB-D; retrieval on
    synthetic sets or on revisited Oxford and Paris, AmsterTime and the Met;
    video (a linear probe on frame features) on synthetic clips, on UCF-101,
    Kinetics-400 or SSv2 as released, or on class folders of videos.
    `classify` scores a fine-tuned model's classifier (a `dinoflow finetune`
    folder or a registered one) on the test images, e.g. ImageNet-R with
    --test-uri. With MLFLOW_TRACKING_URI set, the run is recorded there: its
    settings, metrics, report and pictures."""
    from components.stage import storage_from_env
    from dinoflow.tracking import MlflowTracker, NullTracker, standard_tags
    from evaluators.dense import HeadConfig
    from evaluators.suite import SuiteConfig, run_suite, with_options
    from trainer.devices import available_device

    storage = storage_from_env()
    options: dict[str, Any] = {}
    with _bad_input():
        if benchmark not in ("knn", "linear", "logreg", "video", "suite", "classify"):
            raise ValueError(f"unknown benchmark {benchmark!r}; allowed: knn, linear, logreg, video, suite, classify")
        chosen = tuple(t.strip() for t in tasks.split(",") if t.strip()) if benchmark == "suite" else (benchmark,)
        if benchmark == "classify" and option:
            raise ValueError("--option sets the suite's settings; classify scores a fine-tuned classifier alone")
        if benchmark == "classify":  # the model and the data checked before any run is recorded
            run = _classifying(weights, data_uri, test_uri, test_limit, image_size, num_workers, device, precision,
                               storage)
        else:
            backbone = _backbone(weights, source, storage).to(available_device(device))
            config = SuiteConfig(tasks=chosen, data_uri=data_uri, test_uri=test_uri, train_limit=train_limit,
                                 test_limit=test_limit,
                                 ks=tuple(sorted({k, 20})), image_size=image_size, num_workers=num_workers,
                                 seg_data=seg_data, depth_data=depth_data, retrieval_data=retrieval_data,
                                 video_data=video_data, video_frames=video_frames, video_pool=video_pool,
                                 multiscale=ms, precision=precision,
                                 layers=min(4, len(backbone.blocks)) if ms else 1, dense_cache_gib=dense_cache_gib,
                                 dense_augment=dense_augment,
                                 seg_head=HeadConfig(steps=seg_steps, batch_size=head_batch_size),
                                 depth_head=HeadConfig(steps=depth_steps, batch_size=head_batch_size),
                                 depth_head_kind=depth_head,
                                 work_dir=work_dir)
            options = _suite_options(option, config)
            config = with_options(config, options, EVAL_FLAGS)

            def run(pictures: Path) -> dict[str, Any]:
                return run_suite(backbone, config, storage, pictures=pictures)
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory() as scratch, (MlflowTracker.start(
        tracking_uri, experiment, run_name=f"eval-{benchmark}", tags=standard_tags("evaluate"),
    ) if tracking_uri else contextlib.nullcontext(NullTracker())) as tracker, _bad_input():
        tracker.log_params({"weights": weights, "benchmark": benchmark, "tasks": ",".join(chosen),
                            "data_uri": data_uri, "test_uri": test_uri, "train_limit": train_limit,
                            "test_limit": test_limit,
                            "image_size": image_size, "seg_data": seg_data, "depth_data": depth_data,
                            "retrieval_data": retrieval_data, "video_data": video_data,
                            "video_frames": video_frames, "video_pool": video_pool, "ms": ms,
                            "device": device, "precision": precision, "dense_cache_gib": dense_cache_gib,
                            "dense_augment": dense_augment,
                            "seg_steps": seg_steps, "depth_steps": depth_steps, "depth_head": depth_head,
                            "head_batch_size": head_batch_size,
                            "work_dir": work_dir, **{f"option.{name}": value for name, value in options.items()}})
        drawn = Path(scratch) / "pictures"
        drawn.mkdir()
        report = run(drawn)
        report.pop("features", None)
        text = json.dumps(report, indent=2)
        (Path(scratch) / "report.json").write_text(text)
        tracker.log_metrics(report["metrics"], step=0, force=True)
        for path in [Path(scratch) / "report.json", *sorted(drawn.iterdir())]:
            tracker.log_artifact(path)
        if pictures:
            storage.upload_dir(drawn, pictures)
    if out:
        storage.write_bytes(out, text.encode())
    if tracking_uri:
        typer.echo(f"MLflow run {tracker.run_id} in {tracking_uri}", err=True)
    typer.echo(text)


def _classifying(weights: str, data_uri: str, test_uri: str, test_limit: int, image_size: int, num_workers: int,
                 device: str, precision: str, storage: Storage) -> Callable[[Path], dict[str, Any]]:
    """``dinoflow eval classify``: the fine-tuned model at ``weights`` and the labelled images found
    and checked; returns what scores the model on the test images (its confusion matrix drawn
    into the folder it is given)."""
    from evaluators.classification import labelled_images
    from evaluators.suite import PRECISIONS
    import numpy as np

    from evaluators.visualize import save_confusion_matrix
    from trainer.finetune import classifier_report

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    served = _served(weights, image_size, device, storage)
    if served.classifier is None:
        raise ValueError(f"{weights} has no classifier: give a fine-tuned model (a `dinoflow finetune` folder, or "
                         "one the finetune pipeline registered); knn, linear and logreg score a backbone alone")
    images = labelled_images(data_uri, "auto", storage, 0, test_limit, image_size, 0, num_workers, test_uri)

    def run(pictures: Path) -> dict[str, Any]:
        report = classifier_report(served.classifier, served.classes, images, image_size,
                                   next(served.backbone.parameters()).device, PRECISIONS[precision])
        if "confusion" in report:  # up to MAX_CONFUSION_CLASSES classes
            save_confusion_matrix(np.asarray(report["confusion"]), served.classes, pictures / "confusion_classify.png",
                                  f"top-1 {100 * report['metrics']['classify_top1']:.1f} %")
        return {"benchmark": "classify", "weights": weights, "data_uri": data_uri, "test_uri": test_uri, **report}

    return run


@app.command()
def attention(
    images: Annotated[list[str], typer.Argument(help="images (JPEG, PNG, WebP, GIF, BMP): local paths or URIs")],
    weights: WeightsOption,
    out: Annotated[str, typer.Option(help="the PNG to write (path or URI): images, CLS attention, high-norm tokens")],
    source: SourceOption = "auto",
    size: Annotated[int, typer.Option(help="side images are resized and centre-cropped to (a multiple of the "
                                            "patch size)")] = 224,
    factor: Annotated[float, typer.Option(help="high-norm: a patch token's norm above this many times the "
                                                "median")] = 3.0,
    per_head: Annotated[bool, typer.Option(help="a row per attention head instead of the heads' mean")] = False,
    block: Annotated[int, typer.Option(help="the block whose attention is shown: 0 the first, -1 the last")] = -1,
    mass: Annotated[float, typer.Option(help="the attention mask (outlined in cyan) keeps the largest weights "
                                              "holding this share of the map")] = 0.6,
) -> None:
    """Where a backbone looks: CLS attention maps and high-norm tokens, drawn in one PNG.

    A block's (the last's) CLS attention over the patches, its mask (the
    largest weights holding --mass of it), and the patch tokens whose norm at
    that block's output stands out, for up to 8 images; prints the figures as
    JSON (per image: the high-norm tokens' (row, column) positions, the mask's
    share of the patches)."""
    import torch

    from components.stage import storage_from_env
    from evaluators.attention import attention_summary
    from evaluators.features import to_model_input
    from evaluators.visualize import save_attention_maps
    from trainer.data.datasets import DECODE_ERRORS, read_image

    storage = storage_from_env()
    with _bad_input():
        if not out.endswith(".png"):
            raise ValueError(f"--out {out!r} must name a .png file")
        backbone = _backbone(weights, source, storage).eval()
        if size <= 0 or size % backbone.patch_size:
            raise ValueError(f"--size {size} is not a positive multiple of the patch size {backbone.patch_size}")
        decoded = []
        for uri in images:
            try:
                decoded.append(read_image(storage.read_bytes(uri), size))
            except DECODE_ERRORS as err:
                raise ValueError(f"{uri} is not a readable image ({type(err).__name__}: {err})") from None
        pixels = torch.stack(decoded)  # (N, 3, size, size) uint8
        summary = attention_summary(backbone, to_model_input(pixels, patch_size=backbone.patch_size), factor,
                                    block, mass=mass)
    with tempfile.TemporaryDirectory() as scratch:
        picture = save_attention_maps(pixels.numpy(), summary["maps"].numpy(),
                                      summary["high_norm"].numpy(), Path(scratch) / "attention.png",
                                      per_head=per_head, masks=summary["masks"].numpy())
        storage.write_bytes(out, picture.read_bytes())
    per_image = [{"image": uri, "high_norm_tokens": torch.nonzero(high).tolist(),  # [[row, column], ...]
                  "attention_mask_share": mask.float().mean().item()}
                 for uri, high, mask in zip(images, summary["high_norm"], summary["masks"])]
    typer.echo(json.dumps({**summary["metrics"], "images": per_image, "out": out}, indent=2))


@app.command()
def export(
    weights: WeightsOption,
    export_format: Annotated[str, typer.Option("--format", help="hf, onnx or safetensors")],
    out: Annotated[str, typer.Option(help="output folder: local path or URI")],
    source: SourceOption = "auto",
    model: Annotated[
        str | None, typer.Option(help="released architecture, e.g. dinov2_vits14_reg (else inferred)")
    ] = None,
    height: Annotated[int, typer.Option(min=1, help="ONNX input height (multiple of the patch size)")] = 224,
    width: Annotated[int, typer.Option(min=1, help="ONNX input width (multiple of the patch size)")] = 224,
) -> None:
    """Export a backbone to a Hugging Face folder, an ONNX file or safetensors."""
    from components.stage import storage_from_env
    from dinoflow.run_files import BACKBONE_FILE
    from trainer.models.hub import pretrained_arch_kwargs, save_backbone

    formats = ("hf", "onnx", "safetensors")
    storage = storage_from_env()
    with _bad_input(), tempfile.TemporaryDirectory() as scratch:
        if export_format not in formats:
            raise ValueError(f"unknown format {export_format!r}; allowed: {', '.join(formats)}")
        if storage.list(out):
            raise ValueError(f"{out} is not empty; choose a new output folder")
        backbone = _backbone(weights, source, storage, pretrained_arch_kwargs(model) if model else None)
        staged = Path(scratch) / "export"
        if export_format == "hf":
            from trainer.models.hf import export_hf

            export_hf(backbone, staged)
        elif export_format == "onnx":
            from trainer.models.onnx_export import export_onnx

            export_onnx(backbone, staged / "model.onnx", height, width)
        else:
            save_backbone(backbone, str(staged / BACKBONE_FILE))
        written = storage.upload_dir(staged, out)
    typer.echo("\n".join(written))


@app.command()
def curate(
    pool: Annotated[str, typer.Option(help="pool of images: folder or folder of *.tar shards (path or URI)")],
    out: Annotated[str, typer.Option(help="output folder: path or URI")],
    weights: Annotated[str | None, typer.Option(help="backbone weights, as for eval; none: downsampled "
                                                     "pixels, fit for near-copy dedup only")] = None,
    source: SourceOption = "auto",
    eval_sets: Annotated[list[str] | None, typer.Option("--eval", help="evaluation set to decontaminate "
                                                                       "against (repeatable)")] = None,
    seed_sets: Annotated[list[str] | None, typer.Option("--seeds", help="seed set to retrieve around "
                                                                        "(repeatable; none: keep the whole "
                                                                        "deduplicated pool)")] = None,
    retrieve: Annotated[str, typer.Option(help="with --seeds: sample (the --per-seed nearest pool images of "
                                               "each seed) or cluster (up to --per-seed images of each "
                                               "seed's k-means cluster)")] = "sample",
    per_seed: Annotated[int, typer.Option(help="pool images retrieved per seed image")] = 4,
    retrieve_clusters: Annotated[int, typer.Option(help="--retrieve cluster: k-means clusters of the pool "
                                                        "(0: about sqrt of the kept pool)")] = 0,
    dedup_threshold: Annotated[float, typer.Option(help="cosine similarity of near-copies in the pool (0.6 is "
                                                   "SSCD's; the pixel embedder's best is 0.9)")] = 0.9,
    decontaminate_threshold: Annotated[float, typer.Option(help="cosine similarity to eval images")] = 0.45,
    balance_target: Annotated[int, typer.Option(help="images to keep by balanced sampling (0: off)")] = 0,
    balance_clusters: Annotated[str, typer.Option(help="clusters per level, bottom to top, e.g. 1000,100")] = "",
    load_size: Annotated[int, typer.Option(help="decoded image side")] = 224,
    device: Annotated[str, typer.Option(help="where the backbone embeds: cpu or cuda")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 64,
    num_workers: Annotated[int, typer.Option(help="image decoding processes")] = 0,
    track: Annotated[bool, typer.Option(help="record the run in MLflow (MLFLOW_TRACKING_URI, else sqlite "
                                             "under a local --out)")] = True,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "dinoflow",
) -> None:
    """Curate an image pool into shards: embed, deduplicate, decontaminate, retrieve, balance.

    Retrieval is around the seed sets given (--seeds); writes the shards, a
    manifest and a report."""
    from components.curate import balance_levels
    from components.stage import storage_from_env
    from curation.embed import backbone_embedder, pixel_embedder
    from curation.pipeline import CurationConfig, run_curation
    from dinoflow.tracking import (MlflowTracker, NullTracker, default_artifact_location, default_tracking_uri,
                                   standard_tags)
    from trainer.devices import available_device

    _check_device(device)
    storage = storage_from_env()
    with _bad_input():
        try:
            clusters = [int(v) for v in balance_clusters.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--balance-clusters {balance_clusters!r}: give whole numbers, comma-separated, e.g. "
                             "1000,100") from None
        levels = balance_levels(clusters)
        config = CurationConfig(dedup_threshold=dedup_threshold, decontaminate_threshold=decontaminate_threshold,
                                retrieve_mode=retrieve, retrieve_per_seed=per_seed,
                                retrieve_clusters=retrieve_clusters, balance_target=balance_target,
                                balance_levels=levels, load_size=load_size, batch_size=batch_size,
                                num_workers=num_workers)
        tracking_uri = (os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out)) if track else None
        if weights is None:
            embedder = pixel_embedder(6)
            typer.echo("embedder: downsampled pixels (6x6, standardised); pass --weights for a backbone", err=True)
        else:
            embedder = backbone_embedder(_backbone(weights, source, storage).to(available_device(device)))
    with (MlflowTracker.start(
        tracking_uri, experiment, run_name="curate", tags=standard_tags("curate"),
        artifact_location=default_artifact_location(tracking_uri, out),
    ) if tracking_uri else contextlib.nullcontext(NullTracker())) as tracker, _bad_input():
        tracker.log_params({"pool": pool, "out": out, "embedder": weights or "pixels6", "device": device})
        report = run_curation(pool, out, storage, embedder, config, tuple(eval_sets or ()), tuple(seed_sets or ()),
                              tracker)
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    if tracking_uri:
        typer.echo(f"MLflow run {tracker.run_id} in {tracking_uri}", err=True)


# Help texts are Rich markup: a literal "[" is written "\\[", else "[word ...]" is taken for a tag and dropped.
PipelineParams = Annotated[
    list[str] | None,
    typer.Argument(help="pipeline parameters as key=value (values parsed as YAML, e.g. max_minutes=2 "
                        "overrides=\\[optim.batch_size=64])"),
]
ParamsFileOption = Annotated[str | None, typer.Option("--params", help="a file of the pipeline's parameters, a path "
                                                      "or a name of configs/pipelines/ (`pipeline: <name>`, "
                                                      "`parameters: {key: value}`); key=value pairs override it")]
ImageOption = Annotated[str | None, typer.Option(envvar="DINOFLOW_IMAGE", help="one base image for every component, "
                                                      "with CUDA PyTorch unless --gpus 0 (default: the CPU and GPU "
                                                      "images of --registry and --tag)")]
RegistryOption = Annotated[str | None, typer.Option(envvar="DINOFLOW_REGISTRY", help="registry of the dinoflow-cpu "
                                                    "and dinoflow-gpu images (GPU: pretrain, distill, finetune, "
                                                    "evaluate) \\[default: ghcr.io/dinoflow]")]
TagOption = Annotated[str | None, typer.Option(envvar="DINOFLOW_TAG", help="tag of those images "
                                               "\\[default: this release's version]")]
SecretOption = Annotated[str | None, typer.Option(help="Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                                  "in the pipelines' namespace \\[default: dinoflow-s3]")]
GpusOption = Annotated[int | None, typer.Option(envvar="DINOFLOW_GPUS", min=0, help="GPUs (nvidia.com/gpu) of each "
                                                "pretrain, distill, finetune and evaluate task, which tolerate the "
                                                "GPU nodes' taint and run on cuda; 0: a CPU-only cluster (no GPU "
                                                "request, CPU image, runs on cpu) \\[default: 1]")]


def _pipeline(name: str, image: str | None = None, registry: str | None = None, tag: str | None = None,
              s3_secret: str | None = None, gpus: int = 0) -> Any:
    """The pipeline ``name`` for these images, Secret and GPUs (0, the default: what kfp.local runs)."""
    from components.definitions import REGISTRY, TAG, Images
    from pipelines.definitions import S3_SECRET, build_pipelines

    with _bad_input():
        images = image or Images.from_registry(registry or REGISTRY, tag or TAG)
        pipelines = build_pipelines(images, s3_secret=s3_secret or S3_SECRET, gpus=gpus)
    key = name.replace("-", "_")
    if key not in pipelines:
        typer.echo(f"error: unknown pipeline {name!r}; allowed: {', '.join(pipelines)}", err=True)
        raise typer.Exit(2)
    return pipelines[key]


PARAMETER_TYPES = {"String": str, "Integer": int, "Float": float, "Boolean": bool, "List": list, "Dict": dict}
PARAMETER_FILES = CONFIG_DIR / "pipelines"  # named parameter sets: configs/pipelines/<name>.yaml


def _typed_param(inputs: dict[str, Any], key: str, value: Any) -> tuple[Any, str]:
    """``value`` as the pipeline's input ``key`` takes it (an integer is a valid Float), and the
    problem with it ("" when none)."""
    kind = inputs[key].type
    if kind == "Float" and type(value) is int:
        value = float(value)
    expected = PARAMETER_TYPES.get(kind)
    if expected and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        return value, f"{key} takes a {kind}, got {type(value).__name__} {value!r}"
    return value, ""


def _param_file(pipeline: Any, given: str) -> dict[str, Any]:
    """The parameters a file holds (``pipeline: <name>`` and ``parameters: {key: value}``; a path,
    or a name of :data:`PARAMETER_FILES`), each checked as a ``key=value`` item is: a named
    parameter set kept with the code, e.g. the weekly retraining's or a cluster's benchmark data
    sets. Anything wrong exits 2 in one line naming the file."""
    import yaml

    def refuse(problem: str) -> None:
        typer.echo(f"error: bad parameter file {given!r}; {problem}", err=True)
        raise typer.Exit(2)

    def is_file(path: Path) -> bool:
        try:
            return path.is_file()
        except OSError:  # a name too long for the file system, say
            return False

    path = Path(given)
    if not is_file(path):
        path = PARAMETER_FILES / f"{given.removesuffix('.yaml')}.yaml"
    if not is_file(path):
        named = ", ".join(sorted(p.stem for p in PARAMETER_FILES.glob("*.yaml")))
        refuse(f"no such file, nor a name of {PARAMETER_FILES.relative_to(CONFIG_DIR.parent)}/: {named}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as err:  # (ValueError: a date 0000-00-00)
        refuse(f"not valid YAML ({' '.join(str(err).split())})")
    if not isinstance(data, dict) or set(data) != {"pipeline", "parameters"} or not isinstance(
            data["parameters"] or {}, dict):
        refuse("give a mapping of `pipeline: <name>` and `parameters: {key: value}`")
    name = pipeline.name.replace("-", "_")
    if str(data["pipeline"]).replace("-", "_") != name:
        refuse(f"it holds parameters of the {data['pipeline']!r} pipeline, not of {name!r}")
    inputs = pipeline.component_spec.inputs or {}
    params: dict[str, Any] = {}
    for key, value in (data["parameters"] or {}).items():
        if key not in inputs:
            refuse(f"unknown parameter {key!r}; allowed: {', '.join(inputs)}")
        params[key], problem = _typed_param(inputs, key, value)
        if problem:
            refuse(problem)
    return params


def _pipeline_params(pipeline: Any, items: list[str] | None, params_file: str | None = None) -> dict[str, Any]:
    """``key=value`` pairs checked against the pipeline's parameters before anything runs, over
    those of ``params_file`` (:func:`_param_file`) when given: a String input takes the text as it
    is, the others read it as YAML and must get their declared type (an integer is a valid Float:
    ``max_minutes=2``); anything else exits 2 in one line."""
    import yaml

    inputs = pipeline.component_spec.inputs or {}
    params: dict[str, Any] = _param_file(pipeline, params_file) if params_file else {}
    for item in items or []:
        key, sep, text = item.partition("=")
        problem, value = "", None
        if not sep or key not in inputs:
            problem = f"give key=value with key one of: {', '.join(inputs)}"
        else:
            try:
                value = text if inputs[key].type == "String" else yaml.safe_load(text) if text else ""
            except (yaml.YAMLError, ValueError, RecursionError) as err:
                problem = f"not valid YAML ({' '.join(str(err).split())})"
            else:
                value, problem = _typed_param(inputs, key, value)
        if problem:
            typer.echo(f"error: bad pipeline parameter {item!r}; {problem}", err=True)
            raise typer.Exit(2)
        params[key] = value
    _check_gate_metric(inputs, params)
    return params


def _check_gate_metric(inputs: dict[str, Any], params: dict[str, Any]) -> None:
    """Exit 2 in one line when the gate's ``metric`` is reported by a task ``eval_tasks`` leaves out
    (both as given, else the pipeline's defaults): its register stage would fail after the training."""
    from evaluators.suite import DEFAULT_TASKS, metric_task

    if "metric" not in inputs or "eval_tasks" not in inputs:
        return
    metric = params.get("metric", inputs["metric"].default)
    tasks = params.get("eval_tasks", inputs["eval_tasks"].default) or list(DEFAULT_TASKS)  # [] runs the default
    task = metric_task(str(metric))
    if task is not None and task not in tasks:
        typer.echo(f"error: the gate's metric {metric!r} is reported by the {task} task, which eval_tasks {tasks} "
                   f"leaves out: add {task} to eval_tasks or gate on a metric of theirs", err=True)
        raise typer.Exit(2)


@pipeline_app.command("compile")
def pipeline_compile(
    name: Annotated[str, typer.Argument(help="full, evaluate_only, retrain, distill, finetune or promote")],
    out: Annotated[str, typer.Option(help="YAML file to write")],
    image: ImageOption = None,
    registry: RegistryOption = None,
    tag: TagOption = None,
    s3_secret: SecretOption = None,
    gpus: GpusOption = None,
    params: PipelineParams = None,
    params_file: ParamsFileOption = None,
) -> None:
    """Compile a pipeline to KFP IR YAML (upload it in the Kubeflow UI, or submit it).

    With --params or key=value items, those values are the compiled
    pipeline's defaults: the Kubeflow UI's run form opens filled with them."""
    from kfp import compiler

    from pipelines.definitions import GPUS

    pipeline = _pipeline(name, image, registry, tag, s3_secret, GPUS if gpus is None else gpus)
    defaults = _pipeline_params(pipeline, params, params_file)
    with _bad_input():  # (a folder of --out that is not there)
        compiler.Compiler().compile(pipeline, out, pipeline_parameters=defaults or None)
    typer.echo(out)


@pipeline_app.command("params")
def pipeline_params(
    name: Annotated[str, typer.Argument(help="full, evaluate_only, retrain, distill, finetune or promote")],
    params: PipelineParams = None,
    params_file: ParamsFileOption = None,
) -> None:
    """Print a pipeline's parameters as a parameter file (--params), its defaults with yours over them."""
    import yaml

    pipeline = _pipeline(name, None)
    given = _pipeline_params(pipeline, params, params_file)
    values = {key: given.get(key, spec.default) for key, spec in (pipeline.component_spec.inputs or {}).items()}
    typer.echo(yaml.safe_dump({"pipeline": name.replace("-", "_"), "parameters": values}, sort_keys=False), nl=False)


@pipeline_app.command("run")
def pipeline_run(
    name: Annotated[str, typer.Argument(help="full, evaluate_only, retrain, distill, finetune or promote")],
    params: PipelineParams = None,
    params_file: ParamsFileOption = None,
    run_root: Annotated[str | None, typer.Option(help="folder or s3:// URI for stage state (and the sqlite MLflow "
                                                      "store when MLFLOW_TRACKING_URI is unset), or a run_root "
                                                      "parameter's; else runs/pipeline")] = None,
    kfp_root: Annotated[str, typer.Option(help="local folder for KFP's task outputs")] = "runs/pipeline/kfp",
) -> None:
    """Run a pipeline on this machine (kfp.local), then print a summary of its stages.

    The run_root and tracking_uri parameters at their defaults (the
    cluster's, as `pipeline params` writes them) are left out; another
    value stands for --run-root or MLFLOW_TRACKING_URI."""
    from pipelines.local import PipelineFailed, local_settings, run_locally

    pipeline = _pipeline(name, None)
    values = _pipeline_params(pipeline, params, params_file)
    defaults = {key: spec.default for key, spec in (pipeline.component_spec.inputs or {}).items()}
    settings = {"run_root": run_root, "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")}
    with _bad_input():
        root, store, values = local_settings(values, defaults, settings)
    root = root or "runs/pipeline"
    storage, tracking_uri = _run_root(root, store)
    started = time.perf_counter()
    try:
        stages = run_locally(pipeline, name, root, kfp_root, tracking_uri, values, storage)
    except PipelineFailed as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    _print_summary(name, stages, time.perf_counter() - started, kfp_root, tracking_uri)


@pipeline_app.command("submit")
def pipeline_submit(
    name: Annotated[str, typer.Argument(help="full, evaluate_only, retrain, distill, finetune or promote")],
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")],
    params: PipelineParams = None,
    params_file: ParamsFileOption = None,
    experiment: Annotated[str, typer.Option(help="KFP experiment")] = "dinoflow",
    image: ImageOption = None,
    registry: RegistryOption = None,
    tag: TagOption = None,
    s3_secret: SecretOption = None,
    gpus: GpusOption = None,
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace")] = None,
) -> None:
    """Submit a pipeline run to a Kubeflow cluster (token from KF_PIPELINES_TOKEN if set)."""
    from pipelines.definitions import GPUS
    from pipelines.submit import submit

    pipeline = _pipeline(name, image, registry, tag, s3_secret, GPUS if gpus is None else gpus)
    with _bad_input():
        run_id = submit(pipeline, host, _pipeline_params(pipeline, params, params_file), experiment, namespace,
                        token=os.environ.get("KF_PIPELINES_TOKEN"))
    typer.echo(f"submitted {name!r}: run {run_id} on {host}")


def _rerun_on_ranks(nproc: int, args: list[str], strategy: str) -> None:
    """Run ``dinoflow <args>`` again under torchrun with ``nproc`` ranks on this machine (with
    ``distributed.strategy=fsdp2`` unless the config names another distributed ``strategy``) and
    exit with its status."""
    import subprocess

    extra = ["distributed.strategy=fsdp2"] if strategy == "single" else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "pipelines.cli", *args, *extra]
    typer.echo(f"dinoflow {args[0]}: {nproc} ranks: {' '.join(command)}", err=True)
    raise typer.Exit(subprocess.call(command))


def _run_tracker(cfg: Any, stage: str, tracking_uri: str) -> contextlib.AbstractContextManager[Any]:
    """The MLflow run of a training command (``cfg``: a pretrain, distill or finetune config): named
    ``cfg.name``, tagged for ``stage``, its artifacts beside the run root, step metrics every
    ``cfg.tracking.metric_every`` steps."""
    from dinoflow.tracking import MlflowTracker, default_artifact_location, standard_tags

    return MlflowTracker.start(tracking_uri, cfg.tracking.experiment, run_name=cfg.name, tags=standard_tags(stage),
                               artifact_location=default_artifact_location(tracking_uri, cfg.out),
                               metric_every=cfg.tracking.metric_every)


def _run_root(out: str, tracking_uri: str | None = None) -> tuple[Any, str]:
    """Storage from the environment with the run root's bucket made, and the tracking URI
    (``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else sqlite under the run root)."""
    from components.stage import storage_from_env
    from dinoflow.tracking import default_tracking_uri

    storage = storage_from_env()
    storage.make_bucket(out)
    return storage, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out)


index_app = typer.Typer(help="Nearest-neighbour indexes for `dinoflow serve`.", no_args_is_help=True)
app.add_typer(index_app, name="index")
ModelOption = Annotated[str, typer.Option(help="models:/<name>@champion, runs:/..., an MLflow model folder "
                                               "or backbone weights (a .safetensors, a run folder, Meta's .pth, "
                                               "a Hugging Face folder; path or URI)")]
ImageSizeOption = Annotated[int, typer.Option(min=0, help="image side (multiple of the patch size); 0: the model's")]


@index_app.command("build")
def index_build(
    model: ModelOption,
    images: Annotated[str, typer.Option(help="folder of images, or of *.tar shards (path or URI)")],
    out: Annotated[str, typer.Option(help="index folder to write (path or URI)")],
    kind: Annotated[str, typer.Option(help="folder or shards: how to read --images")] = "folder",
    image_size: ImageSizeOption = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 64,
    device: Annotated[str, typer.Option(help="where the model embeds: cpu or cuda")] = "cpu",
    num_workers: Annotated[int, typer.Option(min=0, help="image decoding processes")] = 0,
) -> None:
    """Embed a folder (or shards) and write a faiss index that `dinoflow serve --index` loads."""
    from components.stage import storage_from_env
    from serve.index import build_index

    if kind not in ("folder", "shards"):
        typer.echo(f"error: unknown kind {kind!r}; allowed: folder, shards", err=True)
        raise typer.Exit(2)
    _check_device(device)
    storage = storage_from_env()
    with _bad_input():
        served = _served(model, image_size or None, device, storage)
        meta = build_index(served, images, out, kind, storage, batch_size, num_workers)  # type: ignore[arg-type]
    typer.echo(json.dumps({k: v for k, v in meta.items() if k != "keys"} | {"out": out}, indent=2))


shards_app = typer.Typer(help="webdataset tar shards: the indexes that let training start without reading them.",
                         no_args_is_help=True)
app.add_typer(shards_app, name="shards")


@shards_app.command("index")
def shards_index(
    shards: Annotated[str, typer.Argument(help="a folder of *.tar shards (recursively), or one shard (path or URI)")],
    image_extensions: Annotated[str, typer.Option(help="comma-separated image members' extensions, as "
                                                       "training reads them")] = "jpg,jpeg,png,webp",
) -> None:
    """Write <shard>.tar.index.json beside each shard: a run then starts from the indexes, not a read of every shard.

    Each shard is read once, checked (members, labels) as training would,
    and its samples' byte ranges and labels written beside it. Curation
    writes these for its own shards; this indexes others (e.g. a webdataset
    of ImageNet on S3). An index whose shard changed since is refused by
    training: run this again."""
    from components.stage import storage_from_env
    from dinoflow.progress import progress
    from trainer.data.shards import list_shards, write_shard_index

    storage = storage_from_env()
    extensions = tuple(ext.strip() for ext in image_extensions.split(",") if ext.strip())
    with _bad_input():
        found = [shards] if shards.lower().endswith(".tar") else list_shards(storage, shards)[0]
        for uri in progress(found, desc="index shards", unit="shard"):
            write_shard_index(storage, uri, image_extensions=extensions)
    typer.echo(json.dumps({"shards": len(found), "indexes": [f"{uri}.index.json" for uri in found[:3]]}, indent=2))


models_app = typer.Typer(help="The MLflow model registry: versions with their scores; an alias moved by hand.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
StoreOption = Annotated[str, typer.Option(help="the MLflow store: MLFLOW_TRACKING_URI when empty, else the "
                                               "demo's (sqlite under runs/demo)")]



@models_app.command("list")
def models_list(
    name: Annotated[str | None, typer.Argument(help="a registered model; every one when left out")] = None,
    metrics: Annotated[str, typer.Option(help="comma-separated metrics to show (the versions' metric.* tags)")] = (
        "knn_top1_k20,linear_top1"),
    as_json: Annotated[bool, typer.Option("--json", help="every field of every version as JSON")] = False,
    tracking_uri: StoreOption = "",
) -> None:
    """Registered versions, newest first: aliases, scores, heads, when each alias moved to it and why.

    "heads": the version was registered with its DINO/iBOT heads (a
    retrain or a distillation from it starts from them)."""
    from dinoflow.registry import model_versions, registry_client

    with _quick_registry(), _bad_input():
        rows = model_versions(registry_client(tracking_uri), name)
    if as_json:
        typer.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    shown = [m for m in metrics.split(",") if m]
    header = ["model", "version", "aliases", *shown, "heads", "registered (UTC)", "alias moves"]
    table = [[row.name, row.version, ",".join(row.aliases) or "-",
              *(f"{row.metrics[m]:.4f}" if m in row.metrics else "-" for m in shown), "yes" if row.heads else "-",
              row.registered,
              "; ".join(f"{alias}: {move}" for alias, move in row.alias_moves.items()) or "-"] for row in rows]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header) - 1)]
    for line in [header, *table]:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1])
    if not rows:
        typer.echo("(no registered versions)")


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="a registered model")],
    version: Annotated[str, typer.Argument(help="the version the alias should point at")],
    alias: Annotated[str, typer.Option(help="the alias to move")] = "champion",
    reason: Annotated[str, typer.Option(help="why, written on the version beside the time")] = "",
    tracking_uri: StoreOption = "",
) -> None:
    """Point an alias at a version by hand, past the gate: a rollback, or a promotion.

    Whatever follows the alias (`dinoflow serve --model models:/NAME@champion
    --reload-every-s 30`, the retrain pipeline's starting point) takes the
    version from then on. The move is written on the version (`alias.<alias>`:
    when, by hand, the reason), as the gate writes its own.
    """
    from dinoflow.registry import move_alias, registry_client

    with _quick_registry(), _bad_input():
        before = move_alias(registry_client(tracking_uri), name, version, alias, reason)
    typer.echo(f"models:/{name}@{alias}: version {before or '(none)'} -> {version}")


@app.command()
def serve(
    model: ModelOption,
    index: Annotated[str | None, typer.Option(help="index folder from `dinoflow index build`")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8000,
    image_size: ImageSizeOption = 0,
    device: Annotated[str, typer.Option(help="torch device of the model")] = "cpu",
    max_batch_size: Annotated[int, typer.Option(help="images per forward pass; 1 turns dynamic batching off")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="longest wait for more requests to fill a batch")] = 5.0,
    max_images: Annotated[int, typer.Option(help="most images in one request")] = 32,
    max_body_mb: Annotated[float, typer.Option(help="largest request body in MiB")] = 16.0,
    max_queue: Annotated[int, typer.Option(help="most requests waiting for the model; more get 503")] = 64,
    request_timeout_s: Annotated[float, typer.Option(
        help="longest wait of a request for its features, queue included; then 503")] = 30.0,
    reload_every_s: Annotated[float, typer.Option(
        help="poll the registry alias of a models:/<name>@<alias> model this often and serve the version it "
             "moves to (0: off; not with --index)")] = 0.0,
) -> None:
    """HTTP service: /v1/embed, neighbours, classify, pca, attention, pca-video; /healthz, /metrics; a page at /.

    /v1/classify ranks a fine-tuned model's classes (a `dinoflow finetune`
    folder, or a model the finetune pipeline registered).
    """
    import uvicorn

    from components.stage import storage_from_env
    from serve.app import ServeSettings, create_app
    from serve.index import load_index
    from serve.model import load_served_model

    _check_device(device)
    storage = storage_from_env()
    with _bad_input():
        settings = ServeSettings(max_body_bytes=int(max_body_mb * 1024 * 1024), max_images=max_images,
                                 max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                 request_timeout_s=request_timeout_s, reload_every_s=reload_every_s)
        served = _served(model, image_size or None, device, storage)
        loaded = load_index(index, served, storage) if index else None
        application = create_app(served, loaded, settings,
                                 load=lambda uri: load_served_model(uri, image_size or None, device, storage))
    version = f" version {served.version}" if served.version else ""
    typer.echo(f"serving {model}{version} on http://{host}:{port} (index: {index or 'none'})", err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning")


def main() -> None:
    """Entry point for ``python -m pipelines.cli``."""
    app(prog_name="dinoflow")


if __name__ == "__main__":
    sys.exit(main())
