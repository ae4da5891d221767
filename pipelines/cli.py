"""The ``dinoflow`` command line.

Why: this is one of the two places (with the KFP components) that reads the outside world:
argv, environment variables (S3 endpoint and credentials, ``MLFLOW_TRACKING_URI``) and the
terminal. It builds configs, storage and trackers and hands them to library code.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from dinoflow.config import ConfigError, DemoConfig, PretrainConfig, load_config, to_yaml

app = typer.Typer(
    name="dinoflow",
    help="Train, distil, evaluate and ship DINOv2 vision backbones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

SCHEMAS: dict[str, type[BaseModel]] = {"demo": DemoConfig, "pretrain": PretrainConfig}

Overrides = Annotated[
    list[str] | None, typer.Argument(help="dotted overrides, e.g. out=runs/x data.knn_k=10")
]


def _load(schema: type[BaseModel], preset: str, overrides: list[str] | None) -> BaseModel:
    try:
        return load_config(schema, preset, overrides or [])
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def version() -> None:
    """Print the dinoflow version."""
    typer.echo(f"dinoflow {metadata.version('dinoflow')}")


@config_app.command("show")
def config_show(
    preset: Annotated[str, typer.Argument(help="preset name under configs/ or a YAML path")],
    overrides: Overrides = None,
    kind: Annotated[str, typer.Option(help=f"config schema: {', '.join(SCHEMAS)}")] = "demo",
) -> None:
    """Print a resolved config (preset + overrides) as YAML, after validating it."""
    if kind not in SCHEMAS:
        typer.echo(f"error: unknown kind {kind!r}; allowed: {', '.join(SCHEMAS)}", err=True)
        raise typer.Exit(2)
    typer.echo(to_yaml(_load(SCHEMAS[kind], preset, overrides)), nl=False)


@app.command()
def demo(
    overrides: Overrides = None,
    config: Annotated[str, typer.Option(help="preset name or YAML path")] = "demo",
) -> None:
    """Run the demo job: Fashion-MNIST into storage, raw-pixel k-NN baseline, MLflow run."""
    from dinoflow.tracking import MlflowTracker, standard_tags
    from pipelines.demo import run_demo

    cfg = _load(DemoConfig, config, overrides)
    assert isinstance(cfg, DemoConfig)
    storage, tracking_uri = _run_root(cfg.out)
    typer.echo(
        "dinoflow demo: the KFP pipeline is not built yet; this runs what exists end to end: "
        "config -> storage -> Fashion-MNIST -> raw-pixel k-NN -> pretrain the "
        f"{cfg.pretrain_preset!r} recipe for {cfg.pretrain_minutes:g} min -> k-NN + linear probe -> MLflow.",
        err=True,
    )
    with MlflowTracker.start(
        tracking_uri,
        cfg.tracking.experiment,
        run_name=cfg.name,
        tags=standard_tags("demo"),
        artifact_location=_artifact_location(tracking_uri, cfg.out),
        metric_every=cfg.tracking.metric_every,
    ) as tracker:
        with tracker.child("pretrain", tags=standard_tags("pretrain")) as pretrain_tracker:
            summary = run_demo(cfg, storage, tracker, pretrain_tracker)
    knn = summary["knn"]
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "knn"} | {
        "knn_top1": round(knn["top1"], 4), "knn_k": knn["k"]}, indent=2))
    pretrained = summary["pretrained"]
    if pretrained:
        typer.echo(
            f"\npretrained {pretrained['recipe']!r} for {pretrained['minutes']:.1f} min ({pretrained['steps']} steps): "
            f"k-NN top-1 {100 * pretrained['knn_top1_k20']:.2f}%, linear probe {100 * pretrained['linear_top1']:.2f}% "
            "(teacher CLS, eval.train_limit/test_limit images)",
            err=True,
        )
    typer.echo(
        f"raw-pixel k-NN top-1 on Fashion-MNIST test: {100 * knn['top1']:.2f}%  "
        f"(k={knn['k']}, T={knn['temperature']})\n"
        f"outputs: {cfg.out}  (data/, demo/)\n"
        f"MLflow:  {tracking_uri}  experiment {cfg.tracking.experiment!r}, run {summary['mlflow_run_id']}\n"
        f"         browse with: mlflow ui --backend-store-uri {tracking_uri}",
        err=True,
    )


@app.command()
def pretrain(
    overrides: Overrides = None,
    config: Annotated[str, typer.Option(help="preset name (e.g. tiny, vits14) or YAML path")] = "tiny",
) -> None:
    """Pretrain a backbone with DINO + iBOT + KoLeo; resumes when OUT holds a checkpoint."""
    from dinoflow.tracking import MlflowTracker, standard_tags
    from trainer.run import run_pretrain

    cfg = _load(PretrainConfig, config, overrides)
    assert isinstance(cfg, PretrainConfig)
    storage, tracking_uri = _run_root(cfg.out)
    with MlflowTracker.start(
        tracking_uri, cfg.tracking.experiment, run_name=cfg.name, tags=standard_tags("pretrain"),
        artifact_location=_artifact_location(tracking_uri, cfg.out), metric_every=cfg.tracking.metric_every,
    ) as tracker:
        summary = run_pretrain(cfg, storage, tracker)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


@app.command("eval")
def evaluate(
    benchmark: Annotated[str, typer.Argument(help="knn or linear")],
    weights: Annotated[str, typer.Option(help="backbone weights: local path or URI")],
    source: Annotated[str, typer.Option(help="official, training, safetensors or hf")] = "safetensors",
    data_uri: Annotated[str, typer.Option(help="Fashion-MNIST folder")] = "/usr/share/datasets/fashion-mnist",
    train_limit: Annotated[int, typer.Option(help="labelled train images used (0: all)")] = 0,
    test_limit: Annotated[int, typer.Option(help="test images used (0: all)")] = 0,
    k: Annotated[int, typer.Option(help="neighbours for k-NN")] = 20,
    out: Annotated[str | None, typer.Option(help="write the JSON report here (path or URI)")] = None,
) -> None:
    """Benchmark frozen features of a backbone on Fashion-MNIST: k-NN or the linear probe."""
    import torch

    from dinoflow.storage import S3Settings, Storage
    from evaluators.linear import LinearProbeConfig
    from evaluators.report import benchmark_report
    from trainer.data.fashion_mnist import load_split
    from trainer.models.hub import SOURCES, load_backbone
    from trainer.run import labelled_features

    if benchmark not in ("knn", "linear"):
        typer.echo(f"error: unknown benchmark {benchmark!r}; allowed: knn, linear", err=True)
        raise typer.Exit(2)
    if source not in SOURCES:
        typer.echo(f"error: unknown source {source!r}; allowed: {', '.join(SOURCES)}", err=True)
        raise typer.Exit(2)
    storage = Storage(S3Settings.from_env(os.environ))
    try:
        backbone = load_backbone(weights, source, storage)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    splits = []
    for split, limit in (("train", train_limit), ("test", test_limit)):
        data = load_split(storage, data_uri, split)  # type: ignore[arg-type]
        count = limit or len(data.images)
        features = labelled_features(backbone, torch.from_numpy(data.images[:count]), backbone.patch_size)
        splits += [features, torch.from_numpy(data.labels[:count])]
    report = benchmark_report(*splits, ks=(k,), linear=LinearProbeConfig() if benchmark == "linear" else None,
                              num_classes=10)
    if benchmark == "linear":
        report.pop("knn")
    text = json.dumps(report, indent=2)
    if out:
        storage.write_bytes(out, text.encode())
    typer.echo(text)


@app.command()
def export(
    weights: Annotated[str, typer.Option(help="weight file or folder: local path or URI")],
    export_format: Annotated[str, typer.Option("--format", help="hf, onnx or safetensors")],
    out: Annotated[str, typer.Option(help="output folder: local path or URI")],
    source: Annotated[
        str | None,
        typer.Option(help="official, training, safetensors or hf; default from the path: "
                          "*.safetensors -> safetensors, a folder -> hf, else official"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="released architecture, e.g. dinov2_vits14_reg (else inferred)")
    ] = None,
    height: Annotated[int, typer.Option(help="ONNX input height (multiple of the patch size)")] = 224,
    width: Annotated[int, typer.Option(help="ONNX input width (multiple of the patch size)")] = 224,
) -> None:
    """Export a backbone to a Hugging Face folder, an ONNX file or safetensors."""
    import tempfile
    from pathlib import Path

    from dinoflow.storage import S3Settings, Storage, join_uri
    from trainer.models.hub import SOURCES, load_backbone, pretrained_arch_kwargs, save_backbone

    formats = ("hf", "onnx", "safetensors")
    if export_format not in formats:
        typer.echo(f"error: unknown format {export_format!r}; allowed: {', '.join(formats)}", err=True)
        raise typer.Exit(2)
    storage = Storage(S3Settings.from_env(os.environ))
    if storage.list(out):
        typer.echo(f"error: {out} is not empty; choose a new output folder", err=True)
        raise typer.Exit(2)
    if source is None:
        source = ("safetensors" if weights.endswith(".safetensors")
                  else "hf" if storage.exists(join_uri(weights, "config.json")) else "official")
        typer.echo(f"weights source: {source} (from the path; pass --source to choose)", err=True)
    if source not in SOURCES:
        typer.echo(f"error: unknown source {source!r}; allowed: {', '.join(SOURCES)}", err=True)
        raise typer.Exit(2)
    try:
        arch_kwargs = pretrained_arch_kwargs(model) if model else None
        backbone = load_backbone(weights, source, storage, arch_kwargs)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "export"
        if export_format == "hf":
            from trainer.models.hf import export_hf

            export_hf(backbone, staged)
        elif export_format == "onnx":
            from trainer.models.onnx_export import export_onnx

            export_onnx(backbone, staged / "model.onnx", height, width)
        else:
            save_backbone(backbone, str(staged / "backbone.safetensors"))
        written = storage.upload_dir(staged, out)
    typer.echo("\n".join(written))


def _run_root(out: str) -> tuple[Any, str]:
    """Storage from the environment with the run root's bucket made, and the tracking URI
    (``MLFLOW_TRACKING_URI``, else sqlite under the run root)."""
    from dinoflow.storage import S3Settings, Storage
    from dinoflow.tracking import default_tracking_uri

    storage = Storage(S3Settings.from_env(os.environ))
    storage.make_bucket(out)
    return storage, os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out)


def _artifact_location(tracking_uri: str, run_root: str) -> str | None:
    """Artifacts of the embedded sqlite store live beside it; a server decides its own."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    root = run_root.removeprefix("file://")
    return f"file://{os.path.abspath(os.path.join(root, 'mlartifacts'))}"


def main() -> None:
    """Entry point for ``python -m pipelines.cli``."""
    app(prog_name="dinoflow")


if __name__ == "__main__":
    sys.exit(main())
