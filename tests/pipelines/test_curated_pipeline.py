"""``full`` with curation on kfp.local: a synthetic pool -> curate -> pretrain on the curated shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.components.test_curate import write_pool
from tests.pipelines.test_pipelines import DATA, FAST, Runs


def test_full_curates_a_pool_and_pretrains_on_its_shards(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("curated")
    pool = write_pool(root / "pool", originals=48, copied=16)
    runs = Runs(root / "runs")
    stages = runs.run("full", data_source=DATA, pool_uri=str(root / "pool"), curation_dedup_threshold=0.85,
                      **{**FAST, "train_limit": 500, "test_limit": 200, "eval_tasks": ["knn"]})
    assert list(stages) == ["ingest", "curate", "pretrain", "evaluate", "register"]
    assert all(s.status == "FINISHED" for s in stages.values())
    curate = stages["curate"].metrics
    assert curate["curation_pool"] == pool and 48 - 4 <= curate["curation_curated"] < pool
    assert stages["pretrain"].metrics["steps"] >= 1 and stages["pretrain"].metrics["images_seen"] >= 32
    config = yaml.safe_load(next(runs.kfp.glob("full-*/pretrain/backbone/config.yaml")).read_text())
    assert config["data"]["kind"] == "shards" and config["data"]["uri"].startswith(str(runs.root / "curated"))
    manifest = Path(config["data"]["uri"]) / "manifest.jsonl"
    assert len(manifest.read_text().splitlines()) == curate["curation_curated"]
    assert 0 < stages["evaluate"].metrics["knn_top1_k20"] <= 1
    assert stages["register"].tags["gate.verdict"] == "promoted"
    assert json.loads((Path(config["data"]["uri"]).parent / "report.json").read_text())["counts"]["pool"] == pool
