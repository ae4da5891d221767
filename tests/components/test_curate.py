"""Stage ``curate``: skipped without a pool, shards from a pool, reused when nothing changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.curate import balance_levels, make_embedder, run_curate_stage
from components.stage import StageContext, error_uri
from curation.synthetic import make_copy_pool
from dinoflow.storage import Storage
from trainer.data.shards import ShardDataset


def write_pool(folder: Path, originals: int, copied: int, size: int = 28) -> int:
    """A synthetic pool of PNG/JPEG files: ``originals`` scenes, ``copied`` of them with 2 near-copies."""
    pool = make_copy_pool(originals, copied, 2, seed=0, size=size)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in zip(pool.names, pool.encoded, strict=True):
        (folder / name).write_bytes(data)
    return len(pool.names)


def _stage(ctx: StageContext, pool: str) -> tuple[str, str]:
    return run_curate_stage(ctx, pool, [], 0.85, 0.95, 0, [], "", "fashion_mnist", "s3://bucket/fmnist")


def test_no_pool_passes_the_fallback_data_on_without_work(tmp_path: Path) -> None:
    ctx = StageContext(run_root=str(tmp_path / "root"))
    assert _stage(ctx, "") == ("fashion_mnist", "s3://bucket/fmnist")
    assert not (tmp_path / "root").exists()


def test_no_pool_and_no_fashion_mnist_is_refused_naming_both_parameters(tmp_path: Path) -> None:
    """``data_source=""`` (no ingest) without ``pool_uri`` leaves pretraining nothing to read."""
    ctx = StageContext(run_root=str(tmp_path / "root"))
    with pytest.raises(ValueError, match="no training images: give the pipeline pool_uri .* or data_source"):
        run_curate_stage(ctx, "", [], 0.85, 0.95, 0, [], "", "fashion_mnist", "")
    assert "no training images" in json.loads(Path(error_uri(ctx, "curate")).read_text())["error"]


def test_a_pool_becomes_shards_and_a_rerun_reuses_them(tmp_path: Path) -> None:
    count = write_pool(tmp_path / "pool", originals=24, copied=8)
    ctx = StageContext(run_root=str(tmp_path / "root"))
    kind, uri = _stage(ctx, str(tmp_path / "pool"))
    assert kind == "shards" and uri.startswith(str(tmp_path / "root" / "curated"))
    curated = ShardDataset(Storage(), uri, 28)
    assert 24 - 2 <= len(curated) < count  # the near-copies went, the originals stayed
    report = Path(uri).parent / "report.json"
    stamp = report.stat().st_mtime_ns
    assert _stage(ctx, str(tmp_path / "pool")) == (kind, uri) and report.stat().st_mtime_ns == stamp
    first = min((tmp_path / "pool").iterdir())
    (tmp_path / "pool" / f"extra{first.suffix}").write_bytes(first.read_bytes())
    assert _stage(ctx, str(tmp_path / "pool"))[1] != uri  # another pool listing: another curation


def test_an_empty_pool_fails_with_a_recorded_error(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    ctx = StageContext(run_root=str(tmp_path / "root"), pipeline_run_id="run-1")
    with pytest.raises(FileNotFoundError, match="is empty or missing"):
        _stage(ctx, str(tmp_path / "pool"))
    assert "is empty or missing" in Path(error_uri(ctx, "curate")).read_text()


def test_balance_levels_resample_above_the_bottom_level() -> None:
    bottom, top = balance_levels([20, 5])
    assert (bottom.clusters, bottom.resampling_steps, top.clusters, top.resampling_steps) == (20, 0, 5, 10)
    assert balance_levels([]) == ()


def test_the_stage_embeds_with_meta_released_weights(tmp_path: Path) -> None:
    """``curation_embed_weights`` takes Meta's released .pth (the curation of the paper embeds with a
    released model) as it takes our safetensors: the same embeddings (it took only safetensors)."""
    import torch

    from trainer.models.hub import save_backbone
    from trainer.models.vit import build_vit

    torch.manual_seed(0)
    model = build_vit("vit_small", patch_size=14, embed_dim=64, depth=2, num_heads=1, img_size=56,
                      layerscale_init=1.0).eval()
    torch.save(model.state_dict(), tmp_path / "dinov2_pretrain.pth")
    save_backbone(model, str(tmp_path / "backbone.safetensors"))
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    released = make_embedder(str(tmp_path / "dinov2_pretrain.pth"), Storage())(images)
    ours = make_embedder(str(tmp_path / "backbone.safetensors"), Storage())(images)
    torch.testing.assert_close(released, ours, rtol=0, atol=1e-5)
    assert released.shape == (4, 64)


def test_the_cache_follows_the_embedders_weights_not_their_path(tmp_path: Path) -> None:
    """Weights overwritten at the same path curate again; the same weights at another path do not."""
    import torch

    from trainer.models.hub import save_backbone
    from trainer.models.vit import build_vit

    write_pool(tmp_path / "pool", originals=6, copied=2)
    ctx = StageContext(run_root=str(tmp_path / "root"))

    def curate(weights: Path) -> str:
        return run_curate_stage(ctx, str(tmp_path / "pool"), [], 0.85, 0.95, 0, [], str(weights), "fashion_mnist",
                                "")[1]

    def weights(seed: int, path: Path) -> Path:
        torch.manual_seed(seed)
        save_backbone(build_vit("vit_small", patch_size=14, embed_dim=32, depth=1, num_heads=1, img_size=56), str(path))
        return path

    first = curate(weights(0, tmp_path / "w.safetensors"))
    assert curate(weights(0, tmp_path / "copy.safetensors")) == first  # the same weights: reused
    assert curate(weights(1, tmp_path / "w.safetensors")) != first  # other weights at the same path: curated anew
