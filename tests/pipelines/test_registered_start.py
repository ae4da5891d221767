"""`dinoflow pretrain` and `dinoflow distill` take a registered model (``models:/...``) as their
starting weights or teacher: its backbone and the heads registered with it, fetched from a real
sqlite MLflow registry the register stage filled."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from components.register import BACKBONE_IN_RUN, run_register_stage
from components.stage import REPORT_FILE, StageContext
from dinoflow.registry import (CachedVersion, cached_version, gate, pick_version, pinned_uri, register_version,
                               registry_client)
from dinoflow.run_files import BACKBONE_FILE
from dinoflow.storage import Storage
from pipelines.cli import app
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


def _package(folder: Path, seed: int = 0) -> Path:
    """``folder`` holding an MLflow model folder's ``artifacts/`` with a random tiny backbone (patch 7,
    28 px) drawn from ``seed``."""
    torch.manual_seed(seed)
    (folder / "artifacts").mkdir(parents=True)
    save_backbone(build_vit("vit_small", img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2),
                  str(folder / "artifacts" / BACKBONE_FILE))
    return folder


def _register_tiny(tmp_path: Path) -> str:
    """A random tiny backbone registered as ``tiny`` and crowned champion in a sqlite store under
    ``tmp_path``; returns the store's URI."""
    return promote_package(_package(tmp_path / "package"), tmp_path)


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
    assert re.search(r"weights = '\S+/registered/\w+/tiny/2-\w+' \(the run: '\S+/registered/\w+/tiny/1-\w+'\)",
                     moved.stderr)
    pinned = runner.invoke(app, [*command[:2], "models:/tiny/1", *command[3:], "optim.epochs=2"])
    assert pinned.exit_code == 0, pinned.output  # the version named: the run resumes
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 8


def _register_again(store: str, folder: Path) -> None:
    """Registered model ``tiny`` deleted and ``folder`` (a :func:`_package`) registered as it anew, from
    another run, and crowned: the store numbers it version 1 again."""
    client = MlflowClient(store)
    client.delete_registered_model("tiny")
    run = client.create_run(client.get_experiment_by_name("tiny").experiment_id).info.run_id
    client.log_artifacts(run, str(folder), "backbone")
    assert gate(client, "tiny", register_version(client, "tiny", run, "backbone", {"knn_top1_k20": 0.5}),
                "knn_top1_k20").promoted


def test_a_version_registered_anew_is_not_read_from_the_old_ones_folder(tmp_path: Path) -> None:
    store = _register_tiny(tmp_path)
    client = registry_client(store)
    cache = tmp_path / "cache"
    old = cached_version(client, store, pick_version(client, "models:/tiny@champion"), BACKBONE_IN_RUN, cache)
    _register_again(store, _package(tmp_path / "again", seed=1))
    found = pick_version(client, "models:/tiny@champion")
    assert str(found.version) == "1"  # (as `rm -rf runs/demo; make demo` does)
    new = cached_version(client, store, found, BACKBONE_IN_RUN, cache)
    registered = (tmp_path / "again" / "artifacts" / BACKBONE_FILE).read_bytes()
    assert new.downloaded and (new.folder / BACKBONE_FILE).read_bytes() == registered
    assert (old.folder / BACKBONE_FILE).read_bytes() != registered
    # the same version fetched again (a run resuming): the same folder, not downloaded again
    again = cached_version(client, store, pick_version(client, "models:/tiny/1"), BACKBONE_IN_RUN, cache)
    assert again == CachedVersion(new.folder, downloaded=False)


def _start(tmp_path: Path, cache: str, *args: str) -> Any:
    """``dinoflow pretrain`` of the tiny registered model's champion (``cache``: ``VAR=folder``, the
    cache's environment variable set) that stops at its missing data, once the model is fetched."""
    name, _, folder = cache.partition("=")
    environ = {"DINOFLOW_CACHE_DIR": "", "XDG_CACHE_HOME": "", "HOME": str(tmp_path / "home"), name: folder}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in environ.items():
            patch.setenv(key, value)
        return CliRunner().invoke(app, ["pretrain", "--config", "tiny", *args, "init_weights=models:/tiny@champion",
                                        f"data.uri={tmp_path / 'no-data'}", f"out={tmp_path / 'run'}"])


def test_the_cache_is_dinoflow_cache_dir_else_xdg_cache_home_else_the_homes(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _register_tiny(tmp_path))
    for cache, root in ((f"DINOFLOW_CACHE_DIR={tmp_path / 'a'}", tmp_path / "a"),
                        (f"XDG_CACHE_HOME={tmp_path / 'b'}", tmp_path / "b" / "dinoflow"),
                        (f"HOME={tmp_path / 'c'}", tmp_path / "c" / ".cache" / "dinoflow")):
        started = _start(tmp_path, cache)
        assert started.exit_code == 2 and "no-data" in started.stderr, started.output  # (stopped where meant)
        (fetched,) = (root / "registered").glob("*/tiny/1-*")
        assert f"models:/tiny@champion: version 1 of tiny, downloaded into {fetched} " in started.stderr


def test_a_cache_that_cannot_be_written_is_said_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _register_tiny(tmp_path))
    (tmp_path / "file").write_text("a file, not a folder: none can be made in it (a read-only home, for root)")
    refused = _start(tmp_path, f"DINOFLOW_CACHE_DIR={tmp_path / 'file' / 'cache'}")
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.splitlines()[-1].startswith(
        f"error: models:/tiny@champion: version 1 of tiny could not be fetched into the cache {tmp_path}/file/cache: "
        "[Errno 20] Not a directory")
    assert "$DINOFLOW_CACHE_DIR" in refused.stderr and "Traceback" not in refused.output


def test_ranks_are_given_the_version_the_alias_names_as_they_start(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = _register_tiny(tmp_path)
    client = registry_client(store)
    assert [pinned_uri(client, uri) for uri in ("models:/tiny@champion", "models:/tiny", "models:/tiny/1",
                                                "runs/tiny")] == ["models:/tiny/1", "models:/tiny/1",
                                                                  "models:/tiny/1", "runs/tiny"]
    run = client.get_model_version("tiny", "1").run_id
    assert gate(client, "tiny", register_version(client, "tiny", run, "backbone", {"knn_top1_k20": 0.9}),
                "knn_top1_k20").promoted
    assert pinned_uri(client, "models:/tiny@champion") == "models:/tiny/2"
    with pytest.raises(ValueError, match="registered model 'tiny' has no alias 'nope'"):
        pinned_uri(client, "models:/tiny@nope")
    # 2 ranks: the launching process resolves the champion, the ranks are given its version
    environ = {**os.environ, "MLFLOW_TRACKING_URI": store, "DINOFLOW_CACHE_DIR": str(tmp_path / "cache")}
    ranks = subprocess.run([sys.executable, "-m", "pipelines.cli", "pretrain", "--nproc", "2", "--config", "tiny",
                            "init_weights=models:/tiny@champion", f"data.uri={tmp_path / 'no-data'}",
                            f"out={tmp_path / 'run'}"], cwd=ROOT, env=environ, capture_output=True, text=True,
                           timeout=120)
    launched = re.search(r"dinoflow pretrain: 2 ranks: .*", ranks.stderr)
    assert launched and launched[0].endswith(" init_weights=models:/tiny@champion "
                                             f"data.uri={tmp_path / 'no-data'} out={tmp_path / 'run'} "
                                             "init_weights=models:/tiny/2 distributed.strategy=fsdp2"), ranks.stderr
    # a rank's fetch (the first to stop at the missing data may end the other before it fetched)
    assert "models:/tiny/2: version 2 of tiny, " in ranks.stderr
    assert "models:/tiny@champion: version" not in ranks.stderr  # resolved once, by the launcher, which says so:
    assert "init_weights: models:/tiny@champion is models:/tiny/2\n" in ranks.stderr
    refused = CliRunner().invoke(app, ["pretrain", "--nproc", "2", "init_weights=models:/tiny@nope"],
                                 env={"MLFLOW_TRACKING_URI": store})
    assert refused.exit_code == 2 and refused.stderr == "error: registered model 'tiny' has no alias 'nope'\n"


def _wait_for(process: subprocess.Popen[str], *marks: Path) -> Path:
    """The first of ``marks`` (files) that ``process`` makes, waited for up to a minute."""
    deadline = time.monotonic() + 60
    while not (made := [mark for mark in marks if mark.exists()]):
        assert process.poll() is None and time.monotonic() < deadline, f"none of {marks} was made"
        time.sleep(0.05)
    return made[0]


FETCH = """
import sys, time
from pathlib import Path
import filelock
from components.register import BACKBONE_IN_RUN
from dinoflow import registry

store, cache, marks, me = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
acquire, download = filelock.FileLock.acquire, registry.download_version

def marked_acquire(lock, *args, **kwargs):  # marks that this process asks for the lock
    (marks / f"{me}-locking").touch()
    return acquire(lock, *args, **kwargs)

def held_download(*args):  # marks that this process downloads, and holds there until the test says go
    (marks / f"{me}-downloading").touch()
    deadline = time.monotonic() + 60
    while not (marks / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return download(*args)

filelock.FileLock.acquire, registry.download_version = marked_acquire, held_download
client = registry.registry_client(store)
found = registry.pick_version(client, "models:/tiny@champion")
fetched = registry.cached_version(client, store, found, BACKBONE_IN_RUN, cache)
print(fetched.folder, fetched.downloaded)
"""


def test_concurrent_fetches_of_a_version_download_it_once(tmp_path: Path) -> None:
    store = _register_tiny(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    processes: list[subprocess.Popen[str]] = []

    def start(me: str) -> subprocess.Popen[str]:
        processes.append(subprocess.Popen([sys.executable, "-c", FETCH, store, str(tmp_path / "cache"), str(marks),
                                           me], cwd=ROOT, text=True, stdout=subprocess.PIPE))
        return processes[-1]

    try:
        _wait_for(start("first"), marks / "first-downloading")  # it holds the lock, its download not done
        # the second asks for the lock (and waits for it), or, were there none, downloads beside the first
        made = _wait_for(start("second"), marks / "second-locking", marks / "second-downloading")
        assert made == marks / "second-locking" and not (marks / "second-downloading").exists()
    finally:
        (marks / "go").touch()
        done = [process.communicate(timeout=120)[0].split() for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    (first, first_downloaded), (second, second_downloaded) = done
    assert first == second and (first_downloaded, second_downloaded) == ("True", "False")
    assert (Path(first) / BACKBONE_FILE).read_bytes() == (tmp_path / "package" / "artifacts" / BACKBONE_FILE
                                                          ).read_bytes()


KILLED = """
import sys, time
from pathlib import Path
from filelock import FileLock
folder = Path(sys.argv[1])
with FileLock(folder.with_name(f".{folder.name}.lock")):
    partial = folder.with_name(f".{folder.name}.partial")
    partial.mkdir()
    (partial / "backbone.safetensors").write_bytes(b"half a file")
    Path(sys.argv[2]).touch()
    time.sleep(600)
"""


def test_a_download_killed_half_way_is_not_reused(tmp_path: Path) -> None:
    store = _register_tiny(tmp_path)
    client = registry_client(store)
    found, cache = pick_version(client, "models:/tiny@champion"), tmp_path / "cache"
    folder = cached_version(client, store, found, BACKBONE_IN_RUN, cache).folder
    shutil.rmtree(folder)
    # a download holding the lock, its file half written, killed
    download = subprocess.Popen([sys.executable, "-c", KILLED, str(folder), str(tmp_path / "written")], cwd=ROOT,
                                text=True)
    _wait_for(download, tmp_path / "written")
    download.send_signal(signal.SIGKILL)
    download.wait()
    assert cached_version(client, store, found, BACKBONE_IN_RUN, cache) == CachedVersion(folder, downloaded=True)
    registered = (tmp_path / "package" / "artifacts" / BACKBONE_FILE).read_bytes()
    assert (folder / BACKBONE_FILE).read_bytes() == registered
    assert not folder.with_name(f".{folder.name}.partial").exists()
    # a whole folder is reused; one missing its backbone (emptied by hand) is fetched again
    assert not cached_version(client, store, found, BACKBONE_IN_RUN, cache).downloaded
    (folder / BACKBONE_FILE).unlink()
    assert cached_version(client, store, found, BACKBONE_IN_RUN, cache).downloaded
    assert (folder / BACKBONE_FILE).read_bytes() == registered
