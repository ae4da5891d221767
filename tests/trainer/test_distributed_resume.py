"""Checkpoints that outlive their world size and their crashes.

A checkpoint holds whole tensors keyed by parameter name (networks, centres, and the optimizer
state, gathered from the shards or partitions), so a run written by 2 ranks resumes on 1 and the
other way round, under FSDP2 and under DeepSpeed ZeRO-3. Only the main rank keeps and writes a
checkpoint, and only it reads one back: the other ranks take part in the gathers and receive what
they resume from. The runs are real: ``torchrun`` (started by ``dinoflow pretrain --nproc 2`` for
the engine's loop) starts 2 processes that meet over gloo on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from dinoflow.storage import Storage
from tests.trainer.checkpoint_ranks import size
from tests.trainer.test_deepspeed import ENV as DEEPSPEED_ENV
from tests.trainer.test_distributed import (
    GLOBAL_BATCH,
    HELPER,
    LOSS_TOLERANCE,
    PARAM_TOLERANCE,
    SMALL,
    _run,
    _wait,
)
from tests.trainer.test_finetune import needs_fashion_mnist
from trainer.checkpoints import load_latest_checkpoint
from trainer.models.head_weights import find_heads
from trainer.models.hub import save_backbone
from trainer.models.vit import build_vit

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
RECORDER = HELPER.with_name("checkpoint_ranks.py")
READS = HELPER.with_name("resume_ranks.py")
SAVE_AT, STEPS = 4, 8
OVERRIDES = [*SMALL, "loss.centering=softmax", "heads.ibot_separate_head=true"]


def _steps(ranks: int, out: Path, *options: str) -> subprocess.Popen:
    launcher = TORCHRUN if ranks == 2 else [sys.executable]
    strategy = "fsdp2" if ranks == 2 else "single"
    return _run([*launcher, str(HELPER), str(out), str(GLOBAL_BATCH), str(STEPS), *options, *OVERRIDES,
                 f"distributed.strategy={strategy}"], out)


def _assert_same_state(got: dict, want: dict, tolerance: float) -> None:
    for part in ("student", "teacher", "objective"):
        assert got[part].keys() == want[part].keys()
        for name, tensor in want[part].items():
            torch.testing.assert_close(got[part][name], tensor, rtol=0, atol=tolerance, msg=f"{part}.{name}")


def test_a_checkpoint_resumes_at_another_world_size(tmp_path: Path) -> None:
    """2 ranks -> step 4 -> 1 rank -> step 8 ends where 2 ranks uninterrupted end, and 1 -> 2 ends
    where 1 ends (every rank augments the global batch here, so the split changes nothing but the
    sums' order: the tolerances are those of 2 x B vs 1 x 2B)."""
    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    two_ckpt, one_ckpt = tmp_path / "two_ckpt.pt", tmp_path / "one_ckpt.pt"
    first = [(_steps(2, two, f"--save-at={SAVE_AT}:{two_ckpt}"), two),
             (_steps(1, one, f"--save-at={SAVE_AT}:{one_ckpt}"), one)]
    two_result, one_result = (_wait(process, out) for process, out in first)

    written_by_two, written_by_one = (torch.load(p, weights_only=True) for p in (two_ckpt, one_ckpt))
    assert written_by_two["step"] == written_by_one["step"] == SAVE_AT
    for written in (written_by_two, written_by_one):  # one format: whole tensors keyed by parameter name
        state = written["optimizer"]["state"]
        assert set(state) <= set(written["student"]) and "backbone.blocks.0.attn.qkv.weight" in state
        assert state["backbone.blocks.0.attn.qkv.weight"]["exp_avg"].shape == (96, 32)
    for name, moments in written_by_two["optimizer"]["state"].items():
        for key, tensor in moments.items():
            torch.testing.assert_close(written_by_one["optimizer"]["state"][name][key], tensor, rtol=0,
                                       atol=PARAM_TOLERANCE, msg=f"{name}.{key}")

    one_from_two, two_from_one = tmp_path / "one_from_two.pt", tmp_path / "two_from_one.pt"
    second = [(_steps(1, one_from_two, f"--resume={two_ckpt}"), one_from_two),
              (_steps(2, two_from_one, f"--resume={one_ckpt}"), two_from_one)]
    resumed_on_one, resumed_on_two = (_wait(process, out) for process, out in second)

    assert (resumed_on_one["world_size"], resumed_on_two["world_size"]) == (1, 2)
    for resumed, reference in ((resumed_on_one, two_result), (resumed_on_two, one_result)):
        assert len(resumed["losses"]) == STEPS - SAVE_AT
        for step, (a, b) in enumerate(zip(resumed["losses"], reference["losses"][SAVE_AT:]), start=SAVE_AT):
            for term in ("dino", "ibot", "total"):
                assert abs(a[term] - b[term]) < LOSS_TOLERANCE, f"step {step} {term}: {a[term]} vs {b[term]}"
        _assert_same_state(resumed, reference, PARAM_TOLERANCE)


@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed"])
def test_only_the_main_rank_keeps_and_serialises_a_checkpoint(tmp_path: Path, strategy: str) -> None:
    """Both ranks take part in a checkpoint's gathers, but only rank 0, which writes it, keeps the
    whole tensors and serialises them: rank 1's calls return nothing (a rank that kept them held a
    whole copy of student, teacher and optimizer state, ~18 GB for a ViT-g, for nothing). What rank
    0 writes is what the all-rank gather of the networks holds at the same step, bit for bit."""
    out, written = tmp_path / "run.pt", tmp_path / "checkpoint.pt"
    process = _run([*TORCHRUN, str(RECORDER), str(out), str(GLOBAL_BATCH), "2", f"--save-at=2:{written}",
                    *OVERRIDES, f"distributed.strategy={strategy}"], out, DEEPSPEED_ENV)
    result = _wait(process, out)
    calls = [json.loads(out.with_name(f"{out.name}.rank{rank}.json").read_text()) for rank in (0, 1)]
    order = ["full_state_dict_on_main", "full_state_dict_on_main", "optimizer_state", "checkpoint_bytes"]
    assert [c["call"] for c in calls[0]] == [c["call"] for c in calls[1]] == order
    assert [c["size"] for c in calls[1]] == [0, 0, 0, None]
    checkpoint = torch.load(written, weights_only=True)
    moments = checkpoint["optimizer"]["state"]  # per trained parameter: its step, exp_avg and exp_avg_sq
    assert [c["size"] for c in calls[0]] == [
        *(sum(t.numel() for t in result[part].values()) for part in ("student", "teacher")),
        sum(1 + 2 * checkpoint["student"][name].numel() for name in moments), written.stat().st_size]
    for part in ("student", "teacher"):
        assert checkpoint[part].keys() == result[part].keys()
        assert all(torch.equal(checkpoint[part][name], tensor) for name, tensor in result[part].items()), part
    assert {float(m["step"]) for m in moments.values()} == {2.0}


def _pretrain(out: Path, ranks: int, strategy: str, steps: int, log: str,
              records: Path | None = None, *overrides: str) -> subprocess.Popen:
    """``dinoflow pretrain --nproc RANKS`` (``strategy`` on 2 ranks, ``single`` on 1) on the 16
    images of ``out``'s sibling ``images``: a global batch of 8 on any world size, a checkpoint
    every 2 steps, every step's metrics tracked to a sqlite store in ``out``. With ``records``,
    torchrun starts the 2 ranks here, each through ``resume_ranks.py`` recording its reads there.
    ``overrides``: more config settings."""
    launch = ["--nproc", str(ranks)] if records is None else []
    runner = [sys.executable, "-m", "pipelines.cli"] if records is None else [*TORCHRUN, str(READS), str(records)]
    command = [*runner, "pretrain", *launch, "--config", "tiny", *SMALL,
               "data.kind=folder", f"data.uri={out.parent / 'images'}",
               f"distributed.strategy={strategy if ranks > 1 else 'single'}", "checkpoint_every=2",
               f"optim.batch_size={8 // ranks}", f"out={out}", f"max_steps={steps}", "tracking.metric_every=1",
               *overrides]
    return _run(command, out / log, {**DEEPSPEED_ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"})


def _runs(tmp_path: Path, *names: str) -> list[Path]:
    """Run folders next to a folder of 16 random 28 x 28 PNGs (``images``)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(16):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(images / f"{index:02d}.png")
    folders = [tmp_path / name for name in names]
    for folder in folders:
        folder.mkdir()
    return folders


def _finish(process: subprocess.Popen, out: Path, log: str) -> None:
    process.wait(timeout=240)
    assert process.returncode == 0, (out / log).with_suffix(".log").read_text()[-4000:]


def _latest(out: Path) -> dict:
    return load_latest_checkpoint(Storage(), str(out))


def _tracked_steps(out: Path) -> list[list[int]]:
    """The steps each MLflow run of ``out`` trained (logged metrics for), oldest run first: a run
    that resumed from step k starts at k + 1, where one that started over would start at 1."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              order_by=["attribute.start_time ASC"])
    return [sorted({m.step for m in client.get_metric_history(run.info.run_id, "lr")}) for run in runs]


def _kill_rank_once_a_checkpoint_exists(launch: subprocess.Popen, out: Path, rank: int) -> None:
    """SIGKILL the process of ``rank`` (a child of torchrun, a child of the CLI) as soon as the run
    has written its first checkpoint: a crash in the middle of the following steps."""
    pointer = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 240
    while not pointer.exists():
        assert launch.poll() is None, "the run ended before it wrote a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.02)
    for child in psutil.Process(launch.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "torch.distributed.run" not in child.cmdline():
                child.send_signal(signal.SIGKILL)
                return
        except psutil.Error:  # a short-lived helper process that has already gone
            continue
    raise AssertionError(f"no process of rank {rank} under the launch")


@pytest.mark.parametrize("strategy", ["fsdp2", "deepspeed"])
def test_a_killed_rank_ends_the_job_the_rerun_finishes_like_an_uninterrupted_run_and_goes_on_at_other_world_sizes(
        tmp_path: Path, strategy: str) -> None:
    """``dinoflow pretrain --nproc 2``: rank 1 is SIGKILLed once the step-2 checkpoint exists (a
    checkpoint every 2 of 8 steps); torchrun stops rank 0 and the command fails; the rerun resumes
    from the last whole checkpoint and its step-8 weights equal those of a run that was never
    killed (same world size: exact but for fp32 noise, 1e-6 absolute). Only the rerun's rank 0 reads
    the checkpoint: rank 1 gets the networks, the optimizer's moments and the run's settings and
    counters from it (every rank reading the file held a whole copy each: ~144 GB of host memory
    for a ViT-g's 8 ranks at every resume).

    Then the same run goes on through the engine's own save and restore at other world sizes: 1 rank
    (single) to step 9, a last checkpoint off the every-2 schedule, and 2 ranks again to 11. Each rank
    augments only its own images, so a run that changes world size sees other crops than one that
    does not: this part checks that it resumes and keeps counting (Adam's steps included), not the
    weights."""
    whole, crashed = _runs(tmp_path, "whole", "crashed")
    reference = _pretrain(whole, 2, strategy, 8, "launch")
    killed = _pretrain(crashed, 2, strategy, 8, "killed")
    _kill_rank_once_a_checkpoint_exists(killed, crashed, rank=1)
    killed.wait(timeout=240)
    log = (crashed / "killed.log").read_text()
    assert killed.returncode != 0, log[-4000:]
    assert "SIGKILL" in log, log[-4000:]
    saved = _latest(crashed)["step"]
    assert saved in (2, 4, 6)  # a whole checkpoint from before the crash, steps still to go
    records = tmp_path / "reads"  # the rerun's ranks record what they read (resume_ranks.py)
    resumed_from = crashed / "checkpoints" / f"step_{saved:09d}.pt"
    resumed_state = torch.load(resumed_from, weights_only=True)  # (the rerun deletes it once it saved 2 more)
    _finish(_pretrain(crashed, 2, strategy, 8, "rerun", records), crashed, "rerun")
    _finish(reference, whole, "launch")
    assert_read_by_rank_0_alone(records, resumed_from, resumed_state)

    assert _tracked_steps(crashed)[-1] == list(range(saved + 1, 9))  # the rerun resumed, not restarted
    want, got = _latest(whole), _latest(crashed)
    assert want["step"] == got["step"] == 8 and want["images_seen"] == got["images_seen"] == 8 * 8
    _assert_same_state(got, want, 1e-6)  # measured: 0.0 (bit-exact) under both strategies

    for ranks, steps in ((1, 9), (2, 11)):
        _finish(_pretrain(crashed, ranks, strategy, steps, f"launch{steps}"), crashed, f"launch{steps}")
        checkpoint = _latest(crashed)
        assert (checkpoint["step"], checkpoint["images_seen"]) == (steps, 8 * steps)
        steps_taken = {float(m["step"]) for m in checkpoint["optimizer"]["state"].values()}
        assert steps_taken == {float(steps)}  # Adam's bias correction continues from the checkpoint
    assert _tracked_steps(crashed)[-2:] == [[9], [10, 11]]  # each launch trained only its own steps
    # the heads the last (2-rank) launch wrote beside its backbone: the teacher's, gathered head by head,
    # as the checkpoint gathered them with the whole network
    written, teacher = find_heads(str(crashed), "auto", Storage()), _latest(crashed)["teacher"]
    assert written.heads.keys() == {name for name in teacher if not name.startswith("backbone.")}
    assert all(torch.equal(tensor, teacher[name]) for name, tensor in written.heads.items())


def recorded_reads(records: Path, rank: int) -> list[dict]:
    """What ``resume_ranks.py`` recorded in ``rank``, in order: ``{"read": uri}``, ``{"load": size, "by": caller}``."""
    log = records.with_name(f"{records.name}.rank{rank}.jsonl")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def assert_read_by_rank_0_alone(records: Path, checkpoint: Path, saved: dict | None = None) -> None:
    """Rank 0 read ``checkpoint`` (and its pointer) and unpickled it once, whole; rank 1 read nothing
    of the run's checkpoints and unpickled only the small tensors rank 0 broadcast as objects (the
    running centres, a step count per parameter: ``_load_from_bytes`` unpickles each storage).
    ``saved``: the checkpoint's contents, read before a run that went on deleted it."""
    reads = [recorded_reads(records, rank) for rank in (0, 1)]
    saved = saved if saved is not None else torch.load(checkpoint, weights_only=True)

    def loads(rank: int, pickled: bool) -> list[int]:
        return [e["load"] for e in reads[rank] if "load" in e and (e["by"] == "_load_from_bytes") == pickled]

    assert [e for e in reads[0] if "/checkpoints/" in e.get("read", "")] == [
        {"read": str(checkpoint.with_name("latest.json"))}, {"read": str(checkpoint)}]
    assert (loads(0, pickled=False), loads(0, pickled=True)) == ([size(saved)], [])
    assert [e for e in reads[1] if "/checkpoints/" in e.get("read", "")] == []
    assert loads(1, pickled=False) == []
    small = size(saved.get("objective", {})) + len(saved["optimizer"]["state"])  # fp32 elements
    assert sum(loads(1, pickled=True)) <= 4 * small  # the storages' bytes


@needs_fashion_mnist
def test_only_the_main_rank_reads_the_checkpoint_a_fine_tuning_run_resumes_from(tmp_path: Path) -> None:
    """``dinoflow finetune`` on 2 ranks (FSDP2; DeepSpeed's optimizer restore is the killed-rank test's)
    with an EMA, stopped at its step-2 checkpoint and resumed to step 3: rank 0 alone reads and
    unpickles the checkpoint, rank 1 gets the weights, the EMA and the optimizer's moments from it,
    and the run ends bit for bit where one never stopped ends."""
    strategy = "fsdp2"
    torch.manual_seed(0)
    weights = tmp_path / "backbone.safetensors"  # a small random backbone (patch 7, 28 px), as pretraining writes
    save_backbone(build_vit("vit_small", img_size=28, patch_size=7, embed_dim=64, depth=3, num_heads=4,
                            layerscale_init=1.0), str(weights))
    env = {**DEEPSPEED_ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def finetune(out: Path, steps: int, records: Path | None = None) -> None:
        runner = [sys.executable, "-m", "pipelines.cli", "finetune", "--nproc", "2"] if records is None else [
            *TORCHRUN, str(READS), str(records), "finetune"]
        process = _run([*runner, "--weights", str(weights), f"out={out}", "data.train_limit=512",
                        "data.test_limit=200", "optim.epochs=1", "optim.batch_size=32", "ema_decay=0.6",
                        f"max_steps={steps}", f"distributed.strategy={strategy}"], out, env)
        process.wait(timeout=300)
        assert process.returncode == 0, out.with_suffix(".log").read_text()[-4000:]

    straight, stopped, records = tmp_path / "straight", tmp_path / "stopped", tmp_path / "reads"
    finetune(straight, 3)
    finetune(stopped, 2)
    finetune(stopped, 3, records)

    assert_read_by_rank_0_alone(records, stopped / "checkpoints" / "step_000000002.pt")
    want, got = _latest(straight), _latest(stopped)
    assert want["step"] == got["step"] == 3
    for part in ("model", "ema"):
        assert want[part].keys() == got[part].keys()
        assert all(torch.equal(got[part][name], value) for name, value in want[part].items()), part
    for name, moments in want["optimizer"]["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][name][key], value) for key, value in moments.items()), name


def test_single_process_optimizer_state_is_keyed_by_name_and_reads_older_checkpoints() -> None:
    from dinoflow.config import PretrainConfig, load_config
    from trainer.engine import build_networks
    from trainer.optim import param_groups
    from trainer.strategy import Strategy

    cfg = load_config(PretrainConfig, "tiny", SMALL)
    student, _ = build_networks(cfg)
    optimizer = torch.optim.AdamW(param_groups(student, cfg))
    for parameter in student.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    strategy = Strategy()
    by_name = strategy.optimizer_state(student, optimizer)
    assert "backbone.blocks.0.attn.qkv.weight" in by_name["state"]
    for state in (by_name, optimizer.state_dict()):  # this format, and torch's (older checkpoints)
        fresh = torch.optim.AdamW(param_groups(student, cfg))
        strategy.load_optimizer_state(student, fresh, state)
        for want, got in zip(optimizer.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
            for key in want:
                assert torch.equal(got[key], want[key])


def _load_whole_on_rank(rank: int, port: int, out: str) -> None:
    """One of 2 gloo ranks: a Linear loaded by ``load_whole`` from rank 0's state, whole then without
    its bias; what each rank got (its weights, or the error it raised) written to ``out``/rank<R>.json."""
    import os

    from torch import nn

    from dinoflow.config import DistributedConfig
    from trainer.strategy import build_strategy

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    strategy = build_strategy(DistributedConfig(strategy="fsdp2", timeout_seconds=60), torch.device("cpu"))
    result: dict = {}
    torch.manual_seed(rank)  # the ranks' modules differ before the load
    module = nn.Linear(3, 2)
    whole = {"weight": torch.arange(6.0).view(2, 3), "bias": torch.tensor([7.0, 8.0])}
    strategy.load_whole(module, whole if rank == 0 else None)
    result["loaded"] = [module.weight.flatten().tolist(), module.bias.tolist()]
    try:
        strategy.load_whole(nn.Linear(3, 2), {"weight": whole["weight"]} if rank == 0 else None)
    except RuntimeError as err:
        result["refused"] = str(err)
    try:
        load_latest_checkpoint(Storage(), str(Path(out, "run")), strategy)
    except Exception as err:  # noqa: BLE001 - whatever each rank raised, compared by the test
        result["unread"] = f"{type(err).__name__}: {err}"
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_a_checkpoint_the_main_rank_cannot_load_is_refused_on_every_rank(tmp_path: Path) -> None:
    """``load_whole`` (FSDP2 and DeepSpeed): the main rank's tensors reach the other rank; a state the
    module does not take (a missing key) raises on every rank, the main rank's error named, where the
    others waited in the tensors' broadcast until torchrun stopped them (or the group's timeout). So
    does a checkpoint file the main rank cannot read (cut short)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"step": 2, "student": {"w": torch.ones(64)}}, buffer)
    (checkpoints / "step_00000002.pt").write_bytes(buffer.getvalue()[:-100])  # cut short
    (checkpoints / "latest.json").write_text(json.dumps({"file": "step_00000002.pt"}))
    mp.spawn(_load_whole_on_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0]["loaded"] == results[1]["loaded"] == [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [7.0, 8.0]]
    assert 'Missing key(s) in state_dict: "bias"' in results[0]["refused"]
    assert results[1]["refused"] == ("the main rank could not load the checkpoint: "
                                     f"RuntimeError: {results[0]['refused']}")
    assert results[0]["unread"].startswith(f"ValueError: {checkpoints / 'step_00000002.pt'}: not a tensor-only torch "
                                           "checkpoint (")
    assert results[1]["unread"] == f"RuntimeError: the main rank could not read the latest checkpoint: " \
                                   f"{results[0]['unread']}"


def _init_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A pretraining run's released files in ``folder`` for the tiny recipe with ``SMALL``: a random
    network's backbone (``backbone.safetensors``) and heads with non-zero centres (``heads.safetensors``),
    of another seed than the runs' own; returns the network's state, then the centres' under ``objective.``."""
    from dinoflow.config import PretrainConfig, load_config
    from dinoflow.run_files import BACKBONE_FILE, HEADS_FILE
    from trainer.engine import Objective, build_networks
    from trainer.models.head_weights import network_heads, save_heads

    cfg = load_config(PretrainConfig, "tiny", SMALL)
    torch.manual_seed(123)
    network, objective = build_networks(cfg)[1], Objective(cfg)
    for centre in objective.buffers():
        centre.normal_()
    folder.mkdir()
    save_backbone(network.backbone, str(folder / BACKBONE_FILE))
    save_heads(network_heads(network), objective.state_dict(), str(folder / HEADS_FILE), Storage())
    return {**network.state_dict(), **{f"objective.{k}": v for k, v in objective.state_dict().items()}}


def _reads_of(records: Path, rank: int, folder: Path) -> list[dict]:
    """What ``rank`` read (whole, ``read``, or a range of, ``range``) of the files in ``folder``."""
    return [e for e in recorded_reads(records, rank)
            if e.get("read", e.get("range", "")).startswith(f"{folder}/")]


def test_only_the_main_rank_reads_the_weights_a_pretraining_run_starts_from(tmp_path: Path) -> None:
    """``dinoflow pretrain`` on 2 ranks (FSDP2) from ``init_weights`` (a run's backbone and heads):
    rank 0 alone reads them, once each (every rank read them: a ViT-g training dump's several GB on each
    of a node's 8 ranks); rank 1 receives them. Its one step, at the warm-up's lr 0, leaves the student
    where it started, so the checkpoint gathered from both ranks' shards holds the weights exactly: rank
    1's shards started from them too."""
    (run,) = _runs(tmp_path, "run")
    init, records = tmp_path / "init", tmp_path / "reads"
    saved = _init_weights(init)
    _finish(_pretrain(run, 2, "fsdp2", 1, "launch", records, f"init_weights={init}"), run, "launch")
    assert _reads_of(records, 0, init) == [{"read": str(init / "backbone.safetensors")},
                                           {"read": str(init / "heads.safetensors")}]
    assert _reads_of(records, 1, init) == []
    checkpoint = _latest(run)
    assert checkpoint["step"] == 1
    for part in ("student", "teacher"):
        assert checkpoint[part].keys() == {k for k in saved if not k.startswith("objective.")}
        assert all(torch.equal(tensor, saved[name]) for name, tensor in checkpoint[part].items()), part


def _start_on_rank(rank: int, port: int, folder: str) -> None:
    """One of 2 gloo ranks (FSDP2) starting networks of its own seed from the weights in ``folder``
    (``init``, :func:`_init_weights`): a pretraining student and centres (``start_from_weights``), then
    a fine-tuning backbone (``load_for_finetuning``), then each from weights that do not fit or are
    not there. Writes ``rank<R>.pt``: the states loaded, what was returned, the files read, the errors."""
    import os

    from dinoflow.config import DistributedConfig, FinetuneConfig, PretrainConfig, load_config
    from trainer.engine import Objective, build_networks, start_from_weights
    from trainer.finetune import load_for_finetuning
    from trainer.strategy import build_strategy

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    strategy = build_strategy(DistributedConfig(strategy="fsdp2", timeout_seconds=60), torch.device("cpu"))
    reads: list[str] = []

    class Recorded(Storage):
        def read_bytes(self, uri: str) -> bytes:
            reads.append(uri)
            return super().read_bytes(uri)

    storage, init, result = Recorded(), Path(folder, "init"), {}
    torch.manual_seed(rank)  # the ranks' networks differ before the start
    cfg = load_config(PretrainConfig, "tiny", [*SMALL, f"init_weights={init}"])
    student, objective = build_networks(cfg)[0], Objective(cfg)
    result["heads_from"] = start_from_weights(cfg, student, objective, storage, strategy)
    result["pretraining"] = {**student.state_dict(), **{f"objective.{k}": v for k, v in objective.state_dict().items()}}
    result["pretraining reads"], reads[:] = list(reads), []
    tuning = load_config(FinetuneConfig, "finetune-tiny", [f"weights={init}", "drop_path_rate=0"])
    result["finetuning"] = load_for_finetuning(tuning, storage, strategy).state_dict()
    result["finetuning reads"] = list(reads)
    misfit = load_config(PretrainConfig, "tiny", [*SMALL, f"init_weights={init}", "heads.num_prototypes=32"])
    for name, start in (("misfit", lambda: start_from_weights(misfit, build_networks(misfit)[0], None, storage,
                                                                 strategy)),
                        ("missing", lambda: load_for_finetuning(
                            tuning.model_copy(update={"weights": f"{init}/gone.safetensors"}), storage, strategy))):
        try:
            start()
        except Exception as err:  # noqa: BLE001 - whatever each rank raised, recorded
            result[name] = f"{type(err).__name__}: {err}"
    torch.save(result, Path(folder, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_the_weights_a_run_starts_from_reach_every_rank_from_the_main_one_and_so_does_its_error(
        tmp_path: Path) -> None:
    """``start_from_weights`` and ``load_for_finetuning`` on 2 gloo ranks whose networks differ at first:
    rank 0 alone reads the weights, and every rank ends with them (the pretraining backbone, heads and
    centres; the fine-tuning backbone) and with where the heads came from. Weights the main rank cannot
    fit (heads of other sizes) or read (no file) raise on every rank, the main rank's error named, where
    the other ranks would wait for it in the tensors' broadcast."""
    import socket

    import torch.multiprocessing as mp

    saved = _init_weights(tmp_path / "init")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_start_on_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    heads = str(tmp_path / "init" / "heads.safetensors")
    assert results[0]["heads_from"] == results[1]["heads_from"] == heads
    assert results[0]["pretraining reads"] == [str(tmp_path / "init" / "backbone.safetensors"), heads]
    assert results[0]["finetuning reads"] == [str(tmp_path / "init" / "backbone.safetensors")]
    assert results[1]["pretraining reads"] == results[1]["finetuning reads"] == []
    backbone = {k.removeprefix("backbone."): v for k, v in saved.items() if k.startswith("backbone.")}
    for result in results:
        assert result["pretraining"].keys() == saved.keys()
        assert all(torch.equal(tensor, saved[name]) for name, tensor in result["pretraining"].items())
        assert result["finetuning"].keys() == backbone.keys()
        assert all(torch.equal(tensor, backbone[name]) for name, tensor in result["finetuning"].items())
    assert results[0]["misfit"].startswith(f"ValueError: init heads {heads} do not fit the recipe's heads: "
                                           "heads.num_prototypes = 32 (the heads: 64)")
    assert results[1]["misfit"] == (f"RuntimeError: the main rank could not start from init_weights "
                                    f"{tmp_path / 'init'}: {results[0]['misfit']}")
    gone = f"{tmp_path / 'init'}/gone.safetensors"
    assert gone in results[0]["missing"]
    assert results[1]["missing"] == f"RuntimeError: the main rank could not read the weights {gone}: " + \
        results[0]["missing"]


def _finetune_on_two_ranks(weights: Path, out: Path, steps: int, records: Path | None = None) -> None:
    """``dinoflow finetune --nproc 2`` (FSDP2, with an EMA) from ``weights`` into ``out`` to step
    ``steps`` on 512 Fashion-MNIST images, 200 to test; with ``records``, torchrun starts the ranks
    here, each through ``resume_ranks.py`` recording its reads there."""
    runner = [sys.executable, "-m", "pipelines.cli", "finetune", "--nproc", "2"] if records is None else [
        *TORCHRUN, str(READS), str(records), "finetune"]
    env = {**DEEPSPEED_ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{out.parent / 'mlflow.db'}"}
    process = _run([*runner, "--weights", str(weights), f"out={out}", "data.train_limit=512", "data.test_limit=200",
                    "optim.epochs=1", "optim.batch_size=32", "ema_decay=0.6", f"max_steps={steps}",
                    "distributed.strategy=fsdp2"], out, env)
    process.wait(timeout=300)
    assert process.returncode == 0, out.with_suffix(".log").read_text()[-4000:]


@needs_fashion_mnist
def test_only_the_main_rank_reads_the_weights_a_fine_tuning_run_starts_from_and_no_tensor_of_them_on_resume(
        tmp_path: Path) -> None:
    """``dinoflow finetune`` on 2 ranks (FSDP2): rank 0 alone reads the backbone it starts from (every
    rank read it); rank 1 receives it. Its first step, at the warm-up's lr 0, leaves the weights and
    their EMA where they started, so the checkpoint gathered from both ranks' shards holds the backbone
    exactly. Resumed, no rank reads the backbone's tensors (the checkpoint's replace them): rank 0 reads
    the architecture in its header alone, rank 1 nothing."""
    torch.manual_seed(0)
    weights = tmp_path / "backbone.safetensors"  # a small random backbone (patch 7, 28 px), as pretraining writes
    backbone = build_vit("vit_small", img_size=28, patch_size=7, embed_dim=64, depth=3, num_heads=4,
                         layerscale_init=1.0)
    save_backbone(backbone, str(weights))
    out, started, resumed = tmp_path / "run", tmp_path / "started", tmp_path / "resumed"
    _finetune_on_two_ranks(weights, out, 1, started)
    assert [e for e in recorded_reads(started, 0) if e.get("read") == str(weights)] == [{"read": str(weights)}]
    assert _reads_of(started, 1, tmp_path) == []
    first = _latest(out)
    assert first["step"] == 1
    for part in ("model", "ema"):
        assert all(torch.equal(first[part][f"backbone.{name}"], value) for name, value in backbone.state_dict().items())

    _finetune_on_two_ranks(weights, out, 2, resumed)
    assert _latest(out)["step"] == 2
    header = [e for e in _reads_of(resumed, 0, tmp_path) if "checkpoints" not in e.get("read", "")]
    assert {e.get("range") for e in header} == {str(weights)}
    header_size = 8 + int.from_bytes(weights.read_bytes()[:8], "little")  # its length, then its JSON
    assert sum(e["size"] for e in header) == header_size < weights.stat().st_size / 50
    assert _reads_of(resumed, 1, tmp_path) == []


def test_a_fine_tuning_run_of_weights_that_save_no_architecture_resumes_without_reading_them(tmp_path: Path) -> None:
    """Meta's ``.pth`` layout saves no architecture (a fresh run infers it from the tensors' shapes): a
    resumed run infers it from its checkpoint's backbone, the same shapes, and reads nothing of the
    weights. It builds the backbone a fresh run builds, for the checkpoint's tensors to load into."""
    from dinoflow.config import FinetuneConfig, load_config
    from trainer.finetune import load_for_finetuning
    from trainer.models.classifier import Classifier
    from trainer.strategy import Strategy

    torch.manual_seed(0)
    weights = tmp_path / "backbone.pth"
    torch.save(build_vit("vit_small", img_size=56, patch_size=7, embed_dim=128, depth=2, num_heads=2,
                         layerscale_init=1.0).state_dict(), weights)
    reads: list[str] = []

    class Recorded(Storage):
        def read_bytes(self, uri: str) -> bytes:
            reads.append(uri)
            return super().read_bytes(uri)

        def read_range(self, uri: str, start: int, size: int) -> bytes:
            reads.append(uri)
            return super().read_range(uri, start, size)

    cfg = load_config(FinetuneConfig, "finetune-tiny", [f"weights={weights}"])
    fresh = load_for_finetuning(cfg, Recorded())
    assert reads == [str(weights)]
    checkpoint = {"model": Classifier(fresh, 10, cfg.head_input).state_dict()}
    reads.clear()
    resumed = load_for_finetuning(cfg, Recorded(), Strategy(), checkpoint)
    assert reads == []
    assert resumed.arch_kwargs == fresh.arch_kwargs
    Classifier(resumed, 10, cfg.head_input).load_state_dict(checkpoint["model"])
