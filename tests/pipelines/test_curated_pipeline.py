"""``full`` with curation on kfp.local: a synthetic pool -> curate -> pretrain on the curated shards
-> evaluate on labelled class folders of one's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.components.test_curate import write_pool
from tests.evaluators.test_classification import CLASSES, write_folders
from tests.pipelines.test_pipelines import FAST, Runs


def test_full_curates_a_pool_and_pretrains_on_its_shards(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("curated")
    pool = write_pool(root / "pool", originals=48, copied=16)
    write_folders(root / "labelled", {"cat": (8, 3), "dog": (8, 3), "fish": (8, 3)})
    runs = Runs(root / "runs")
    # one's own pool and labels: no Fashion-MNIST (an empty data_source skips ingest)
    stages = runs.run("full", data_source="", pool_uri=str(root / "pool"), curation_dedup_threshold=0.85,
                      eval_data_uri=str(root / "labelled"), **{**FAST, "eval_tasks": ["knn"]})
    assert list(stages) == ["curate", "pretrain", "evaluate", "register"]
    assert all(s.status == "FINISHED" for s in stages.values())
    curate = stages["curate"].metrics
    assert curate["curation_pool"] == pool and 48 - 4 <= curate["curation_curated"] < pool
    assert stages["pretrain"].metrics["steps"] >= 1 and stages["pretrain"].metrics["images_seen"] >= 32
    config = yaml.safe_load(next(runs.kfp.glob("full-*/pretrain/backbone/config.yaml")).read_text())
    assert config["data"]["kind"] == "shards" and config["data"]["uri"].startswith(str(runs.root / "curated"))
    manifest = Path(config["data"]["uri"]) / "manifest.jsonl"
    assert len(manifest.read_text().splitlines()) == curate["curation_curated"]
    assert 0 < stages["evaluate"].metrics["knn_top1_k20"] <= 1
    report = json.loads(next(runs.root.glob("cache/evaluate/*/outputs/report.json")).read_text())
    assert report["tasks"]["classification"]["classes"] == list(CLASSES)  # judged on one's own labels
    assert "pixels_knn_top1_k20" not in stages["evaluate"].metrics  # Fashion-MNIST's baseline only
    assert stages["register"].tags["gate.verdict"] == "promoted"
    assert json.loads((Path(config["data"]["uri"]).parent / "report.json").read_text())["counts"]["pool"] == pool
