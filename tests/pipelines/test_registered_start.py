"""`dinoflow pretrain` and `dinoflow distill` take a registered model (``models:/...``) as their
starting weights or teacher: its backbone and the heads registered with it, fetched from a real
sqlite MLflow registry the register stage filled."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from components.register import run_register_stage
from components.stage import REPORT_FILE, StageContext
from dinoflow.registry import gate, pick_version, register_version, registry_client
from dinoflow.run_files import BACKBONE_FILE
from dinoflow.storage import Storage
from pipelines.cli import _cache_folder, _fetch_version, app
from tests.registry import promote_package
from trainer.models.head_weights import find_heads
from trainer.models.hub import save_backbone
from trainer.models.vit import build_vit

ROOT = Path(__file__).resolve().parents[2]
DATA = "/usr/share/datasets/fashion-mnist"
SMALL = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "heads.num_prototypes=64",
         "heads.hidden_dim=64", "heads.bottleneck_dim=16", "optim.batch_size=8", "crops.num_local_crops=2",
         "eval.every_steps=0", "eval.train_limit=200", "eval.test_limit=100", f"data.uri={DATA}"]

pytestmark = pytest.mark.skipif(not Path(DATA).is_dir(), reason="Fashion-MNIST is not installed")


def test_a_registered_model_starts_a_pretraining_and_teaches_a_distillation(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runner = CliRunner()
    first = runner.invoke(app, ["pretrain", "--config", "tiny", *SMALL, "max_steps=2", f"out={tmp_path / 'first'}"])
    assert first.exit_code == 0, first.output
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / REPORT_FILE).write_text(json.dumps({"metrics": {"knn_top1_k20": 0.5}}))
    run_register_stage(StageContext(str(tmp_path / "root"), uri), tmp_path / "first", tmp_path / "report",
                       tmp_path / "decision", "tiny")
    trained = find_heads(str(tmp_path / "first"), "auto", Storage())

    started = runner.invoke(app, ["pretrain", "--config", "tiny", *SMALL, "max_steps=1", f"out={tmp_path / 'next'}",
                                  "init_weights=models:/tiny@champion"])
    assert started.exit_code == 0, started.output
    assert "models:/tiny@champion: version 1 of tiny" in started.stderr
    client = MlflowClient(uri)
    (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
              if r.data.tags.get("init_heads")]
    assert run.data.tags["init_heads"].endswith("heads.safetensors")  # the registered heads, fetched
    continued = find_heads(str(tmp_path / "next"), "auto", Storage())
    assert continued.heads.keys() == trained.heads.keys()

    distilled = runner.invoke(app, ["distill", "--teacher", "models:/tiny/1", *SMALL, "distill.objective=heads",
                                    "max_steps=1", f"out={tmp_path / 'student'}"])
    assert distilled.exit_code == 0, distilled.output
    assert "models:/tiny/1: version 1 of tiny" in distilled.stderr
    # the registered heads are the teacher's: a student of other prototypes is refused naming them
    refused = runner.invoke(app, ["distill", "--teacher", "models:/tiny", *SMALL, "distill.objective=heads",
                                  "heads.num_prototypes=32", "max_steps=1", f"out={tmp_path / 'other'}"])
    assert refused.exit_code == 2
    assert "heads.num_prototypes = 32 but the teacher's heads have 64" in refused.stderr
    missing = runner.invoke(app, ["pretrain", "--config", "tiny", *SMALL, f"out={tmp_path / 'none'}",
                                  "init_weights=models:/tiny@nope"])
    assert missing.exit_code == 2 and "error: registered model 'tiny' has no alias 'nope'" in missing.stderr


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered versions fetched under each test's folder, not ``~/.cache/dinoflow``."""
    monkeypatch.setenv("DINOFLOW_CACHE_DIR", str(tmp_path / "cache"))


def _register_tiny(tmp_path: Path) -> str:
    """A random tiny backbone (patch 7, 28 px) registered as ``tiny`` and crowned champion in a sqlite
    store under ``tmp_path``; returns the store's URI."""
    torch.manual_seed(0)
    package = tmp_path / "package" / "artifacts"
    package.mkdir(parents=True)
    save_backbone(build_vit("vit_small", img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2),
                  str(package / BACKBONE_FILE))
    return promote_package(package.parent, tmp_path)


def test_a_finetuning_from_a_champion_resumes_when_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _register_tiny(tmp_path))
    runner = CliRunner()
    command = ["finetune", "--weights", "models:/tiny@champion", f"out={tmp_path / 'run'}", "data.train_limit=256",
               "data.test_limit=100", "optim.batch_size=64", "optim.epochs=1", "eval_every_epochs=0"]
    halted = runner.invoke(app, [*command, "max_steps=2"])
    assert halted.exit_code == 0, halted.output
    resumed = runner.invoke(app, command)  # the same command, its checkpoint found: it continues
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4
    # the champion moved: the same command resolves version 2, and the run refuses it naming both folders
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_model_version("tiny", "1").run_id
    assert gate(client, "tiny", register_version(client, "tiny", run, "backbone", {"knn_top1_k20": 0.9}),
                "knn_top1_k20").promoted
    moved = runner.invoke(app, command)
    assert moved.exit_code == 2
    assert "(to resume after the alias moves: models:/tiny/2)" in moved.stderr
    assert re.search(r"weights = '\S+/registered/\w+/tiny/2' \(the run: '\S+/registered/\w+/tiny/1'\)", moved.stderr)
    pinned = runner.invoke(app, [*command[:2], "models:/tiny/1", *command[3:], "optim.epochs=2"])
    assert pinned.exit_code == 0, pinned.output  # the version named: the run resumes
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 8


FETCH = """
import sys
from dinoflow.registry import pick_version, registry_client
from pipelines.cli import _fetch_version
client = registry_client(sys.argv[1])
print(_fetch_version(client, sys.argv[1], pick_version(client, "models:/tiny@champion")))
"""


def test_concurrent_fetches_of_a_version_download_it_once(tmp_path: Path) -> None:
    store = _register_tiny(tmp_path)
    ranks = [subprocess.Popen([sys.executable, "-c", FETCH, store], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    done = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], done
    assert sum(err.count("downloading version 1 of tiny into") for _, err in done) == 1, done
    (folder,) = {out.strip() for out, _ in done}  # both see the one folder, whole
    assert Path(folder).parts[-2:] == ("tiny", "1")
    assert (Path(folder) / BACKBONE_FILE).read_bytes() == (tmp_path / "package" / "artifacts" / BACKBONE_FILE
                                                           ).read_bytes()


KILLED = """
import sys, time
from pathlib import Path
from filelock import FileLock
folder = Path(sys.argv[1])
folder.parent.mkdir(parents=True)
with FileLock(folder.with_name(".1.lock")):
    partial = folder.with_name(".1.partial")
    partial.mkdir()
    (partial / "backbone.safetensors").write_bytes(b"half a file")
    Path(sys.argv[2]).touch()
    time.sleep(600)
"""


def test_a_download_killed_half_way_is_not_reused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = _register_tiny(tmp_path)
    folder = _cache_folder(store, "tiny", "1")
    # a download holding the lock, its file half written, killed
    download = subprocess.Popen([sys.executable, "-c", KILLED, str(folder), str(tmp_path / "written")], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (tmp_path / "written").exists() and time.monotonic() < deadline and download.poll() is None:
        time.sleep(0.05)
    assert (tmp_path / "written").exists()
    download.send_signal(signal.SIGKILL)
    download.wait()
    client = registry_client(store)
    fetched = _fetch_version(client, store, pick_version(client, "models:/tiny@champion"))
    assert fetched == folder and "downloading version 1 of tiny" in capsys.readouterr().err
    registered = (tmp_path / "package" / "artifacts" / BACKBONE_FILE).read_bytes()
    assert (folder / BACKBONE_FILE).read_bytes() == registered
    assert not folder.with_name(".1.partial").exists()
    # a whole folder is reused; one missing its backbone (emptied by hand) is fetched again
    assert _fetch_version(client, store, pick_version(client, "models:/tiny/1")) == folder
    assert "downloading" not in capsys.readouterr().err
    (folder / BACKBONE_FILE).unlink()
    _fetch_version(client, store, pick_version(client, "models:/tiny/1"))
    assert (folder / BACKBONE_FILE).read_bytes() == registered
