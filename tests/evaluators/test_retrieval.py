"""Retrieval: descriptors, exact faiss ranking against brute force, the ground-truth adapters
(revisited Oxford/Paris, AmsterTime's pairs), their scores against formulas and scikit-learn."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from dinoflow.storage import Storage
from evaluators.dense_metrics import rank, retrieval_map
from evaluators.features import to_model_input
from evaluators.pickles import load_data_pickle
from evaluators.retrieval import (global_descriptors, load_amstertime, load_revisited,
                                  pair_retrieval, rank_database)
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
    nearest, nearest_similarity = rank_database(queries, database, k=5)  # the first 5 of the whole ranking
    np.testing.assert_array_equal(nearest, ranking[:, :5])
    np.testing.assert_allclose(nearest_similarity, similarity[:, :5], atol=1e-6)
    assert rank_database(queries, database[:3], k=5)[0].shape == (7, 3)  # at most the database


def test_file_descriptors_batch_images_of_one_shape_and_keep_their_order(backbone: torch.nn.Module, tmp_path) -> None:
    """Nine images of three shapes, interleaved: described in batches of a shape (2 at a time, or
    held until the end, or pushed through when more than 3 wait), every order the same descriptors
    as each image through the backbone alone, in the files' order."""
    from PIL import Image

    from evaluators.retrieval import RevisitedImages, file_descriptors

    rng = np.random.default_rng(6)
    files = []
    for index in range(9):
        width, height = ((56, 56), (56, 28), (28, 56))[index % 3]
        files.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(files[-1])
    alone = torch.cat([global_descriptors(backbone, to_model_input(image[None], patch_size=7))
                       for image in RevisitedImages(Storage(), files, 28, 7)])
    for batch_size, max_held in ((2, 128), (100, 128), (100, 3)):
        described = file_descriptors(backbone, Storage(), files, 28, "test", batch_size=batch_size, max_held=max_held)
        torch.testing.assert_close(described, alone, atol=1e-5, rtol=1e-5)


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
        load_data_pickle(pickle.dumps({"imlist": [_Payload()]}))
    storage = Storage()
    arrays = _ground_truth()  # the entries as numpy arrays (as converted from the MATLAB release), protocol 2
    arrays["gnd"] = [{kind: np.asarray(v, dtype=np.float64 if kind == "bbx" else np.int64) for kind, v in g.items()}
                     for g in arrays["gnd"]]
    (tmp_path / "gnd_arrays.pkl").write_bytes(pickle.dumps(arrays, protocol=2))
    (tmp_path / "gnd_lists.json").write_text(json.dumps(_ground_truth()))
    read = {name: load_revisited(storage, str(tmp_path), name) for name in ("arrays", "lists")}
    assert replace(read["arrays"], name="lists") == read["lists"]
    bad = _ground_truth()
    bad["gnd"][0]["easy"] = [9]
    (tmp_path / "gnd_bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="query 0 points outside the 4 database images"):
        load_revisited(storage, str(tmp_path), "bad")
    with pytest.raises(FileNotFoundError, match="no ground truth for 'none'"):
        load_revisited(storage, str(tmp_path), "none")


def write_revisited(root, name: str = "roxford5k") -> dict:
    """A revisited layout: 3 landmarks (a coloured stripe pattern each), 2 database photos of each
    at other sizes and aspect ratios, one query photo of each with the landmark inside its box and
    noise around it; easy and hard: the landmark's photos, junk: one other."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "jpg").mkdir(parents=True, exist_ok=True)

    def landmark(kind: int, width: int, height: int) -> np.ndarray:
        x = np.linspace(0, 1, width)[None, :, None]
        y = np.linspace(0, 1, height)[:, None, None]
        colour = np.eye(3)[kind][None, None] * 180 + 40
        stripes = np.sin(2 * np.pi * (3 + 2 * kind) * (x if kind % 2 else y))
        return np.clip(colour * (0.6 + 0.4 * stripes) + rng.normal(0, 8, (height, width, 3)), 0, 255)

    images, gnd, queries = [], [], []
    for kind in range(3):
        for copy, (width, height) in enumerate(((60, 40), (35, 50))):
            images.append(f"l{kind}_{copy}")
            Image.fromarray(landmark(kind, width, height).astype(np.uint8)).save(root / "jpg" / f"{images[-1]}.jpg")
    for kind in range(3):
        photo = rng.integers(0, 255, (70, 90, 3)).astype(np.float64)
        photo[20:60, 30:80] = landmark(kind, 50, 40)
        queries.append(f"q{kind}")
        Image.fromarray(photo.astype(np.uint8)).save(root / "jpg" / f"q{kind}.jpg")
        gnd.append({"easy": [2 * kind], "hard": [2 * kind + 1], "junk": [(2 * kind + 2) % 6],
                    "bbx": [30.0, 20.0, 80.0, 60.0]})
    truth = {"imlist": images, "qimlist": queries, "gnd": gnd}
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(truth))
    return truth


def test_the_suite_scores_a_revisited_layout_as_the_protocol_reads_it(backbone: torch.nn.Module, tmp_path) -> None:
    """``retrieval_data`` (the adapter was unreachable from the suite): the suite's mAP is the one
    of descriptors made by hand from the protocol's images (queries cropped to their box, the
    longer side at the evaluation's size, sides rounded to the patch), decoded by workers."""
    from PIL import Image

    from evaluators.suite import SuiteConfig, run_suite

    truth = write_revisited(tmp_path)
    report = run_suite(backbone, SuiteConfig(tasks=("retrieval",), retrieval_data=f"roxford5k:{tmp_path}",
                                             image_size=42, num_workers=2))

    def described(name: str, box: list[float] | None) -> torch.Tensor:
        image = Image.open(tmp_path / "jpg" / f"{name}.jpg").convert("RGB")
        image = image.crop(tuple(round(v) for v in box)) if box else image
        scale = 42 / max(image.size)
        size = tuple(max(7, round(side * scale / 7) * 7) for side in image.size)
        pixels = torch.from_numpy(np.array(image.resize(size, Image.BICUBIC))).permute(2, 0, 1)[None]
        return global_descriptors(backbone, to_model_input(pixels, patch_size=7))

    queries = torch.cat([described(q, g["bbx"]) for q, g in zip(truth["qimlist"], truth["gnd"])])
    database = torch.cat([described(name, None) for name in truth["imlist"]])
    expected = retrieval_map(rank_database(queries, database)[0], load_revisited(Storage(), str(tmp_path),
                                                                                   "roxford5k").truths)
    assert report["tasks"]["retrieval"] == pytest.approx(expected, abs=1e-6)
    assert report["metrics"]["retrieval_map_easy"] > 0.5  # the landmarks' colours set them apart
    from evaluators.retrieval import RevisitedImages

    shapes = {tuple(RevisitedImages(Storage(), [str(tmp_path / "jpg" / f"{name}.jpg")], 42, 7)[0].shape)
              for name in ("l0_0", "l0_1")}
    assert shapes == {(3, 28, 42), (3, 42, 28)}  # aspect kept: 60x40 and 35x50
    with pytest.raises(ValueError, match="retrieval_data = 'oxford:/x'; give <data set>:<root> with the data set "
                                         "one of roxford5k, rparis6k"):
        SuiteConfig(tasks=("retrieval",), retrieval_data="oxford:/x")


def test_pair_scores_are_the_mean_reciprocal_rank_and_scikit_learns_average_precision() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    similarity = rng.normal(size=(30, 30))
    scores = pair_retrieval(rank(similarity))
    aps = [average_precision_score(np.arange(30) == q, similarity[q]) for q in range(30)]
    assert scores["map"] == pytest.approx(np.mean(aps), abs=1e-12)
    pair_rank = (similarity > similarity[np.arange(30), np.arange(30)][:, None]).sum(1)  # others above the pair
    assert scores["recall_at_1"] == np.mean(pair_rank == 0) and scores["recall_at_5"] == np.mean(pair_rank < 5)
    assert pair_retrieval(rank(np.eye(4))) == {"map": 1.0, "recall_at_1": 1.0, "recall_at_5": 1.0}
    # both directions stacked, the ranks read to a cutoff: AmsterTime's own formula, AP = sum_r P@r * hit_r
    # over the first k ranks (1/rank of the pair within them, else 0), averaged over all 60 queries
    both = np.concatenate([rank(similarity), rank(similarity.T)])
    hits = both[:, :4] == (np.arange(60) % 30)[:, None]
    official = (np.cumsum(hits, axis=1) / np.arange(1, 5) * hits).sum(1).mean()
    assert pair_retrieval(both, cutoff=4)["map"] == pytest.approx(official, abs=1e-12)
    assert pair_retrieval(both, cutoff=4)["recall_at_1"] == hits[:, 0].mean()
    assert pair_retrieval(both, cutoff=4)["map"] < pair_retrieval(both)["map"]


def test_amstertime_pairs_old_and_new_by_stem_and_the_suite_scores_them_both_ways(backbone: torch.nn.Module,
                                                                                   tmp_path) -> None:
    """AmsterTime's layout as released: an archival photo old/<stem>.jpg and today's new/<stem>.png;
    the suite's scores are those of descriptors made by hand from the whole images, the old
    querying the new and the new the old (its evaluation's "All")."""
    from PIL import Image

    from evaluators.suite import SuiteConfig, run_suite

    data = make_retrieval_set(6, seed=4)
    for side in ("old", "new"):
        (tmp_path / "amstertime" / side).mkdir(parents=True)
    for index, (query, copies) in enumerate(zip(data.queries, data.truths)):
        Image.fromarray(query.transpose(1, 2, 0)).save(tmp_path / "amstertime" / "old" / f"{index:04d}.jpg")
        today = data.database[copies.hard[0]].transpose(1, 2, 0)  # a strong change of the same scene
        Image.fromarray(today).save(tmp_path / "amstertime" / "new" / f"{index:04d}.png")
    root = str(tmp_path / "amstertime")
    pairs = load_amstertime(Storage(), root)
    assert pairs.queries == [f"{i:04d}.jpg" for i in range(6)] and pairs.images == [f"{i:04d}.png" for i in range(6)]
    assert [t.easy for t in pairs.truths] == [[i] for i in range(6)] and pairs.query_boxes is None
    report = run_suite(backbone, SuiteConfig(tasks=("retrieval",), retrieval_data=f"amstertime:{root}", image_size=28))

    def described(side: str, names: list[str]) -> torch.Tensor:  # 56 px squares: the longer side to 28
        pixels = [np.array(Image.open(tmp_path / "amstertime" / side / name).convert("RGB").resize((28, 28),
                                                                                                 Image.BICUBIC))
                  for name in names]
        return global_descriptors(backbone, to_model_input(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2),
                                                           patch_size=7))

    similarity = (described("old", pairs.queries) @ described("new", pairs.images).T).numpy()
    expected = pair_retrieval(np.concatenate([rank(similarity), rank(similarity.T)]))
    assert report["tasks"]["retrieval"] == pytest.approx(expected, abs=1e-6)
    assert report["metrics"]["retrieval_map"] == report["tasks"]["retrieval"]["map"]

    (tmp_path / "amstertime" / "old" / "0001.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"old/ holds two images of stem '0001' \(0001.jpg, 0001.png\)"):
        load_amstertime(Storage(), root)
    (tmp_path / "amstertime" / "old" / "0001.png").unlink()
    (tmp_path / "amstertime" / "new" / "0000.png").rename(tmp_path / "amstertime" / "new" / "9999.png")
    with pytest.raises(ValueError, match=r"2 images without a pair of the same stem in the other of old/ and new/ "
                                         r"\(first stems: 0000, 9999\)"):
        load_amstertime(Storage(), root)
    with pytest.raises(FileNotFoundError, match="no AmsterTime queries"):
        load_amstertime(Storage(), str(tmp_path / "none"))
