"""Indexes of folders and tar shards: one vector per decodable image, found again by its own image."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from serve.index import build_index, load_index
from serve.model import ServedModel, decode_upload, load_served_model


def test_shards_index_matches_the_folder_index(served_model: ServedModel, image_folder: list[Path], index_uri: str,
                                               tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        for path in image_folder:
            info = tarfile.TarInfo(f"{path.stem}.png")
            info.size = len(path.read_bytes())
            tar.addfile(info, io.BytesIO(path.read_bytes()))
        broken = tarfile.TarInfo("broken.png")
        broken.size = 3
        tar.addfile(broken, io.BytesIO(b"bad"))
    meta = build_index(served_model, str(shards), str(tmp_path / "idx"), kind="shards", batch_size=4)
    assert meta["count"] == 8 and meta["skipped"] == [f"{shards / '000000.tar'}#broken.png"]
    # decoding processes and another batch size: the same keys, skips and vectors
    again = build_index(served_model, str(shards), str(tmp_path / "again"), kind="shards", batch_size=3,
                        num_workers=2)
    assert (again["keys"], again["skipped"]) == (meta["keys"], meta["skipped"])
    np.testing.assert_allclose(faiss.read_index(str(tmp_path / "again" / "index.faiss")).reconstruct_n(0, 8),
                               faiss.read_index(str(tmp_path / "idx" / "index.faiss")).reconstruct_n(0, 8), atol=1e-6)
    from_shards, from_folder = load_index(str(tmp_path / "idx"), served_model), load_index(index_uri, served_model)
    assert from_shards.image_bytes(3) == image_folder[3].read_bytes()
    query = served_model.embed(torch.stack([decode_upload(p.read_bytes(), 28, 10**6) for p in image_folder]))["cls"]
    assert [hits[0]["id"] for hits in from_shards.search(query, 2)] == list(range(8))
    assert [hits[0]["id"] for hits in from_folder.search(query, 2)] == list(range(8))


def test_index_of_another_model_is_refused(index_uri: str, tiny_weights: Path) -> None:
    other = load_served_model(str(tiny_weights), image_size=14)
    with pytest.raises(ValueError, match="image_size=28"):
        load_index(index_uri, other)
    with pytest.raises(ValueError, match="unknown source kind"):
        build_index(other, "x", "y", kind="zip")  # type: ignore[arg-type]



def test_an_index_of_other_weights_or_an_older_transform_is_refused_saying_how_to_rebuild(
        served_model: ServedModel, index_uri: str, tmp_path: Path) -> None:
    """Another model of the same width and image size (other weights), or an index that does not
    record the weights and pixel transform it was built with, would give meaningless neighbours."""
    from .conftest import write_tiny_weights

    other = load_served_model(str(write_tiny_weights(tmp_path / "other.safetensors", seed=1)))
    with pytest.raises(ValueError, match=r"backbone_sha256=[0-9a-f]{64} \(served: [0-9a-f]{64}\)") as refused:
        load_index(index_uri, other)
    message = str(refused.value)
    assert "dim=" not in message and "transform=" not in message  # only what differs is named
    assert f"rebuild it for {other.name}: dinoflow index build --model {other.name} --image-size 28 --images" in message

    old = tmp_path / "old"
    shutil.copytree(index_uri, old)
    meta = json.loads((old / "index.json").read_text())
    for recorded in ("transform", "backbone_sha256"):  # as an index built before they were recorded
        del meta[recorded]
    (old / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"transform=\(not recorded: built by an older dinoflow\) \(served: "
                                         r"upright \(EXIF\), shorter side to round\(image_size / 0.875\)"):
        load_index(str(old), served_model)
    assert len(load_index(index_uri, served_model)) == 8  # the model that built it
