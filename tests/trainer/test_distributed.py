"""Distributed pretraining: 2 ranks x B images train like 1 process x 2B images.

The two-rank runs are real: ``torchrun`` starts 2 processes that meet over gloo on 127.0.0.1
(``--standalone`` picks a free port) and shard student and teacher with FSDP2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinoflow.config import ConfigError, PretrainConfig, load_config
from trainer.batches import ResumableBatches, make_batch
from trainer.data.augment import MultiCrop
from trainer.strategy import Strategy, build_strategy

HELPER = Path(__file__).with_name("distributed_steps.py")
ROOT = HELPER.parents[2]
STEPS, GLOBAL_BATCH = 20, 16
# no stochastic depth (its draws depend on the split) and no KoLeo (per rank by design, as in the
# original: its nearest neighbour is searched among a rank's images, so 2 x B != 1 x 2B)
SMALL = ["model.embed_dim=32", "model.depth=3", "model.num_heads=2", "model.drop_path_rate=0",
         "heads.num_prototypes=64", "heads.hidden_dim=64", "heads.bottleneck_dim=16", "heads.ibot_num_prototypes=48",
         "crops.num_local_crops=2", "loss.koleo_weight=0", "optim.clip_grad=0.5"]
LOSS_TOLERANCE = 1e-5  # absolute, per term and step; fp32 sums in another order drift by ~1e-7
PARAM_TOLERANCE = 1e-5  # absolute, every element of every parameter after the last step


def _run(command: list[str], out: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    log = open(out.with_suffix(".log"), "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(process: subprocess.Popen, out: Path) -> dict:
    process.wait(timeout=240)
    assert process.returncode == 0, out.with_suffix(".log").read_text()[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize(("centering", "separate_head"), [("softmax", False), ("sinkhorn_knopp", True)])
def test_two_ranks_train_like_one_process_with_the_global_batch(tmp_path: Path, centering: str,
                                                                separate_head: bool) -> None:
    overrides = [*SMALL, f"loss.centering={centering}", f"heads.ibot_separate_head={separate_head}"]
    single_out, sharded_out = tmp_path / "single.pt", tmp_path / "fsdp2.pt"
    single = _run([sys.executable, str(HELPER), str(single_out), str(GLOBAL_BATCH), str(STEPS), *overrides,
                   "distributed.strategy=single"], single_out)
    sharded = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(HELPER), str(sharded_out), str(GLOBAL_BATCH), str(STEPS), *overrides,
                    "distributed.strategy=fsdp2"], sharded_out)
    want, got = _wait(single, single_out), _wait(sharded, sharded_out)

    assert (want["world_size"], got["world_size"]) == (1, 2)
    assert len(want["losses"]) == len(got["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(want["losses"], got["losses"])):
        for term in ("dino", "ibot", "total"):
            assert abs(a[term] - b[term]) < LOSS_TOLERANCE, f"step {step} {term}: {a[term]} vs {b[term]}"
    assert want["losses"][-1]["total"] < want["losses"][0]["total"]  # it trained
    for part in ("student", "teacher", "objective"):
        assert want[part].keys() == got[part].keys()
        for name, tensor in want[part].items():
            torch.testing.assert_close(got[part][name], tensor, rtol=0, atol=PARAM_TOLERANCE, msg=f"{part}.{name}")
    # the teacher moved by EMA (it is not a copy of the student, nor its initial self)
    assert not torch.allclose(want["teacher"]["backbone.blocks.0.attn.qkv.weight"],
                              want["student"]["backbone.blocks.0.attn.qkv.weight"])


def test_ranks_read_distinct_slices_of_the_global_batch() -> None:
    whole = iter(ResumableBatches(50, 8, seed=3))
    ranks = [iter(ResumableBatches(50, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    for _ in range(14):  # crosses data epochs (6 global batches each)
        parts = [next(r) for r in ranks]
        assert parts[0] + parts[1] == next(whole)
        assert not set(parts[0]) & set(parts[1])
    resumed = iter(ResumableBatches(50, 4, seed=3, start=9, rank=1, world_size=2))
    again = iter(ResumableBatches(50, 4, seed=3, rank=1, world_size=2))
    assert [next(again) for _ in range(12)][9:] == [next(resumed) for _ in range(3)]
    with pytest.raises(ValueError, match=r"smaller than one batch \(16\)"):
        ResumableBatches(12, 8, seed=0, world_size=2)


class _Rank(Strategy):
    def __init__(self, rank: int, world_size: int) -> None:
        self._rank, self._world_size = rank, world_size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size


def test_masks_are_the_global_batch_rows_of_the_rank() -> None:
    """A global batch of 8: one process's masks, and 2 ranks' of 4 each, its blocks of rows."""
    one, two = (load_config(PretrainConfig, "tiny", [*SMALL, "loss.mask_probability=0.5", f"optim.batch_size={size}"])
                for size in (8, 4))
    images = (torch.rand(8, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    crop = MultiCrop(one.crops)
    whole = make_batch(images, 4, one, crop).masks.view(2, 8, -1)  # (crop, image, patch)
    for rank in range(2):
        part = make_batch(images[:4], 4, two, crop, _Rank(rank, 2)).masks.view(2, 4, -1)
        assert torch.equal(part, whole[:, 4 * rank: 4 * rank + 4])


def test_a_rank_short_of_its_bad_images_keeps_its_rows_of_the_global_masks() -> None:
    """Rank 1 of 2 decoded 3 of its 4 images: it keeps the first 3 rows of its block of the global
    batch's masks (drawn for 2 x 4 images, as rank 0 draws them), so the masking ratios are spread
    over the global batch as on every rank, and its masked-patch index keeps the padded length of a
    full batch (static shapes); one process short of an image keeps that length too."""
    cfg = load_config(PretrainConfig, "tiny", [*SMALL, "loss.mask_probability=0.5", "optim.batch_size=4"])
    images = (torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    crop = MultiCrop(cfg.crops)
    full = [make_batch(images, 4, cfg, crop, _Rank(rank, 2)) for rank in range(2)]
    short = make_batch(images[:3], 4, cfg, crop, _Rank(1, 2))
    assert torch.equal(short.masks.view(2, 3, -1), full[1].masks.view(2, 4, -1)[:, :3])
    assert len(short.mask_index) == len(full[1].mask_index) == len(full[0].mask_index)
    alone = [make_batch(images[:count], 4, cfg, crop) for count in (4, 3, 1)]
    assert len({len(batch.mask_index) for batch in alone}) == 1
    assert torch.equal(alone[1].masks.view(2, 3, -1), alone[0].masks.view(2, 4, -1)[:, :3])


def test_strategy_is_validated_config_and_needs_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"distributed\.strategy = 'zero9'"):
        load_config(PretrainConfig, "tiny", ["distributed.strategy=zero9"])
    assert type(build_strategy(load_config(PretrainConfig, "tiny").distributed, torch.device("cpu"))) is Strategy
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(PretrainConfig, "tiny", ["distributed.strategy=fsdp2"])
    with pytest.raises(RuntimeError, match="start it with torchrun"):
        build_strategy(cfg.distributed, torch.device("cpu"))


def test_an_evaluation_longer_than_the_collective_timeout_finishes(tmp_path: Path) -> None:
    """Rank 0 evaluates alone, during training and at the end, for longer than the run's collective
    timeout (3 s): the other rank waits for it (:meth:`Strategy.on_main`) instead of timing out in
    its next collective, which killed the run, and again at every resume."""
    out = tmp_path / "run"
    done = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(HELPER.with_name("slow_main_rank.py")), str(out), "6"], tmp_path / "run.pt")
    done.wait(timeout=240)
    log = (tmp_path / "run.log").read_text()
    assert done.returncode == 0, log[-4000:]
    assert "finished 2 {'evaluated_at': 2.0}" in log
    assert (out / "backbone.safetensors").exists() and (out / "summary.json").exists()
