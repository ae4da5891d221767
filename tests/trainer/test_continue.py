"""Continued pretraining: a run writes its teacher's heads and centres beside its backbone, and a
run started from those weights starts its heads from them (``init_heads=auto``), unless told
``init_heads=fresh``; heads that do not fit the recipe are named before any step."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from dinoflow.storage import Storage
from dinoflow.tracking import NullTracker
from tests.trainer.test_engine import _RandomImages, config
from trainer.checkpoints import load_latest_checkpoint
from trainer.data.datasets import collate_samples
from trainer.engine import Objective, build_networks, pretrain, start_from_weights
from trainer.models.head_weights import find_heads

RUN = ["max_steps=2", "data.max_bad_fraction=0.1", "loss.centering=softmax", "heads.ibot_separate_head=true",
       "heads.ibot_num_prototypes=48"]


class Tags(NullTracker):
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)


def heads_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("backbone.")}


def largest_gap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("first") / "run"
    pretrain(config(f"out={out}", *RUN), _RandomImages(), collate_samples, Storage())
    return out


def test_a_run_writes_its_teachers_heads_and_centres(first_run: Path) -> None:
    checkpoint = load_latest_checkpoint(Storage(), str(first_run))  # the reference: the last checkpoint
    found = find_heads(str(first_run), "auto", Storage())
    assert found is not None and found.uri == str(first_run / "heads.safetensors")
    teacher = heads_of(checkpoint["teacher"])
    assert set(found.heads) == set(teacher) and {k.split(".")[0] for k in teacher} == {"dino_head", "ibot_head"}
    assert largest_gap(found.heads, teacher) == 0
    assert set(found.centres) == set(checkpoint["objective"])
    assert largest_gap(found.centres, checkpoint["objective"]) == 0
    assert found.centres["dino_center.center"].abs().max() > 0  # two steps of softmax centring moved it


def test_a_run_from_those_weights_starts_from_their_heads(first_run: Path, tmp_path: Path) -> None:
    saved = find_heads(str(first_run), "auto", Storage())
    cfg = config(f"out={tmp_path / 'next'}", *RUN[1:], "max_steps=1", f"init_weights={first_run}", "seed=5")
    student, _ = build_networks(cfg)
    objective = Objective(cfg)
    assert start_from_weights(cfg, student, objective, Storage()) == saved.uri
    assert largest_gap(heads_of(student.state_dict()), saved.heads) == 0
    assert largest_gap(objective.state_dict(), saved.centres) == 0
    # through the loop: one EMA step (momentum 0.99) from the saved heads, far from seed 5's own
    tags = Tags()
    summary = pretrain(cfg, _RandomImages(), collate_samples, Storage(), tags)
    assert tags.tags["init_heads"] == saved.uri
    continued = find_heads(str(tmp_path / "next"), "auto", Storage())
    torch.manual_seed(cfg.seed)  # as the run seeds its networks
    random_init = heads_of(build_networks(cfg)[1].state_dict())
    assert summary["heads"] == continued.uri
    assert largest_gap(continued.heads, saved.heads) < 0.02 * largest_gap(random_init, saved.heads)
    # init_heads=fresh: the backbone from the weights, the heads the seed's own
    fresh = cfg.model_copy(update={"out": str(tmp_path / "fresh"), "init_heads": "fresh"})
    tags = Tags()
    pretrain(fresh, _RandomImages(), collate_samples, Storage(), tags)
    assert tags.tags["init_heads"] == "fresh"
    restarted = find_heads(str(tmp_path / "fresh"), "auto", Storage())
    assert largest_gap(restarted.heads, random_init) < 0.02 * largest_gap(random_init, saved.heads)


def test_heads_that_do_not_fit_the_recipe_are_named_before_any_step(first_run: Path, tmp_path: Path) -> None:
    other = config(f"out={tmp_path / 'misfit'}", *RUN, "heads.num_prototypes=32", "heads.ibot_num_prototypes=40",
                   f"init_weights={first_run}")
    with pytest.raises(ValueError) as failure:
        pretrain(other, _RandomImages(), collate_samples, Storage())
    assert str(failure.value) == (
        f"init heads {first_run / 'heads.safetensors'} do not fit the recipe's heads: heads.num_prototypes = 32 "
        "(the heads: 64); heads.ibot_num_prototypes = 40 (the heads: 48); set these to the heads' values, or "
        "init_heads=fresh for new heads")
    assert not (tmp_path / "misfit").exists()
    fresh = other.model_copy(update={"init_heads": "fresh"})
    assert pretrain(fresh, _RandomImages(), collate_samples, Storage())["steps"] == 2


def test_a_training_dumps_heads_start_the_run_and_its_centres_start_at_zero(first_run: Path, tmp_path: Path) -> None:
    checkpoint = load_latest_checkpoint(Storage(), str(first_run))
    dump = tmp_path / "teacher_checkpoint.pth"  # the original's layout: teacher wrapper, module. prefixes
    torch.save({"teacher": {f"module.{k}": v for k, v in checkpoint["teacher"].items()}}, dump)
    cfg = config(*RUN, f"init_weights={dump}", "init_weights_source=training", "seed=5")
    student, _ = build_networks(cfg)
    objective = Objective(cfg)
    reads: list[str] = []

    class Counted(Storage):
        def read_bytes(self, uri: str) -> bytes:
            reads.append(uri)
            return super().read_bytes(uri)

    assert start_from_weights(cfg, student, objective, Counted()) == str(dump)
    assert reads == [str(dump)]  # the dump holds backbone and heads: read once (ViT-g's are GBs)
    assert largest_gap(student.state_dict(), checkpoint["teacher"]) == 0
    assert all(v.abs().max() == 0 for v in objective.state_dict().values())
