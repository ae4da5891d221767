"""ImageNet-C in the suite: the clean probes scored on each corruption/severity folder, and the mCE."""

from __future__ import annotations

import dataclasses
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from evaluators.classification import FolderImages
from evaluators.corruptions import (ALEXNET_ERRORS, CORRUPTIONS, corruption_metrics, mean_corruption_error,
                                    mean_error)
from evaluators.linear import LinearProbeConfig, linear_probe, probe_accuracy
from evaluators.suite import SuiteConfig, run_suite
from tests.evaluators.test_classification import CLASSES, backbone, write_folders
from trainer.data.datasets import read_image


def noisy(image: Image.Image, severity: int) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    noise = np.random.default_rng(severity).normal(0, 90 * severity, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def blurred(image: Image.Image, severity: int) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=2 * severity))


def hazed(image: Image.Image, severity: int) -> Image.Image:
    """Blended with a haze of a colour of its own: the k-NN's colour classes then err too."""
    pixels = np.asarray(image, dtype=np.float64)
    haze = np.random.default_rng(int(pixels.sum())).uniform(0, 255, 3)
    share = 0.35 * severity
    return Image.fromarray((pixels * (1 - share) + haze * share).astype(np.uint8))


PERTURBATIONS = {"gaussian_noise": noisy, "defocus_blur": blurred, "fog": hazed}


def write_corruptions(root: Path, val: Path, severities: tuple[int, ...] = (1, 2)) -> list[Path]:
    """``root/<corruption>/<severity>/<class>/*.png``, ImageNet-C's layout: ``val``'s images perturbed,
    fog at severity 2 without the class fish (a folder of fewer classes); the folders made."""
    folders = []
    for name, perturb in PERTURBATIONS.items():
        for severity in severities:
            folder = root / name / str(severity)
            for image_file in sorted(val.rglob("*.png")):
                if name == "fog" and severity == 2 and image_file.parent.name == "fish":
                    continue
                target = folder / image_file.parent.name / image_file.name
                target.parent.mkdir(parents=True, exist_ok=True)
                perturb(Image.open(image_file).convert("RGB"), severity).save(target)
            folders.append(folder)
    (root / "gaussian_noise" / "README.txt").write_text("not a severity")  # ignored beside the severities
    return folders


def cropped_only(folder: Path, out: Path, size: int) -> Path:
    """``folder``'s images as ImageNet-C's evaluation sees them (the centre ``size`` square of the
    image with its shorter side at ``size``: no resize to 256 first), each written in the middle
    of a square of ``size / 0.875`` (lossless PNG), so that val's transform (resize to that, centre
    crop ``size``) reads exactly those pixels back: a ``test_uri`` of them is the reference."""
    load = round(size / 0.875)
    for image_file in sorted(folder.rglob("*.png")):
        pixels = read_image(image_file.read_bytes(), size).permute(1, 2, 0).numpy()
        canvas = np.full((load, load, 3), 255, np.uint8)  # a border the crop drops
        offset = (load - size) // 2
        canvas[offset:offset + size, offset:offset + size] = pixels
        target = out / image_file.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas).save(target)
    return out


def counted_test_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of each further test set's feature pass, appended as they are made."""
    made: list[int] = []
    original = FolderImages.test_features

    def counted(self: FolderImages, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        data = original(self, *args, **kwargs)
        made.append(len(data.test_y))
        return data

    monkeypatch.setattr(FolderImages, "test_features", counted)
    return made


def test_each_folder_is_scored_by_the_probe_and_knn_trained_on_the_clean_train_split(tmp_path: Path) -> None:
    """The independent reference: the suite run with ``test_uri`` = one folder's images as
    ImageNet-C's evaluation crops them (:func:`cropped_only`) trains the same probe (same seed,
    same train features) and k-NN bank, so its test accuracies are that folder's."""
    write_folders(tmp_path / "in", {"cat": (12, 6), "dog": (12, 6), "fish": (12, 6)})
    folders = write_corruptions(tmp_path / "c", tmp_path / "in" / "val")
    model = backbone()
    tasks = ("knn", "linear", "logreg")
    config = SuiteConfig(tasks=tasks, data_uri=str(tmp_path / "in"), image_size=28,
                         corruption_uri=str(tmp_path / "c"))
    report = run_suite(model, config, pictures=tmp_path / "pictures")
    assert (tmp_path / "pictures" / "corruption_errors.png").read_bytes()[:4] == b"\x89PNG"
    section = report["tasks"]["classification"]["corruptions"]
    assert section["knn_k"] == 20 and section["view"] == report["tasks"]["classification"]["linear"]["view"]
    assert sorted(section["linear"]) == sorted(PERTURBATIONS) and section["linear"]["fog"].keys() == {"1", "2"}
    assert section["logreg"].keys() == section["knn"].keys() == section["linear"].keys()
    for folder in folders:
        as_val = cropped_only(folder, tmp_path / "ref" / folder.parent.name / folder.name, 28)
        alone = run_suite(model, SuiteConfig(tasks=tasks, data_uri=str(tmp_path / "in"), image_size=28,
                                             test_uri=str(as_val)))["metrics"]
        corruption, severity = folder.parent.name, folder.name
        assert section["linear"][corruption][severity] == pytest.approx(alone["linear_top1"]), folder
        assert section["knn"][corruption][severity] == pytest.approx(alone["knn_top1_k20"]), folder
        assert section["logreg"][corruption][severity] == pytest.approx(alone["logreg_top1"]), folder
    scored = [acc for name in tasks for by_severity in section[name].values() for acc in by_severity.values()]
    assert len(set(scored)) > 3 and min(scored) < 1  # the folders differ: a check that can fail
    metrics = report["metrics"]
    for name in ("linear", "logreg"):
        errors = {c: [1 - acc for acc in by_severity.values()] for c, by_severity in section[name].items()}
        assert metrics[f"corruption_{name}_error"] == pytest.approx(np.mean([np.mean(e) for e in errors.values()]))
    assert 0 <= metrics["corruption_knn_error"] <= 1
    assert "corruption_linear_mce" not in metrics  # 3 of the 15 corruptions: no mCE
    report.pop("features")
    json.dumps(report)


def test_features_are_made_one_folder_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory claim, structurally: each feature pass is one folder's images, and the folder
    before's features are freed before the next folder's are made."""
    write_folders(tmp_path / "in", {"cat": (8, 3), "dog": (8, 3), "fish": (8, 3)})
    folders = write_corruptions(tmp_path / "c", tmp_path / "in" / "val")
    made = []  # (rows, a weak reference to the folder's features)
    original = FolderImages.test_features

    def spied(self: FolderImages, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        assert all(features() is None for _, features in made), "a folder's features outlived it"
        data = original(self, *args, **kwargs)
        made.append((len(data.test_y), weakref.ref(data.views[1])))
        return data

    monkeypatch.setattr(FolderImages, "test_features", spied)
    config = SuiteConfig(tasks=("knn", "linear"), data_uri=str(tmp_path / "in"), image_size=28, ks=(5,),
                         corruption_uri=str(tmp_path / "c"))
    run_suite(backbone(), config)
    expected = sorted((f.parent.name, int(f.name), len(list(f.rglob("*.png")))) for f in folders)
    assert [rows for rows, _ in made] == [count for _, _, count in expected]


def test_a_rerun_reads_each_folders_saved_scores_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a work_dir, a folder scored once is not passed over again (a preempted task resumes):
    the rerun makes no folder's features and reports the same; a folder whose scores are gone is
    scored anew, alone; other classifiers (the k-NN's k) score into a folder of their own."""
    write_folders(tmp_path / "in", {"cat": (8, 3), "dog": (8, 3), "fish": (8, 3)})
    folders = write_corruptions(tmp_path / "c", tmp_path / "in" / "val")
    made = counted_test_passes(monkeypatch)
    work = tmp_path / "work"
    config = SuiteConfig(tasks=("knn", "linear"), data_uri=str(tmp_path / "in"), image_size=28, ks=(5,),
                         corruption_uri=str(tmp_path / "c"), work_dir=str(work))
    model = backbone()
    first = run_suite(model, config)["tasks"]["classification"]["corruptions"]
    assert len(made) == len(folders)
    saved = sorted((work / "corruptions").glob("*/*/*.json"))
    assert len(saved) == len(folders) and len({path.parent.parent for path in saved}) == 1
    made.clear()
    assert run_suite(model, config)["tasks"]["classification"]["corruptions"] == first and made == []
    saved[0].unlink()  # a folder the preempted run did not reach
    assert run_suite(model, config)["tasks"]["classification"]["corruptions"] == first
    assert made == [len(list((tmp_path / "c" / saved[0].parent.name / saved[0].stem).rglob("*.png")))]
    made.clear()
    other = run_suite(model, dataclasses.replace(config, ks=(3,)))["tasks"]["classification"]["corruptions"]
    assert len(made) == len(folders) and other["knn_k"] == 3 and other["linear"] == first["linear"]
    assert len(list((work / "corruptions").iterdir())) == 2


def test_the_mce_is_alexnets_normalised_error_averaged_over_the_15_corruptions() -> None:
    """Hendrycks & Dietterich's formula by hand: CE_c = sum_s err / sum_s AlexNet's err, mCE their mean."""
    assert len(ALEXNET_ERRORS) == 15 and set(ALEXNET_ERRORS) == set(CORRUPTIONS)
    assert (ALEXNET_ERRORS["gaussian_noise"], ALEXNET_ERRORS["brightness"], ALEXNET_ERRORS["jpeg_compression"]) == (
        0.886428, 0.564592, 0.606500)  # the published numbers, spot-checked
    half = {c: {s: ALEXNET_ERRORS[c] / 2 for s in range(1, 6)} for c in CORRUPTIONS}
    assert mean_corruption_error(half) == pytest.approx(0.5)  # half AlexNet's error everywhere
    rising = {c: {s: s / 10 for s in range(1, 6)} for c in CORRUPTIONS}  # 0.1 ... 0.5: sum 1.5 on each
    by_hand = sum(1.5 / (5 * ALEXNET_ERRORS[c]) for c in CORRUPTIONS) / 15
    assert mean_corruption_error(rising) == pytest.approx(by_hand)
    assert mean_error(rising) == pytest.approx(0.3)
    assert mean_corruption_error({**rising, "fog": {1: 0.1, 2: 0.2}}) is None  # severities missing: no mCE
    assert mean_corruption_error({c: e for c, e in rising.items() if c != "fog"}) is None
    assert mean_error({"fog": {1: 0.2, 2: 0.4}, "snow": {1: 0.9}}) == pytest.approx((0.3 + 0.9) / 2)
    accuracies = {c: {str(s): 1 - e for s, e in by_severity.items()} for c, by_severity in rising.items()}
    metrics = corruption_metrics({"knn_k": 20, "knn": accuracies, "linear": accuracies})
    assert metrics["corruption_linear_mce"] == pytest.approx(by_hand) == metrics["corruption_knn_mce"]
    assert metrics["corruption_knn_error"] == pytest.approx(0.3)


def test_a_probe_result_scores_further_test_sets_with_its_own_classifier() -> None:
    """The classifier linear_probe tested (and its scaling) stays on its result, out of its JSON."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 6, generator=generator) * 3
    labels = torch.arange(90) % 3
    train = centres[labels] + torch.randn(90, 6, generator=generator)
    test, test_labels = centres[labels[:30]] + torch.randn(30, 6, generator=generator) * 2, labels[:30]
    for refit in (True, False):
        result = linear_probe(train, labels, test, test_labels, LinearProbeConfig(epochs=3, refit=refit))
        assert probe_accuracy(result, test, test_labels) == result.test_accuracy
        kept = torch.tensor([0, 2])
        rows = test_labels != 1
        assert probe_accuracy(result, test[rows], test_labels[rows], kept) == linear_probe(
            train, labels, test[rows], test_labels[rows], LinearProbeConfig(epochs=3, refit=refit),
            num_classes=3, test_classes=kept).test_accuracy
        as_dict = json.loads(json.dumps(result.to_dict()))
        assert "classifier" not in as_dict and "scaling" not in as_dict and as_dict["refit"] == refit


def test_bad_corruption_layouts_are_refused_with_the_path_and_the_layout(tmp_path: Path) -> None:
    write_folders(tmp_path / "in", {"cat": (8, 2), "dog": (8, 2), "fish": (8, 2)})
    flat = tmp_path / "flat"  # class folders straight under the root: no <corruption>/<severity>/
    for name in CLASSES:
        (flat / "gaussian_noise" / name).mkdir(parents=True)
        Image.new("RGB", (30, 30)).save(flat / "gaussian_noise" / name / "0.png")
    config = SuiteConfig(tasks=("knn",), data_uri=str(tmp_path / "in"), image_size=28, corruption_uri=str(flat))
    with pytest.raises(ValueError, match=rf"corruption_uri {flat}: no <corruption>/<severity>/ folders; expected "
                                         r"<corruption>/<severity 1-5>/<class>/<image>"):
        run_suite(backbone(), config)
    (tmp_path / "c" / "fog" / "1" / "bird").mkdir(parents=True)  # a class train lacks
    Image.new("RGB", (30, 30)).save(tmp_path / "c" / "fog" / "1" / "bird" / "0.png")
    with pytest.raises(ValueError, match=r"fog/1: classes \['bird'\] are not among train's 3 class folders"):
        run_suite(backbone(), SuiteConfig(tasks=("knn",), data_uri=str(tmp_path / "in"), image_size=28,
                                          corruption_uri=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="corruption_uri .* needs knn, linear or logreg on a data_uri of class"):
        SuiteConfig(tasks=("seg",), corruption_uri=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="corruption_uri .* needs knn, linear or logreg on a data_uri of class"):
        SuiteConfig(data_uri="x", data_kind="fashion_mnist", corruption_uri=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="corruption_uri .*: further test sets are scored by probes trained on "
                                         "class folders.* holds Fashion-MNIST"):
        run_suite(backbone(), SuiteConfig(tasks=("knn",), data_uri="/usr/share/datasets/fashion-mnist",
                                          train_limit=50, test_limit=10, corruption_uri=str(tmp_path / "c")))
