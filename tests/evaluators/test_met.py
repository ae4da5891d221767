"""The Met: its k-NN recogniser against a plain loop, GAP against scikit-learn's average
precision, its PCA whitening against scikit-learn's ``PCA(whiten=True)``, the ground truth's layout,
and the suite's scores against the protocol run by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.metrics import average_precision_score

from dinoflow.storage import Storage
from evaluators.features import to_model_input
from evaluators.met import (DISTRACTOR, K_GRID, TEMPERATURE_GRID, QUERY_SPLITS, gap, knn_recognise,
                            learn_whitening, load_met, met_recognition, recognition_scores, tuned_recognition)
from evaluators.retrieval import file_descriptors, global_descriptors
from trainer.models.vit import build_vit


def recognise_by_loop(similarities: np.ndarray, labels: np.ndarray, num_classes: int,
                      temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The data set's classifier written out: each exhibit among the neighbours at its best
    similarity, starting from 0; a softmax over all; the best, the lowest exhibit of a tie."""
    predictions, confidences = [], []
    for sims, names in zip(similarities, labels):
        best: dict[int, float] = {}
        for sim, name in zip(sims, names):
            best[int(name)] = max(best.get(int(name), 0.0), float(sim))
        weights = {name: math.exp(temperature * sim) for name, sim in best.items()}
        total = sum(weights.values()) + (num_classes - len(best))
        name = max(sorted(weights), key=weights.get)
        predictions.append(name)
        confidences.append(weights[name] / total)
    return np.array(predictions), np.array(confidences)


def test_knn_recogniser_matches_a_plain_loop() -> None:
    rng = np.random.default_rng(0)
    similarities = -np.sort(-rng.uniform(-1, 1, size=(40, 7)), axis=1)
    labels = rng.integers(0, 4, size=(40, 7))  # repeats: an exhibit keeps its best neighbour
    for temperature in (0.01, 1.0, 25.0, 500.0):
        predictions, confidences = knn_recognise(similarities, labels, 9, temperature)
        expected_predictions, expected_confidences = recognise_by_loop(similarities, labels, 9, temperature)
        np.testing.assert_array_equal(predictions, expected_predictions)
        np.testing.assert_allclose(confidences, expected_confidences, rtol=1e-9, atol=1e-300)
    one = knn_recognise(np.array([[0.9, 0.5]]), np.array([[3, 3]]), 1, 10.0)  # the only exhibit: certain
    assert one[0].tolist() == [3] and one[1] == pytest.approx([1.0])
    unlike = knn_recognise(np.array([[-0.1, -0.2, -0.4]]), np.array([[5, 2, 7]]), 10, 25.0)  # no neighbour similar
    assert unlike[0].tolist() == [2] and unlike[1] == pytest.approx([0.1])  # every exhibit at 0: 1/10


def test_gap_against_average_precision() -> None:
    """With distinct confidences GAP is scikit-learn's average precision of the right answers
    scaled by their share of the M non-distractor queries (its recall runs to the right ones only)."""
    rng = np.random.default_rng(1)
    truths = rng.integers(0, 5, size=200)
    truths[rng.random(200) < 0.6] = DISTRACTOR
    predictions = np.where(rng.random(200) < 0.5, truths, rng.integers(0, 5, size=200))
    predictions[truths == DISTRACTOR] = rng.integers(0, 5, size=(truths == DISTRACTOR).sum())
    confidences = rng.random(200)
    right = (predictions == truths) & (truths != DISTRACTOR)
    expected = average_precision_score(right, confidences) * right.sum() / (truths != DISTRACTOR).sum()
    assert gap(predictions, confidences, truths) == pytest.approx(expected, abs=1e-12)
    # by hand: right at 0.9, a confident distractor at 0.8, right at 0.7, wrong at 0.1: (1 + 2/3) / 3
    assert gap(np.array([1, 2, 3, 0]), np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, DISTRACTOR, 3, 4])) == \
        pytest.approx((1 + 2 / 3) / 3)
    scores = recognition_scores(np.array([1, 2, 3, 0]), np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, -1, 3, 4]))
    assert scores["gap_no_distractors"] == pytest.approx((1 + 1) / 3) and scores["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least one query that shows an exhibit"):
        gap(np.array([1]), np.array([0.5]), np.array([DISTRACTOR]))


def write_met(root, rng: np.random.Generator, exhibits: int = 6) -> dict[str, list[tuple[str, int]]]:
    """A Met-shaped folder: each exhibit a random picture, two noisy photographs of it in the
    database, one in each query split, and two distractor queries per split."""
    (root / "ground_truth").mkdir(parents=True)
    bases = rng.integers(0, 256, size=(exhibits, 56, 56, 3))
    entries: dict[str, list[tuple[str, int]]] = {"db": [], "val": [], "test": []}

    def save(path: str, picture: np.ndarray) -> None:
        (root / "images" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(root / "images" / path)

    for exhibit, base in enumerate(bases):
        exhibit_id = 100 + 7 * exhibit
        for n in range(2):
            save(f"MET/{exhibit_id}/{n}.png", base + rng.normal(0, 20, base.shape))
            entries["db"].append((f"MET/{exhibit_id}/{n}.png", exhibit_id))
        for split in ("val", "test"):
            save(f"{split}_met/{exhibit}.png", base + rng.normal(0, 60, base.shape))
            entries[split].append((f"{split}_met/{exhibit}.png", exhibit_id))
    for split in ("val", "test"):
        for n in range(2):
            save(f"{split}_other/{n}.png", rng.integers(0, 256, size=(56, 56, 3)))
            entries[split].append((f"{split}_other/{n}.png", DISTRACTOR))
    database = [{"path": path, "id": exhibit_id} for path, exhibit_id in entries["db"]]
    (root / "ground_truth" / "MET_database.json").write_text(json.dumps(database))
    for split in ("val", "test"):
        listed = [{"path": p, "MET_id": i} if i != DISTRACTOR else {"path": p} for p, i in entries[split]]
        (root / "ground_truth" / f"{split}set.json").write_text(json.dumps(listed))
    return entries


def test_the_suite_scores_the_met_as_its_protocol_run_by_hand(tmp_path) -> None:
    from evaluators.suite import SuiteConfig, run_suite

    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28,
                         layerscale_init=1.0).eval()
    root = tmp_path / "met"
    entries = write_met(root, np.random.default_rng(2))
    data = load_met(Storage(), str(root))
    assert data.database == "full" and len(data.database_files) == 12
    assert data.query_labels["test"].tolist() == [i for _, i in entries["test"]]
    report = run_suite(backbone, SuiteConfig(tasks=("retrieval",), retrieval_data=f"met:{root}", image_size=28))

    def described(split: str) -> torch.Tensor:  # 56 px squares: the longer side to 28 as the protocol resizes
        pixels = [np.array(Image.open(root / "images" / path).convert("RGB").resize((28, 28), Image.BICUBIC))
                  for path, _ in entries[split]]
        return global_descriptors(backbone, to_model_input(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2),
                                                           patch_size=7)).double().numpy()

    database, labels = described("db"), np.array([i for _, i in entries["db"]])

    def scored(split: str, k: int, temperature: float) -> dict[str, float]:
        similarity = described(split) @ database.T
        order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        truths = np.array([i for _, i in entries[split]])
        return recognition_scores(*recognise_by_loop(np.take_along_axis(similarity, order, 1), labels[order], 6,
                                                     temperature), truths)

    grid = [(scored("val", k, t)["gap"], k, t) for k in K_GRID if k <= 12 for t in TEMPERATURE_GRID]
    best = max(value for value, _, _ in grid)
    k, temperature = next((k, t) for value, k, t in grid if value >= best - 1e-9)
    result = report["tasks"]["retrieval"]
    assert (result["k"], result["temperature"]) == (k, temperature) and result["val_gap"] == pytest.approx(best)
    for name, value in scored("test", k, temperature).items():
        assert result[name] == pytest.approx(value, abs=1e-6)
        assert report["metrics"][f"retrieval_{name}"] == result[name]
    assert result["accuracy"] > 1 / 6  # the noisy photographs found their exhibits better than chance

    (root / "ground_truth" / "MET_database.json").rename(root / "ground_truth" / "mini_MET_database.json")
    assert load_met(Storage(), str(root)).database == "mini"


def test_met_ground_truth_errors_name_the_file_and_what_is_allowed(tmp_path) -> None:
    root = tmp_path / "met"
    write_met(root, np.random.default_rng(3), exhibits=2)
    (root / "ground_truth" / "valset.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"needs MET_database.json or mini_MET_database.json, valset.json "
                                                r"and testset.json \(missing: valset.json\)"):
        load_met(Storage(), str(root))
    (root / "ground_truth" / "valset.json").write_text(json.dumps([{"path": "x.png"}]))
    with pytest.raises(ValueError, match="valset.json: no query shows an exhibit"):
        load_met(Storage(), str(root))
    (root / "ground_truth" / "valset.json").write_text(json.dumps([{"file": "x.png", "MET_id": 1}]))
    with pytest.raises(ValueError, match=r"valset.json: not a Met ground truth, expected a list of "
                                         r"\{\"path\": ..., \"MET_id\": <exhibit id>\}"):
        load_met(Storage(), str(root))
    (root / "ground_truth" / "MET_database.json").write_text(json.dumps([{"path": "a.png", "id": -3}]))
    with pytest.raises(ValueError, match="MET_database.json: exhibit ids must be >= 0"):
        load_met(Storage(), str(root))
    with pytest.raises(FileNotFoundError, match="not the Met's ground truth"):
        load_met(Storage(), str(tmp_path / "nothing"))


def unit_rows(rows: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def sklearn_whitened(database: torch.Tensor, dim: int | None, *others: torch.Tensor) -> list[np.ndarray]:
    """The reference: scikit-learn's whitening PCA fitted on the database alone, then L2 norms."""
    pca = PCA(n_components=dim, whiten=True, svd_solver="full").fit(database.double().numpy())
    out = [pca.transform(x.double().numpy()) for x in (database, *others)]
    return [x / np.linalg.norm(x, axis=1, keepdims=True) for x in out]


def anisotropic(rng: np.random.Generator, rows: int, shift: float = 0.0) -> torch.Tensor:
    """Unit descriptors ``(rows, 16)`` of very unequal variance along 16 random directions."""
    basis = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    return unit_rows((rng.normal(size=(rows, 16)) * np.geomspace(3.0, 0.05, 16)) @ basis + 0.5 + shift)


def test_whitening_gives_the_database_zero_mean_and_identity_covariance(monkeypatch) -> None:
    database = anisotropic(np.random.default_rng(4), 300)
    whole = learn_whitening(database)
    monkeypatch.setattr("evaluators.met.WHITENING_ROWS", 7)  # the covariance added up over uneven parts
    np.testing.assert_allclose(learn_whitening(database).projection.numpy(), whole.projection.numpy(), rtol=1e-5)
    for dim, kept in ((None, 16), (5, 5)):
        whitening = learn_whitening(database, dim)
        whitened = (database.double() - whitening.mean.double()) @ whitening.projection.double()  # before the L2 norm
        assert whitened.shape == (300, kept)
        np.testing.assert_allclose(whitened.mean(dim=0).numpy(), 0, atol=1e-4)
        np.testing.assert_allclose((whitened.T @ whitened / 300).numpy(), np.eye(kept), atol=1e-3)
        np.testing.assert_allclose(whitening(database).norm(dim=1).numpy(), 1, rtol=1e-5)


def test_whitening_matches_scikit_learn_pca_whiten_learned_on_the_database_alone() -> None:
    """Similarities, which a component's sign does not change, against scikit-learn's; the queries
    come from elsewhere (shifted), so whitening learned with them would not match."""
    rng = np.random.default_rng(5)
    database, queries = anisotropic(rng, 200), anisotropic(rng, 50, shift=0.8)
    for dim in (None, 6):
        whitening = learn_whitening(database, dim)
        expected_database, expected_queries = sklearn_whitened(database, dim, queries)
        np.testing.assert_allclose((whitening(queries) @ whitening(database).T).numpy(),
                                   expected_queries @ expected_database.T, atol=2e-5)
        np.testing.assert_allclose((whitening(database) @ whitening(database).T).numpy(),
                                   expected_database @ expected_database.T, atol=2e-5)
        _, both_queries, both_database = sklearn_whitened(torch.cat([database, queries]), dim, queries, database)
        assert np.abs(both_queries @ both_database.T - expected_queries @ expected_database.T).max() > 0.05  # it tells


def shared_direction_case(seed: int) -> tuple[torch.Tensor, np.ndarray, dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Exhibits told apart along 15 directions of small variance, while every descriptor also
    points along a 16th, to either side at random and far more than the rest: raw cosines match
    that side first, whitened ones weigh it as one direction of 16."""
    rng = np.random.default_rng(seed)
    codes = rng.normal(0, 0.2, size=(40, 16))

    def draw(labels: np.ndarray) -> torch.Tensor:
        rows = np.where((labels >= 0)[:, None], codes[labels], rng.normal(0, 0.2, size=(len(labels), 16)))
        rows = rows + rng.normal(0, 0.02, size=rows.shape)
        rows[:, 0] = rng.choice([-1.0, 1.0], size=len(labels))
        return unit_rows(rows)

    database_labels = np.repeat(np.arange(40), 2)
    query_labels = {split: np.concatenate([np.arange(40), np.full(20, DISTRACTOR)]) for split in QUERY_SPLITS}
    return draw(database_labels), database_labels, {split: draw(query_labels[split]) for split in QUERY_SPLITS}, \
        query_labels


def test_recognition_whitens_database_and_queries_by_the_database_when_asked() -> None:
    database, database_labels, queries, query_labels = shared_direction_case(0)
    plain = tuned_recognition(database, database_labels, queries, query_labels)
    assert tuned_recognition(database, database_labels, queries, query_labels, whiten=False) == plain
    assert "whiten_dim" not in plain
    whitened = tuned_recognition(database, database_labels, queries, query_labels, whiten=True)
    assert plain["gap"] < 0.8 and whitened["gap"] > 0.95 and whitened["whiten_dim"] == 16
    expected_database, *expected_queries = sklearn_whitened(database, None, *(queries[s] for s in QUERY_SPLITS))
    by_reference = tuned_recognition(torch.from_numpy(expected_database).float(), database_labels,
                                     {s: torch.from_numpy(x).float() for s, x in zip(QUERY_SPLITS, expected_queries)},
                                     query_labels)
    for name, value in by_reference.items():
        assert whitened[name] == pytest.approx(value, abs=1e-6), name
    kept = tuned_recognition(database, database_labels, queries, query_labels, whiten=True, whiten_dim=4)
    assert kept["whiten_dim"] == 4 and kept["gap"] != whitened["gap"]


def test_whitening_refuses_a_dimension_the_database_cannot_give() -> None:
    database = anisotropic(np.random.default_rng(6), 10)
    for dim in (17, 10, 0):
        with pytest.raises(ValueError, match=rf"whitening dimension {dim}: allowed 1 to 9 \(at most the descriptors' "
                                             r"16 dimensions and the database's 10 images less one\)"):
            learn_whitening(database, dim)
    with pytest.raises(ValueError, match=r"whitening dimension 17: allowed 1 to 16"):
        learn_whitening(anisotropic(np.random.default_rng(6), 40), 17)
    with pytest.raises(ValueError, match="whitening needs at least 2 database descriptors, got 1"):
        learn_whitening(database[:1])
    with pytest.raises(ValueError, match="whitening eps must be >= 0, got -1"):
        learn_whitening(database, eps=-1.0)
    labels = {split: np.array([0]) for split in QUERY_SPLITS}
    with pytest.raises(ValueError, match=r"whiten_dim = 3 needs whiten=True \(whitening is off\)"):
        tuned_recognition(database, np.arange(10), {split: database[:1] for split in QUERY_SPLITS}, labels,
                          whiten_dim=3)


def test_met_recognition_passes_whitening_to_the_recogniser(tmp_path) -> None:
    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28,
                         layerscale_init=1.0).eval()
    write_met(tmp_path / "met", np.random.default_rng(7))
    data = load_met(Storage(), str(tmp_path / "met"))
    database = file_descriptors(backbone, Storage(), data.database_files, 28, "database")
    queries = {split: file_descriptors(backbone, Storage(), data.query_files[split], 28, split)
               for split in QUERY_SPLITS}
    result = met_recognition(backbone, data, Storage(), 28, whiten=True, whiten_dim=5)
    assert result == tuned_recognition(database, data.database_labels, queries, data.query_labels, whiten=True,
                                       whiten_dim=5)
    assert result["whiten_dim"] == 5


def test_the_suite_whitens_the_mets_descriptors_when_asked(tmp_path) -> None:
    """``met_whiten`` and ``met_whiten_dim`` (settable from a pipeline's ``eval_options``) reach the
    recogniser: the suite's scores are its whitened ones; a dimension without whitening is refused."""
    from evaluators.suite import SuiteConfig, run_suite, with_options

    torch.manual_seed(0)
    backbone = build_vit("vit_small", patch_size=7, embed_dim=32, depth=2, num_heads=2, img_size=28,
                         layerscale_init=1.0).eval()
    write_met(tmp_path / "met", np.random.default_rng(7))
    config = with_options(SuiteConfig(tasks=("retrieval",), retrieval_data=f"met:{tmp_path / 'met'}", image_size=28),
                          {"met_whiten": True, "met_whiten_dim": 5})
    report = run_suite(backbone, config)
    expected = met_recognition(backbone, load_met(Storage(), str(tmp_path / "met")), Storage(), 28, whiten=True,
                               whiten_dim=5)
    assert report["tasks"]["retrieval"] == pytest.approx(expected) and report["metrics"]["retrieval_whiten_dim"] == 5
    plain = run_suite(backbone, SuiteConfig(tasks=("retrieval",), retrieval_data=f"met:{tmp_path / 'met'}",
                                            image_size=28))
    assert "whiten_dim" not in plain["tasks"]["retrieval"]
    with pytest.raises(ValueError, match="met_whiten_dim = 5: must be >= 0 \\(0: all\\), and is set only with "
                                         "met_whiten"):
        SuiteConfig(tasks=("retrieval",), met_whiten_dim=5)
