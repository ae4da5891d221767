"""Pascal VOC 2007's protocol: a binary logistic regression per class, 11-point mAP, read from the release's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_curve

from dinoflow.storage import Storage
from evaluators.classification import FolderImages
from evaluators.logreg import LogRegConfig, fit_logistic
from evaluators.multilabel import (VOC_CLASSES, average_precision_11, is_voc, multilabel_logistic_regression,
                                   one_vs_rest_loss, voc_targets)
from evaluators.suite import SuiteConfig, run_suite
from tests.evaluators.test_classification import backbone, expected_features, write_folders

SPLITS = {"train": 14, "val": 10, "test": 14}
COLOURED = 3  # the first classes, each a colour channel of its images (the later ones repeat them)


def write_voc(root: Path, seed: int = 0) -> dict[str, tuple[list[str], np.ndarray]]:
    """A VOC 2007 release in miniature: ``JPEGImages/<id>.jpg`` and ``ImageSets/Main/<class>_<split>.txt``
    for the 20 classes; aeroplane, bicycle and bird present where the image's red, green and blue
    channel is lit (one of the three in turn), each class after them as the one 3 before (random
    labels, separable at a large C, make the sweep's fits run to max_iter: twice the time); some
    entries difficult (0). Returns each split's ids and (N, 20) targets."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    splits, first = {}, 0
    for split, count in SPLITS.items():
        ids = [f"{first + i:06d}" for i in range(count)]
        first += count
        targets = np.where(np.arange(count)[:, None] % 3 == np.arange(len(VOC_CLASSES)) % 3, 1, -1)
        targets[rng.random(targets.shape) < 0.1] = 0
        for index, image in enumerate(ids):
            colour = np.where(targets[index, :COLOURED] != -1, 220.0, 30.0)
            noise = rng.normal(0, 20, (40, 48, 3))
            Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(
                root / "JPEGImages" / f"{image}.jpg", quality=95)
        splits[split] = (ids, targets)
    splits["trainval"] = (splits["train"][0] + splits["val"][0], np.concatenate([splits["train"][1],
                                                                                 splits["val"][1]]))
    for split, (ids, targets) in splits.items():
        for column, name in enumerate(VOC_CLASSES):
            lines = [f"{image} {int(t):2d}" for image, t in zip(ids, targets[:, column])]
            (root / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
    return splits


def matlab_colon(start: float, step: float, stop: float) -> list[float]:
    """MATLAB's ``start:step:stop`` as its colon operator computes it: the first half of the points
    as start + k step, the second half as stop - (n - k) step, an even count's middle (start + stop) / 2."""
    n = round((stop - start) / step)
    return [start + k * step if 2 * k < n else (start + stop) / 2 if 2 * k == n else stop - (n - k) * step
            for k in range(n + 1)]


def reference_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """The devkit's 11-point AP (its loop over MATLAB's 0:0.1:1) from scikit-learn's precision-recall
    curve (less the point it adds at recall 0, precision 1, which no threshold gives), difficult rows
    dropped."""
    kept = targets != 0
    precision, recall, _ = precision_recall_curve(targets[kept] > 0, scores[kept])
    precision, recall = precision[:-1], recall[:-1]
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in matlab_colon(0.0, 0.1, 1.0)]))


def test_the_11_point_ap_is_the_devkits_from_scikit_learns_curve() -> None:
    generator = torch.Generator().manual_seed(0)
    for rows, classes in ((7, 3), (50, 5), (300, 20)):
        scores = torch.randn(rows, classes, generator=generator, dtype=torch.float64)
        targets = torch.randint(-1, 2, (rows, classes), generator=generator).to(torch.int8)
        targets[0] = 1  # every class a positive
        got = average_precision_11(scores, targets)
        for k in range(classes):
            assert float(got[k]) == pytest.approx(reference_ap(scores[:, k].numpy(), targets[:, k].numpy()))
    # a recall of exactly 3/5 at precision 1, the next hit at rank 8: the level 0.6 takes precision 1
    # (MATLAB's 0.6, where numpy's arange makes 0.6000000000000001 and would take 5/9 there)
    ranked = torch.tensor([[1], [1], [1], [-1], [-1], [-1], [-1], [1], [1]], dtype=torch.int8)
    scores = -torch.arange(9, dtype=torch.float64)[:, None]
    assert float(average_precision_11(scores, ranked)[0]) == pytest.approx((7 * 1 + 4 * 5 / 9) / 11, abs=1e-15)
    # hand-counted: ranked +, -, + gives precision 1 up to recall 0.5 (6 levels), 2/3 beyond (5 levels);
    # a difficult row ranked first or between counts neither way; a class without a positive is NaN
    scores = torch.tensor([[0.9, 0.9], [0.8, 0.8], [0.7, 0.7], [0.95, 0.95]])
    targets = torch.tensor([[1, -1], [-1, -1], [1, -1], [0, 0]], dtype=torch.int8)
    got = average_precision_11(scores, targets)
    assert float(got[0]) == pytest.approx((6 + 5 * 2 / 3) / 11) and torch.isnan(got[1])


def test_one_fit_of_every_class_is_scikit_learns_fit_of_each(tmp_path: Path) -> None:
    """The module's joint objective separates: each class's columns are scikit-learn's binary
    logistic regression at the same C on that class's known rows (difficult left out)."""
    generator = torch.Generator().manual_seed(1)
    features = torch.nn.functional.normalize(torch.randn(120, 6, generator=generator, dtype=torch.float64), dim=1)
    targets = torch.where(features[:, :4] + 0.5 * torch.randn(120, 4, generator=generator, dtype=torch.float64) > 0,
                          1, -1).to(torch.float64)
    targets[torch.rand(120, 4, generator=generator) < 0.15] = 0
    for c in (0.1, 10.0):
        weight, bias = fit_logistic(features, targets, 4, c, loss=one_vs_rest_loss)
        for k in range(4):
            kept = targets[:, k] != 0
            want = LogisticRegression(C=c, tol=1e-12, max_iter=10_000).fit(features[kept].numpy(),
                                                                          targets[kept, k].numpy() > 0)
            np.testing.assert_allclose(weight[:, k].numpy(), want.coef_[0], atol=1e-4, rtol=1e-4)
            assert float(bias[k]) == pytest.approx(float(want.intercept_[0]), abs=1e-4)


def test_the_sweep_picks_c_by_the_held_out_map_and_scores_the_refit() -> None:
    """Against the same protocol written with scikit-learn: a fit per class and C, the held-out
    mAP (the curve-based AP), the refit on every train row at the first best C, its test mAP."""
    generator = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 16, generator=generator)
    present = torch.rand(260, 4, generator=generator) < 0.35
    features = (present.float() @ centres + torch.randn(260, 16, generator=generator))
    targets = torch.where(present, 1, -1).to(torch.int8)
    targets[torch.rand(260, 4, generator=generator) < 0.1] = 0
    held_out = torch.arange(200) >= 150
    config = LogRegConfig(c_values=(1e-3, 1e-2, 0.1, 1.0, 10.0))
    result = multilabel_logistic_regression(features[:200], targets[:200], held_out, features[200:], targets[200:],
                                            config)
    x = torch.nn.functional.normalize(features, dim=1).double().numpy()
    t = targets.numpy()

    def sklearn_scores(rows: np.ndarray, c: float, on: np.ndarray) -> np.ndarray:
        columns = []
        for k in range(4):
            kept = rows[t[rows, k] != 0]
            model = LogisticRegression(C=c, tol=1e-12, max_iter=10_000).fit(x[kept], t[kept, k] > 0)
            columns.append(model.decision_function(x[on]))
        return np.stack(columns, 1)

    fit_rows, val_rows, test_rows = np.arange(150), np.arange(150, 200), np.arange(200, 260)
    val_maps = [np.mean([reference_ap(s[:, k], t[val_rows, k]) for k in range(4)])
                for s in (sklearn_scores(fit_rows, c, val_rows) for c in config.c_values)]
    np.testing.assert_allclose(result.val_maps, val_maps, atol=1e-6)
    best = int(np.argmax(val_maps))
    assert result.best_c == config.c_values[best] and result.val_map == pytest.approx(val_maps[best])
    refit = sklearn_scores(np.arange(200), config.c_values[best], test_rows)
    class_ap = [reference_ap(refit[:, k], t[test_rows, k]) for k in range(4)]
    np.testing.assert_allclose(result.class_ap, class_ap, atol=1e-6)
    assert result.test_map == pytest.approx(np.mean(class_ap))
    assert (result.num_train, result.num_val, result.num_test) == (150, 50, 60)


def test_the_release_is_read_as_laid_out_and_bad_lists_are_refused(tmp_path: Path) -> None:
    written = write_voc(tmp_path / "VOC2007")
    storage = Storage()
    assert is_voc(str(tmp_path / "VOC2007"), storage) and not is_voc(str(tmp_path), storage)
    for split in ("train", "val", "trainval", "test"):
        ids, targets = voc_targets(storage, str(tmp_path / "VOC2007"), split)
        assert ids == written[split][0] and targets.dtype == torch.int8
        np.testing.assert_array_equal(targets.numpy(), written[split][1])
    listing = tmp_path / "VOC2007" / "ImageSets" / "Main" / "dog_test.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="dog_test.txt must list each image of aeroplane_test.txt once"):
        voc_targets(storage, str(tmp_path / "VOC2007"), "test")
    listing.write_text("\n".join([lines[0].replace("-1", "2").replace(" 1", " 2").replace(" 0", " 2")]
                                 + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"dog_test.txt: each line must read '<id> <1\|0\|-1>'"):
        voc_targets(storage, str(tmp_path / "VOC2007"), "test")
    listing.unlink()
    with pytest.raises(FileNotFoundError, match="dog_test.txt is missing.*extract the test archive"):
        voc_targets(storage, str(tmp_path / "VOC2007"), "test")


def test_the_suite_scores_a_voc_release_among_the_finegrained_sets(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Its mAP is the protocol's on the images' features made independently (the evaluation's
    resize and centre crop written out), trained on train, C picked on val, refit on trainval; the
    coloured classes are learnt; a class-folder set beside it keeps its top-1; a rerun resumes."""
    written = write_voc(tmp_path / "VOC2007")
    write_folders(tmp_path / "pets", {"cat": (6, 2), "dog": (6, 2), "fish": (6, 2)})
    model = backbone()
    config = SuiteConfig(tasks=("finegrained",), finegrained_data=f"{tmp_path / 'VOC2007'},{tmp_path / 'pets'}",
                         image_size=28, work_dir=str(tmp_path / "work"))
    report = run_suite(model, config, pictures=tmp_path / "pictures")
    metrics, section = report["metrics"], report["tasks"]["finegrained"]["VOC2007"]
    assert {"finegrained_pets_top1", "finegrained_mean_top1", "finegrained_VOC2007_map"} <= set(metrics)
    assert "finegrained_VOC2007_top1" not in metrics and metrics["finegrained_mean_top1"] == metrics[
        "finegrained_pets_top1"]
    images = tmp_path / "VOC2007" / "JPEGImages"
    x = expected_features(model, [images / f"{i}.jpg" for i in written["trainval"][0]], 28)
    test_x = expected_features(model, [images / f"{i}.jpg" for i in written["test"][0]], 28)
    held_out = torch.arange(len(x)) >= SPLITS["train"]
    want = multilabel_logistic_regression(x, torch.from_numpy(written["trainval"][1]), held_out, test_x,
                                          torch.from_numpy(written["test"][1]))
    assert metrics["finegrained_VOC2007_map"] == pytest.approx(want.test_map, abs=1e-6)
    assert section["best_c"] == want.best_c and section["classes"] == list(VOC_CLASSES)
    assert (section["release"], section["protocol"]) == ("Pascal VOC", "map")
    assert metrics["finegrained_mean"] == pytest.approx((metrics["finegrained_VOC2007_map"]
                                                         + metrics["finegrained_pets_top1"]) / 2)
    assert (section["num_train"], section["num_val"], section["num_test"]) == (14, 10, 14)
    assert min(section["class_ap"][:COLOURED]) > 0.9  # the colours' classes, against ~1/3 by chance
    assert (tmp_path / "pictures" / "finegrained_sweeps.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(report["tasks"])
    made = []
    original = FolderImages._part
    monkeypatch.setattr(FolderImages, "_part", lambda self, *a, **k: made.append(1) or original(self, *a, **k))
    assert run_suite(model, config)["metrics"] == metrics and made == []
