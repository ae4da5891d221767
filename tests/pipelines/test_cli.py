"""The command line's own surface: what it says when an endpoint is down, its help as rendered, the
ranges of its numbers, presets read by their kind, and the commands the docs and manifests give it."""

from __future__ import annotations

import os
import shlex
import socket
import threading
import time
from pathlib import Path

import click
import pytest
import typer
import yaml
from click.testing import Result
from rich.text import Text
from typer.testing import CliRunner

from pipelines.cli import QUICK_REGISTRY, app
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
MLFLOW_HTTP = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")  # MLflow reads them at each request


def _one_line_error(result: Result, *parts: str) -> None:
    """Exit status 1, no traceback, and stderr's last line ``error: ...`` holding ``parts`` (a client's
    warnings may come before it)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(part in last for part in parts), last


def test_an_unreachable_endpoint_is_said_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubeflow's API, the MLflow server and S3 down: the client's message, naming the endpoint, in one
    line; MLflow's retries capped for the registry commands (not ~4 minutes), not past a user's value."""
    port = free_port()
    runner = CliRunner()
    submitted = runner.invoke(app, ["pipeline", "submit", "full", "--host", f"http://127.0.0.1:{port}/pipeline"])
    _one_line_error(submitted, f"port={port}", "Max retries exceeded")

    for name in MLFLOW_HTTP:
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    listed = runner.invoke(app, ["models", "list", "--tracking-uri", f"http://127.0.0.1:{port}"])
    _one_line_error(listed, f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models")
    assert time.monotonic() - started < 30
    assert not set(MLFLOW_HTTP) & set(os.environ)  # put back as it was
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's: kept, and faster still
    promoted = runner.invoke(app, ["models", "promote", "tiny", "1", "--tracking-uri", f"http://127.0.0.1:{port}"])
    _one_line_error(promoted, f"http://127.0.0.1:{port}/api/2.0/mlflow/")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    demo = runner.invoke(app, ["demo", "out=s3://my-bucket/demo"])
    _one_line_error(demo, "make_bucket s3://my-bucket failed")


@pytest.mark.timeout(120)  # MLflow's own retries (7, backing off) take over 4 minutes
@pytest.mark.parametrize("command", [["eval", "knn", "--weights"], ["serve", "--model"]])
def test_a_registered_model_on_an_unreachable_store_is_said_in_one_line(command: list[str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """eval and serve resolve a models:/ URI with the models commands' capped retries, and say the
    store that does not answer in one line."""
    port = free_port()  # bound, closed: nothing listens there
    for name in MLFLOW_HTTP:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    result = CliRunner().invoke(app, [*command, "models:/tiny@champion"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: models:/tiny@champion: API request to http://127.0.0.1:{port}/api/2.0/mlflow/"
                           "registered-models/alias failed"), last
    assert "Connection refused" in last
    assert not set(MLFLOW_HTTP) & set(os.environ)  # put back as it was


@pytest.mark.timeout(120)
def test_eval_and_serve_make_the_models_commands_few_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The capped retries applied: a store that hangs up on every request is asked 1 + 2 times, not 1 + 7."""
    attempts = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def hang_up() -> None:
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:  # closed: the test is over
                    return
                attempts.append(1)
                connection.close()

        threading.Thread(target=hang_up, daemon=True).start()
        for name in MLFLOW_HTTP:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{listener.getsockname()[1]}")
        for command in (["eval", "knn", "--weights"], ["serve", "--model"]):
            attempts.clear()
            result = CliRunner().invoke(app, [*command, "models:/tiny@champion"])
            assert result.exit_code == 1 and "Max retries exceeded" in result.stderr, result.output
            assert len(attempts) == 1 + int(QUICK_REGISTRY["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), command


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command under ``command`` (sub-groups' too) with its words after ``dinoflow``."""
    found = [(path, command)]
    for name, sub in getattr(command, "commands", {}).items():
        found += _commands(sub, (*path, name))
    return found


def test_help_keeps_its_bracketed_text() -> None:
    """Help texts are Rich markup: "[default: 1]" or "[optim.batch_size=64]" unescaped was taken for a
    tag and dropped from the help."""
    for path, command in _commands(typer.main.get_command(app)):
        for text in [command.help or "", *(getattr(param, "help", None) or "" for param in command.params)]:
            assert Text.from_markup(text).plain == text.replace("\\[", "["), (path, text)
    for words in (["pipeline", "submit"], ["pipeline", "compile"]):
        shown = CliRunner().invoke(app, [*words, "--help"], env={"TERMINAL_WIDTH": "400"})
        assert shown.exit_code == 0, shown.output
        text = " ".join(shown.stdout.replace("│", " ").split())
        for part in ("overrides=[optim.batch_size=64])", "[default: ghcr.io/dinoflow]",
                     "[default: this release's version]", "[default: dinoflow-s3]", "runs on cpu) [default: 1]"):
            assert part in text, (words, part)


@pytest.mark.parametrize("args, option", [
    (["eval", "knn", "--weights", "x", "--train-limit", "-5"], "--train-limit"),
    (["eval", "knn", "--weights", "x", "--test-limit", "-1"], "--test-limit"),
    (["eval", "knn", "--weights", "x", "--k", "0"], "--k"),
    (["index", "build", "--model", "x", "--images", "y", "--out", "z", "--batch-size", "0"], "--batch-size"),
    (["index", "build", "--model", "x", "--images", "y", "--out", "z", "--num-workers", "-1"], "--num-workers"),
    (["serve", "--model", "x", "--port", "99999"], "--port"),
    (["pipeline", "compile", "full", "--out", "x.yaml", "--gpus", "-1"], "--gpus"),
])
def test_numbers_out_of_range_are_refused(args: list[str], option: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output


def test_presets_are_read_by_their_kind() -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["config", "show", "tiny"])  # configs/pretrain/tiny.yaml: a pretrain config
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.stdout)["name"] == "tiny"
    for args, message in [
        (["config", "show", "tiny", "--kind", "demo"],
         "error: 'tiny' is a pretrain preset (configs/pretrain/), not a demo one; demo presets: demo"),
        (["config", "show", "benchmarks-cluster"], "error: 'benchmarks-cluster' is a pipeline parameter set"),
        (["pretrain", "--config", "finetune-tiny"],
         "error: 'finetune-tiny' is a finetune preset (configs/finetune/), not a pretrain one; pretrain presets: "
         "tiny, vitb14"),
        (["demo", "pretrain_preset=tinyy"],
         "error: pretrain_preset: preset 'tinyy' not found; available: tiny, vitb14, vitg14, vitl14, vits14\n"),
        (["finetune", "--config", "finetune-tinyy"],
         "error: preset 'finetune-tinyy' not found; available: finetune-in1k, finetune-tiny\n"),
        (["distill", "--student", "distill-tinyy"], "error: preset 'distill-tinyy' not found; available: "
         "distill-tiny, distill-vits14, tiny, vitb14, vitg14, vitl14, vits14\n"),
        (["config", "show", "tinyy", "--kind", "demo"], "error: preset 'tinyy' not found; available: demo\n"),
        (["demo", "pretrain_preset=distill-tiny"], "error: pretrain_preset: 'distill-tiny' is a distill preset"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.stderr.startswith(message), (args, result.output)
        assert len(result.stderr) < 300, result.stderr
    student = runner.invoke(app, ["config", "show", "vits14", "--kind", "distill"])  # a student's recipe
    assert student.exit_code == 0, student.output


def test_one_line_for_a_missing_folder_and_a_bad_list(tmp_path: Path) -> None:
    compiled = CliRunner().invoke(app, ["pipeline", "compile", "full", "--out", str(tmp_path / "no" / "x.yaml")])
    assert compiled.exit_code == 2 and compiled.stderr.startswith("error: [Errno 2] No such file or directory")
    curated = CliRunner().invoke(app, ["curate", "--pool", str(tmp_path), "--out", str(tmp_path / "out"),
                                       "--balance-clusters", "10,x", "--no-track"])
    assert curated.exit_code == 2
    assert curated.stderr.startswith("error: --balance-clusters '10,x': give whole numbers"), curated.output


def test_the_readmes_cpu_image_pipeline_requests_no_gpu(tmp_path: Path) -> None:
    """The README compiles the pipeline onto one CPU image: for a CPU-only cluster, with --gpus 0."""
    (line,) = [line for line in (ROOT / "README.md").read_text().splitlines()
               if "pipeline compile full" in line and "dinoflow-cpu" in line]
    args = shlex.split(line)[1:]  # after .venv/bin/dinoflow
    args[args.index("--out") + 1] = str(tmp_path / "full.yaml")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "nvidia.com/gpu" not in (tmp_path / "full.yaml").read_text()


def test_the_training_jobs_command_names_its_data() -> None:
    """The PyTorchJob's dinoflow command resolves to a config that reads data (vits14 names none),
    at the path infra/README.md gives."""
    job = yaml.safe_load((ROOT / "infra" / "k8s" / "training" / "pytorchjob.yaml").read_text())
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    program, command, config, *overrides = container["args"]
    assert (program, command) == ("dinoflow", "pretrain") and config.startswith("--config=")
    shown = CliRunner().invoke(app, ["config", "show", config.removeprefix("--config="), "--kind", "pretrain",
                                     *overrides])
    assert shown.exit_code == 0, shown.output
    data = yaml.safe_load(shown.stdout)["data"]
    assert data["kind"] == "shards" and data["uri"].startswith("s3://dinoflow/datasets/")
    assert f"data.uri={data['uri']}" in " ".join((ROOT / "infra" / "README.md").read_text().split())
