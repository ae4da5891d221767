"""A training run's end judges its bad images as a sample of the data (``BadImageTracker.check_run_end``):
a short fine-tuning or distillation run with one broken file passes the default 1 % limit. (Pretraining's run:
``tests/trainer/test_engine.py``; the rule: ``tests/trainer/data/test_datasets.py``.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinoflow.config import DistillConfig, FinetuneConfig, PretrainConfig, load_config
from dinoflow.storage import Storage
from tests.evaluators.test_classification import write_folders
from tests.trainer.test_engine import TINY, _RandomImages
from trainer.data.datasets import collate_samples
from trainer.distill import distill
from trainer.engine import build_networks
from trainer.finetune import finetune
from trainer.models.hub import save_backbone
from trainer.models.vit import build_vit


def test_a_finetuning_run_judges_a_part_of_an_epoch_as_a_sample_and_an_epoch_as_the_data(tmp_path: Path) -> None:
    """49 training images, one broken (2 %), 7 steps of 7 an epoch. Six steps read 42 of them, the
    broken one among them: a sample, ending before the limit is judged (3,000 images at 1 %), within
    the 30 bad images it allows there (the fraction of its 42 images failed it). A whole epoch read
    them all: their 2 % is the data's, above the 1 % limit, as the evaluations judge a folder."""
    torch.manual_seed(0)
    weights = tmp_path / "pretrained" / "backbone.safetensors"
    weights.parent.mkdir()
    save_backbone(build_vit("vit_small", img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2,
                            layerscale_init=1.0), str(weights))
    write_folders(tmp_path / "data", {"cat": (24, 4), "dog": (24, 4)})
    (tmp_path / "data" / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    def run(name: str, *more: str) -> dict:
        cfg = load_config(FinetuneConfig, "finetune-tiny", [f"weights={weights}", f"data.uri={tmp_path / 'data'}",
                                                            f"out={tmp_path / name}", "data.test_limit=0",
                                                            "optim.batch_size=7", "optim.epochs=1", *more])
        assert cfg.data.max_bad_fraction == 0.01
        return finetune(cfg, Storage())

    summary = run("part", "max_steps=6")
    assert (summary["steps"], summary["bad_images"]["seen"], summary["bad_images"]["bad"]) == (6, 42, 1)
    with pytest.raises(ValueError, match=r"1 of 49 images \(2.0%\) could not be decoded, more than the allowed "
                                         r"max_fraction 1.0%; examples: .*broken.png"):
        run("epoch")


def test_a_short_distillation_run_with_one_broken_file_passes_the_default_limit(tmp_path: Path) -> None:
    """Three steps of 8 read the 24 images once, one of them broken (4.2 %): within the 30 bad
    images the default limit allows before it is judged at 3,000."""
    torch.manual_seed(0)
    teacher = build_networks(load_config(PretrainConfig, "tiny", TINY))[1]
    cfg = load_config(DistillConfig, "distill-tiny", [
        f"teacher.uri={tmp_path / 'teacher'}", f"out={tmp_path / 'run'}", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "model.patch_size=7", "crops.local_crop_size=14", "crops.num_local_crops=2",
        "heads.num_prototypes=64", "heads.hidden_dim=64", "heads.bottleneck_dim=16", "optim.batch_size=8",
        "max_steps=3", "eval.every_steps=0"])
    assert cfg.data.max_bad_fraction == 0.01
    summary = distill(cfg, _RandomImages(), collate_samples, Storage(), teacher=(teacher, None))
    assert (summary["steps"], summary["bad_images"]["seen"], summary["bad_images"]["bad"]) == (3, 24, 1)
