"""Retrieval: descriptors, exact faiss ranking against brute force, the ground-truth adapter."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from dinoflow.storage import Storage
from evaluators.dense_metrics import rank, retrieval_map
from evaluators.features import to_model_input
from evaluators.retrieval import global_descriptors, load_plain_pickle, load_revisited, rank_database
from evaluators.synthetic import make_retrieval_set
from trainer.models.vit import build_vit


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28,
                     layerscale_init=1.0).eval()


def test_descriptors_are_unit_vectors_of_the_right_width(backbone: torch.nn.Module) -> None:
    images = torch.randn(5, 3, 28, 28)
    for pooling, width in (("cls", 32), ("gem", 32), ("cls+gem", 64)):
        descriptors = global_descriptors(backbone, images, pooling, batch_size=2)
        assert descriptors.shape == (5, width)
        torch.testing.assert_close(descriptors.norm(dim=1), torch.ones(5))
    tokens = backbone.forward_features(images)["x_norm_patchtokens"].clamp(min=1e-6)
    gem = torch.nn.functional.normalize(tokens.pow(3).mean(1).pow(1 / 3), dim=-1)
    torch.testing.assert_close(global_descriptors(backbone, images, "gem"), gem)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        global_descriptors(backbone, images, "max")  # type: ignore[arg-type]


def test_faiss_ranks_like_brute_force_cosine() -> None:
    generator = torch.Generator().manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(7, 16, generator=generator), dim=1)
    database = torch.nn.functional.normalize(torch.randn(50, 16, generator=generator), dim=1)
    ranking, similarity = rank_database(queries, database)
    brute = (queries @ database.T).numpy()
    np.testing.assert_array_equal(ranking, rank(brute))
    np.testing.assert_allclose(similarity, np.take_along_axis(brute, ranking, 1), atol=1e-5)


def test_synthetic_retrieval_end_to_end(backbone: torch.nn.Module) -> None:
    data = make_retrieval_set(8, seed=2, )
    to_input = lambda x: to_model_input(torch.from_numpy(x), patch_size=7)  # noqa: E731
    small = lambda x: torch.nn.functional.interpolate(to_input(x), size=(28, 28), mode="bilinear")  # noqa: E731
    ranking, _ = rank_database(global_descriptors(backbone, small(data.queries)),
                               global_descriptors(backbone, small(data.database)))
    scores = retrieval_map(ranking, data.truths)
    assert set(scores) == {"map_easy", "map_medium", "map_hard"} and all(0 <= v <= 1 for v in scores.values())


def _ground_truth() -> dict:
    return {"imlist": ["a", "b", "c", "d"], "qimlist": ["q1", "q2"],
            "gnd": [{"easy": [0], "hard": [2], "junk": [3], "bbx": [1.0, 2.0, 30.5, 40.0]},
                    {"easy": [], "hard": [1, 3], "junk": [], "bbx": [0, 0, 10, 10]}]}


def test_ground_truth_reads_from_the_original_pickle_and_from_json(tmp_path) -> None:
    storage = Storage()
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(_ground_truth()))
    (tmp_path / "gnd_rparis6k.json").write_text(json.dumps(_ground_truth()))
    for name in ("roxford5k", "rparis6k"):
        data = load_revisited(storage, str(tmp_path), name)
        assert data.images == ["a", "b", "c", "d"] and data.queries == ["q1", "q2"]
        assert [list(t.hard) for t in data.truths] == [[2], [1, 3]] and data.query_boxes[0] == (1.0, 2.0, 30.5, 40.0)
        assert [sorted(x.tolist()) for x in data.truths[0].split("medium")] == [[0, 2], [3]]


class _Payload:
    def __reduce__(self):  # what a crafted ground-truth file would do
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_with_code_is_refused_and_bad_structure_named(tmp_path) -> None:
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system"):
        load_plain_pickle(pickle.dumps({"imlist": [_Payload()]}))
    storage = Storage()
    bad = _ground_truth()
    bad["gnd"][0]["easy"] = [9]
    (tmp_path / "gnd_bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="query 0 points outside the 4 database images"):
        load_revisited(storage, str(tmp_path), "bad")
    with pytest.raises(FileNotFoundError, match="no ground truth for 'none'"):
        load_revisited(storage, str(tmp_path), "none")
