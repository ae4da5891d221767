"""End to end on a small synthetic pool: embedding resume, dedup, decontamination, shards, CLI."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from curation.embed import embed_dataset, pixel_embedder
from curation.kmeans import LevelConfig
from curation.pipeline import CurationConfig, run_curation
from curation.synthetic import make_copy_pool, removal_quality
from dinoflow.storage import Storage
from trainer.data.datasets import ImageFolderDataset, ShardDataset


def _write_pool(root: Path, originals: int = 120, copied: int = 40, seed: int = 0):
    pool = make_copy_pool(originals, copied, 2, seed=seed, size=48)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in zip(pool.names, pool.encoded):
        (root / name).write_bytes(data)
    return pool


def test_embedding_resumes_and_checks_meta(tmp_path: Path) -> None:
    storage = Storage()
    _write_pool(tmp_path / "pool", 30, 5)
    dataset = ImageFolderDataset(storage, str(tmp_path / "pool"), 48)
    out = str(tmp_path / "emb")
    first = embed_dataset(dataset, pixel_embedder(6), out, storage, batch_size=8, part_size=16)
    (tmp_path / "emb" / "part-00001.json").unlink()
    calls = []

    def counting(images):
        calls.append(len(images))
        return pixel_embedder(6)(images)

    again = embed_dataset(dataset, counting, out, storage, batch_size=8, part_size=16, embedder_name="pixels6")
    assert sum(calls) == 16  # only the missing part (rows 16-31) ran again
    assert again.ids == first.ids and np.array_equal(again.vectors, first.vectors)
    assert again.vectors.shape == (40, 108)
    try:
        embed_dataset(dataset, pixel_embedder(6), out, storage, part_size=8)
    except ValueError as err:
        assert "another run" in str(err)
    else:
        raise AssertionError("a changed part_size must be refused")


def test_run_curation_on_near_copies(tmp_path: Path) -> None:
    storage = Storage()
    pool = _write_pool(tmp_path / "pool")
    # an "evaluation set": exact copies of 5 originals that are not otherwise copied
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    singles = [i for i, k in enumerate(pool.kind) if (pool.group == pool.group[i]).sum() == 1][:5]
    for i in singles:
        (eval_dir / pool.names[i]).write_bytes(pool.encoded[i])
    config = CurationConfig(dedup_threshold=0.85, decontaminate_threshold=0.95, load_size=48, shard_size=50,
                            balance_target=60, balance_levels=(LevelConfig(20), LevelConfig(5, 2, 3)))
    report = run_curation(str(tmp_path / "pool"), str(tmp_path / "out"), storage, pixel_embedder(6), config,
                          (str(eval_dir),))
    counts = report["counts"]
    assert counts["pool"] == 200 and counts["decontaminated"] == 5
    assert counts["after_dedup"] >= 120 - 8 and counts["curated"] == 60
    assert report["balance"]["top_cluster_entropy_after"] > report["balance"]["top_cluster_entropy_before"] - 1e-9
    manifest = [json.loads(line) for line in (tmp_path / "out" / "shards" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 60 and {r["rule"] for r in manifest} == {"balanced"}
    assert all(len(r["clusters"]) == 2 for r in manifest)
    assert not {Path(r["id"]).name for r in manifest} & {pool.names[i] for i in singles}
    # shards read back with the training dataset, bytes unchanged
    shards = ShardDataset(storage, str(tmp_path / "out" / "shards"), 48)
    assert len(shards) == 60
    with tarfile.open(tmp_path / "out" / "shards" / "shard-00000.tar") as tar:
        first = tar.extractfile("000000000." + manifest[0]["member"].split(".")[1]).read()  # type: ignore[union-attr]
    assert first == (tmp_path / "pool" / Path(manifest[0]["id"]).name).read_bytes()
    for grid in ("kept", "removed", "duplicate_groups"):
        assert (tmp_path / "out" / "grids" / f"{grid}.png").read_bytes()[:4] == b"\x89PNG"


def test_dedup_quality_on_small_pool(tmp_path: Path) -> None:
    from curation.dedup import deduplicate
    from curation.embed import embed_images
    from trainer.data.datasets import decode_image
    import torch

    pool = make_copy_pool(300, 100, 2, seed=1, size=64)
    images = torch.stack([decode_image(b, 64) for b in pool.encoded])
    result = deduplicate(embed_images(images, pixel_embedder(6)), threshold=0.85)
    quality = removal_quality(result.keep, pool.group, result.component)
    assert quality["precision"] >= 0.95 and quality["recall"] >= 0.9


def test_cli_curate(tmp_path: Path) -> None:
    from pipelines.cli import app

    _write_pool(tmp_path / "pool", 40, 10)
    result = CliRunner().invoke(app, ["curate", "--pool", str(tmp_path / "pool"), "--out", str(tmp_path / "out"),
                                      "--dedup-threshold", "0.85", "--load-size", "48"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "report.json").exists()
    bad = CliRunner().invoke(app, ["curate", "--pool", "x", "--out", "y", "--dedup-threshold", "2"])
    assert bad.exit_code == 2
