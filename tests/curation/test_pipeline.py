"""End to end on a small synthetic pool: embedding resume, dedup, decontamination, seed retrieval,
shards, MLflow tracking, the CLI."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from curation.dedup import deduplicate
from curation.embed import backbone_embedder, embed_dataset, embed_images, pixel_embedder, pool_identity
from curation.kmeans import LevelConfig
from curation.pipeline import CurationConfig, run_curation
from curation.synthetic import COPY_KINDS, CopyPool, make_copy_pool, near_copy, removal_quality
from dinoflow.storage import Storage
from evaluators.synthetic import SceneConfig, make_scenes
from tests.evaluators.test_features import tiny_vit
from tests.trainer.data.test_shards import indexed_shards
from trainer.data.datasets import ImageFolderDataset, decode_image
from trainer.data.shards import ShardDataset


def _write_pool(root: Path, originals: int = 120, copied: int = 40, seed: int = 0) -> CopyPool:
    pool = make_copy_pool(originals, copied, 2, seed=seed, size=48)
    root.mkdir(parents=True, exist_ok=True)
    for name, data in zip(pool.names, pool.encoded):
        (root / name).write_bytes(data)
    return pool


def _write_fresh_copies(root: Path, pool: CopyPool, groups: list[int], originals: int = 120, seed: int = 0) -> None:
    """New near-copies (each kind in turn) of the originals ``groups``: images the pool never saw."""
    scenes = make_scenes(originals, seed, SceneConfig(size=48)).images
    rng = np.random.default_rng(123)
    root.mkdir(parents=True, exist_ok=True)
    for i, group in enumerate(groups):
        kind = COPY_KINDS[i % len(COPY_KINDS)]
        (root / f"fresh{group:04d}.{'jpg' if kind == 'jpeg' else 'png'}").write_bytes(near_copy(scenes[group], kind, rng))


def _copied_groups(pool: CopyPool, count: int) -> list[int]:
    """``count`` originals that have near-copies in the pool."""
    return [int(g) for g in np.unique(pool.group) if (pool.group == g).sum() == 3][:count]


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "shards" / "manifest.jsonl").read_text().splitlines()]


def _groups_of(records: list[dict], pool: CopyPool) -> set[int]:
    group = dict(zip(pool.names, pool.group.tolist()))
    return {group[Path(r["id"]).name] for r in records}


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


def test_embedding_refuses_a_folder_holding_another_pool_or_backbone(tmp_path: Path) -> None:
    """Two pools of one size, two backbones of one shape: a resumed pass trusted ``meta.json``'s
    count and embedder name, so it handed back the first pool's (or backbone's) embeddings. Now
    refused, naming the folder and what differs; the parts already there stay as they were."""
    storage = Storage()
    _write_pool(tmp_path / "a", 3, 0, seed=0)
    _write_pool(tmp_path / "b", 3, 0, seed=1)  # the same file names
    out = str(tmp_path / "emb")
    first = embed_dataset(ImageFolderDataset(storage, str(tmp_path / "a"), 48), pixel_embedder(6), out, storage)
    written = {p.name: p.read_bytes() for p in (tmp_path / "emb").iterdir()}
    with pytest.raises(ValueError, match=rf"^{re.escape(out)} holds embeddings of another run \(it differs in "
                                         r"keys_sha256\): give another output folder, or delete this one"):
        embed_dataset(ImageFolderDataset(storage, str(tmp_path / "b"), 48), pixel_embedder(6), out, storage)
    with pytest.raises(ValueError, match=r"differs in load_size \(48 there, 40 here\)"):
        embed_dataset(ImageFolderDataset(storage, str(tmp_path / "a"), 40), pixel_embedder(6), out, storage)
    assert {p.name: p.read_bytes() for p in (tmp_path / "emb").iterdir()} == written
    again = embed_dataset(ImageFolderDataset(storage, str(tmp_path / "a"), 48), pixel_embedder(6), out, storage)
    assert again.ids == first.ids
    model = tiny_vit()
    dataset = ImageFolderDataset(storage, str(tmp_path / "a"), 28)
    embed_dataset(dataset, backbone_embedder(model, size=28), str(tmp_path / "net"), storage)
    with torch.no_grad():
        model.cls_token.add_(1.0)  # other weights, the same name ("backbone28")
    with pytest.raises(ValueError, match=r"differs in weights_sha256\)"):
        embed_dataset(dataset, backbone_embedder(model, size=28), str(tmp_path / "net"), storage)


def test_the_pool_identity_of_shards_tells_their_images_apart(tmp_path: Path) -> None:
    storage = Storage()
    indexed_shards(storage, str(tmp_path / "a"), count=2, per_shard=3)
    indexed_shards(storage, str(tmp_path / "b"), count=2, per_shard=3)
    a, b = (pool_identity(ShardDataset(storage, str(tmp_path / name / "shards"), 48)) for name in "ab")
    assert a != b and a == pool_identity(ShardDataset(storage, str(tmp_path / "a" / "shards"), 48))
    with pytest.raises(TypeError, match="cannot tell which images a list holds"):
        pool_identity([])  # type: ignore[arg-type]


def test_a_rerun_with_another_eval_set_is_refused_at_its_embeddings(tmp_path: Path) -> None:
    """``embeddings/eval-<i>`` is named by position: a rerun with another set at that position
    would have decontaminated against the earlier set's embeddings."""
    storage = Storage()
    pool = _write_pool(tmp_path / "pool", 30, 5)
    _write_fresh_copies(tmp_path / "eval-a", pool, _copied_groups(pool, 3), originals=30)
    _write_fresh_copies(tmp_path / "eval-b", pool, _copied_groups(pool, 3), originals=30)
    config = CurationConfig(dedup_threshold=0.85, load_size=48, grid_examples=1)
    out = str(tmp_path / "out")
    run_curation(str(tmp_path / "pool"), out, storage, pixel_embedder(6), config, (str(tmp_path / "eval-a"),))
    with pytest.raises(ValueError, match=rf"^{re.escape(out)}/embeddings/eval-0 holds embeddings of another run"):
        run_curation(str(tmp_path / "pool"), out, storage, pixel_embedder(6), config, (str(tmp_path / "eval-b"),))


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("shard_size", 0, ">= 1"), ("dedup_k", 0, ">= 1"), ("part_size", -1, ">= 1"), ("load_size", 0, ">= 1"),
    ("grid_examples", -1, ">= 0"), ("dtype", "bfloat16", "one of float16, float32")])
def test_config_refuses_sizes_and_dtypes_it_cannot_run_with(name: str, value: object, allowed: str) -> None:
    """Before, ``shard_size=0`` failed in ``write_shards`` (``range() arg 3 must not be zero``)
    after the whole embedding and dedup pass."""
    with pytest.raises(ValueError, match=rf"^{name} must be {allowed}.*, got {value!r}$"):
        CurationConfig(**{name: value})  # type: ignore[arg-type]


def test_loaded_embeddings_are_the_parts_in_order_and_a_damaged_part_is_named(tmp_path: Path) -> None:
    """The float16 parts read into one float32 array part by part: the parts' own values in order
    (read here with numpy); a part with fewer vectors than its images is refused by name."""
    import pytest

    from curation.embed import load_embeddings

    storage = Storage()
    _write_pool(tmp_path / "pool", 30, 5)
    dataset = ImageFolderDataset(storage, str(tmp_path / "pool"), 48)
    out = tmp_path / "emb"
    made = embed_dataset(dataset, pixel_embedder(6), str(out), storage, batch_size=8, part_size=16)
    parts = sorted(out.glob("part-*.npy"))
    assert len(parts) == 3 and made.vectors.dtype == np.float32
    np.testing.assert_array_equal(made.vectors, np.concatenate([np.load(p) for p in parts]).astype(np.float32))
    np.save(parts[1], np.load(parts[1])[:-1])
    with pytest.raises(ValueError, match="part-00001.npy holds 15 vectors for 16 images: the part is damaged"):
        load_embeddings(str(out), storage)


def test_a_resumed_embedding_still_counts_the_bad_images_of_finished_parts(tmp_path: Path) -> None:
    """The bad-image limit holds over the whole pool: a rerun skipping the finished parts counted
    none of their bad images, so it passed a pool the first run refused, embedding the rest."""
    storage = Storage()
    _write_pool(tmp_path / "pool", 6, 0)
    for index in range(4):
        (tmp_path / "pool" / f"broken{index}.png").write_bytes(b"not an image")
    dataset = ImageFolderDataset(storage, str(tmp_path / "pool"), 48)
    for attempt in range(2):
        with pytest.raises(ValueError, match=r"4 of 10 images \(40\.0%\) could not be decoded"):
            embed_dataset(dataset, pixel_embedder(6), str(tmp_path / "emb"), storage, batch_size=4, part_size=5)
        assert len(list((tmp_path / "emb").glob("part-*.json"))) == 2  # both parts written by the first run
    kept = embed_dataset(dataset, pixel_embedder(6), str(tmp_path / "emb"), storage, batch_size=4, part_size=5,
                         max_bad_fraction=0.5)
    assert len(kept.ids) == 6 and sorted(Path(k).name for k in kept.bad) == [f"broken{i}.png" for i in range(4)]


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
    indexes = sorted(p.name for p in (tmp_path / "out" / "shards").glob("*.index.json"))  # written beside each
    assert indexes == [f"{Path(uri).name}.index.json" for uri in shards.shards] and shards._sizes_to_check
    with tarfile.open(tmp_path / "out" / "shards" / "shard-00000.tar") as tar:
        first = tar.extractfile("000000000." + manifest[0]["member"].split(".")[1]).read()  # type: ignore[union-attr]
    assert first == (tmp_path / "pool" / Path(manifest[0]["id"]).name).read_bytes()
    for grid in ("kept", "removed", "duplicate_groups"):
        assert (tmp_path / "out" / "grids" / f"{grid}.png").read_bytes()[:4] == b"\x89PNG"


def test_run_curation_copies_an_image_whose_file_name_holds_a_hash(tmp_path: Path) -> None:
    """``a#1.jpg`` in an image folder is an object, not ``<shard>#<member>``: its key reaches the
    shards (once all the embedding is done) and is copied byte for byte, its own source."""
    storage = Storage()
    pool = _write_pool(tmp_path / "pool", 30, 5)
    single = next(i for i in range(len(pool.names)) if (pool.group == pool.group[i]).sum() == 1)
    hashed = tmp_path / "pool" / f"a#1{Path(pool.names[single]).suffix}"
    (tmp_path / "pool" / pool.names[single]).rename(hashed)
    config = CurationConfig(dedup_threshold=0.85, load_size=48, shard_size=50)
    report = run_curation(str(tmp_path / "pool"), str(tmp_path / "out"), storage, pixel_embedder(6), config)
    (record,) = [r for r in _manifest(tmp_path / "out") if r["id"] == str(hashed)]
    assert record["source"] == str(hashed) and record["shard"] in report["shards"]
    with tarfile.open(record["shard"]) as tar:
        assert tar.extractfile(record["member"]).read() == hashed.read_bytes()  # type: ignore[union-attr]


def test_dedup_quality_on_small_pool() -> None:
    """The pixel embedder (the one without weights) at 0.85 and at the default threshold removes
    near-copies; at SSCD's 0.6, the former default, many of its removals are not copies."""
    pool = make_copy_pool(300, 100, 2, seed=1, size=64)
    images = torch.stack([decode_image(b, 64) for b in pool.encoded])
    embeddings = embed_images(images, pixel_embedder(6))

    def quality(threshold: float) -> dict[str, float]:
        result = deduplicate(embeddings, threshold=threshold)
        return removal_quality(result.keep, pool.group, result.component)

    for threshold in (0.85, CurationConfig().dedup_threshold):
        assert quality(threshold)["precision"] >= 0.95 and quality(threshold)["recall"] >= 0.9, threshold
    assert quality(0.6)["precision"] < 0.8


def test_decontamination_removes_every_copy_of_an_eval_image(tmp_path: Path) -> None:
    """The eval set holds fresh near-copies of 10 originals that have 2 near-copies each in the
    pool: all 30 related pool images go (at a looser threshold than dedup's), nothing else does."""
    storage = Storage()
    pool = _write_pool(tmp_path / "pool")
    contaminated = _copied_groups(pool, 10)
    _write_fresh_copies(tmp_path / "eval", pool, contaminated)
    config = CurationConfig(dedup_threshold=0.85, decontaminate_threshold=0.75, load_size=48)
    report = run_curation(str(tmp_path / "pool"), str(tmp_path / "out"), storage, pixel_embedder(6), config,
                          (str(tmp_path / "eval"),))
    kept = _groups_of(_manifest(tmp_path / "out"), pool)
    assert not kept & set(contaminated)
    assert kept == set(pool.group.tolist()) - set(contaminated)  # every other original is still represented
    assert report["counts"]["decontaminated"] == report["counts"]["after_dedup"] - len(_manifest(tmp_path / "out"))


def test_cli_curate(tmp_path: Path) -> None:
    from pipelines.cli import app

    _write_pool(tmp_path / "pool", 40, 10)
    result = CliRunner().invoke(app, ["curate", "--pool", str(tmp_path / "pool"), "--out", str(tmp_path / "out"),
                                      "--dedup-threshold", "0.85", "--load-size", "48", "--no-track"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "report.json").exists() and not (tmp_path / "out" / "mlflow.db").exists()
    bad = CliRunner().invoke(app, ["curate", "--pool", "x", "--out", "y", "--dedup-threshold", "2"])
    assert bad.exit_code == 2
    bad = CliRunner().invoke(app, ["curate", "--pool", "x", "--out", "y", "--retrieve", "nearest"])
    assert bad.exit_code == 2 and "retrieve_mode" in bad.output
    # decoding processes and another batch size give the same curation
    again = CliRunner().invoke(app, ["curate", "--pool", str(tmp_path / "pool"), "--out", str(tmp_path / "again"),
                                     "--dedup-threshold", "0.85", "--load-size", "48", "--no-track",
                                     "--num-workers", "2", "--batch-size", "7"])
    assert again.exit_code == 0, again.output
    kept = [{k: v for k, v in record.items() if k != "shard"} for record in _manifest(tmp_path / "out")]
    assert [{k: v for k, v in record.items() if k != "shard"} for record in _manifest(tmp_path / "again")] == kept
    bad = CliRunner().invoke(app, ["curate", "--pool", "x", "--out", "y", "--num-workers", "-1"])
    assert bad.exit_code == 2 and "num_workers >= 0" in bad.output
    if not torch.cuda.is_available():
        bad = CliRunner().invoke(app, ["curate", "--pool", "x", "--out", "y", "--device", "cuda"])
        assert bad.exit_code == 2 and "no CUDA device" in bad.output


@pytest.mark.parametrize("mode", ["sample", "cluster"])
def test_cli_retrieves_around_seeds_and_tracks_the_run_in_mlflow(mode: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.cli import app

    pool = _write_pool(tmp_path / "pool")
    seeded = _copied_groups(pool, 6)
    _write_fresh_copies(tmp_path / "seeds", pool, seeded)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = CliRunner().invoke(app, ["curate", "--pool", str(tmp_path / "pool"), "--out", str(tmp_path / "out"),
                                      "--dedup-threshold", "0.85", "--load-size", "48", "--seeds",
                                      str(tmp_path / "seeds"), "--retrieve", mode, "--per-seed", "3",
                                      "--experiment", "curation-test"])
    assert result.exit_code == 0, result.output
    records = _manifest(tmp_path / "out")
    assert {r["rule"] for r in records} == {f"retrieved-{mode}"} and 6 <= len(records) <= 18
    assert set(seeded) <= _groups_of(records, pool)  # each seed found its own original's group
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counts"]["seeds"] == 6 and report["counts"]["retrieved"] == len(records)
    assert report["retrieve"]["mode"] == mode
    # the MLflow run: counts as metrics, config as params, report files and manifest as artifacts
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("curation-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dinoflow.stage"] == "curate"
    metrics = run.data.metrics
    assert metrics["curation_pool"] == len(pool.names) and metrics["curation_curated"] == len(records)
    assert metrics["curation_seeds"] == 6 and metrics["curation_seconds_dedup"] >= 0
    assert run.data.params["curation.retrieve_mode"] == mode and run.data.params["curation.index.built.kind"] == "flat"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "manifest.jsonl", "grids"} <= artifacts
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert grids == {f"grids/{g}.png" for g in ("kept", "removed", "duplicate_groups", "retrieved")}
    local = Path(client.download_artifacts(run.info.run_id, "manifest.jsonl", str(tmp_path / "dl")))
    assert [json.loads(line)["id"] for line in local.read_text().splitlines()] == [r["id"] for r in records]
