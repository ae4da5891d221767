"""The video sets read as released (evaluators/video_sets.py): tiny fakes of UCF-101, Kinetics-400 and
Something-Something v2 laid out as their archives extract, with real video files in each set's own
container and codec (UCF-101 MPEG-4 in .avi, Kinetics H.264 in .mp4, SSv2 VP9 in .webm), each video
a colour of its own; every video found in the split and class the lists written here say, and read
as its own file; CRLF lists, videos listed but absent, and incomplete releases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoflow.storage import Storage
from evaluators.suite import SuiteConfig, run_suite
from evaluators.video import VideoConfig, video_probe, video_splits
from evaluators.video_sets import read_video_release, video_release_at
from tests.evaluators.test_video import tiny_backbone, write_video

CONFIG = VideoConfig(frames=4, image_size=28)  # the videos' 32 px are its load size (28 / 0.875)


def colour(index: int) -> np.ndarray:
    """The colour of the ``index``-th video written: far apart from the others' (RGB, uint8)."""
    return np.array([40 + 70 * (index % 3), 40 + 70 * (index // 3 % 3), 220 - 90 * (index // 9)], dtype=np.uint8)


def write_clip(path: Path, index: int, codec: str) -> None:
    """4 frames 32 x 32 of :func:`colour` ``index`` as a video file (the container from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, np.broadcast_to(colour(index), (4, 32, 32, 3)).copy(), codec=codec)


def assert_read_as_written(root: Path, truth: dict[str, tuple[str, int, int]], classes: tuple[str, ...],
                           source: str, missing: dict[str, int]) -> None:
    """The release at ``root`` read by the probe: each video (its key) in the split and class
    ``truth`` gives it (split, class index, colour index), its frames the colour written."""
    splits = video_splits(str(root), CONFIG, Storage())
    assert (splits.classes, splits.source, splits.missing) == (classes, source, missing)
    written = np.stack([colour(i) for i in range(27)]).astype(float)
    read = {}
    for split, videos in (("train", splits.train), ("test", splits.test)):
        for index in range(len(videos)):
            sample = videos[index]
            assert sample.image.shape == (4, 3, 32, 32), sample.key
            mean = sample.image.float().mean(dim=(0, 2, 3)).numpy()
            read[sample.key] = (split, sample.label, int(np.abs(written - mean).sum(axis=1).argmin()))
    assert read == truth


# UCF-101: classInd's order, deliberately not the sorted one; the HandstandPushups folder holds
# v_HandStandPushups_* files, as released
UCF_CLASSES = ("YoYo", "ApplyEyeMakeup", "HandstandPushups")


def write_ucf101(root: Path) -> dict[str, tuple[str, int, int]]:
    """A UCF-101 release (videos of groups 8, 9 train split 1, group 1 tests it; group 10 lies only
    in split 2) with CRLF lists; the truth of split 1: list path -> (split, class index, colour)."""
    truth, lines = {}, {"trainlist01.txt": [], "testlist01.txt": [], "trainlist02.txt": []}
    for label, name in enumerate(UCF_CLASSES):
        for group, split in ((8, "train"), (9, "train"), (1, "test"), (10, None)):
            in_name = "HandStandPushups" if name == "HandstandPushups" else name
            path = f"{name}/v_{in_name}_g{group:02d}_c01.avi"
            write_clip(root / "UCF-101" / path, len(truth) if split else 18 + label, "mpeg4")
            if split == "train":
                lines["trainlist01.txt"].append(f"{path} {label + 1}")
            elif split == "test":
                lines["testlist01.txt"].append(path)
            else:
                lines["trainlist02.txt"].append(f"{path} {label + 1}")
            if split is not None:
                truth[path] = (split, label, len(truth))
    (root / "ucfTrainTestlist").mkdir()
    (root / "ucfTrainTestlist" / "classInd.txt").write_bytes(
        "".join(f"{i + 1} {name}\r\n" for i, name in enumerate(UCF_CLASSES)).encode())
    for listing, rows in lines.items():
        (root / "ucfTrainTestlist" / listing).write_bytes("".join(f"{row}\r\n" for row in rows).encode())
    return truth


def test_ucf101_reads_split_1_in_classind_order_from_crlf_lists(tmp_path: Path) -> None:
    truth = write_ucf101(tmp_path)
    assert video_release_at(str(tmp_path), Storage()) == "UCF-101"
    release = read_video_release("UCF-101", str(tmp_path), Storage())
    assert release.classes == UCF_CLASSES and len(release.train) == 6 and len(release.test) == 3
    assert [entry.uri for entry in release.test] == [str(tmp_path / "UCF-101" / key) for key in truth
                                                     if truth[key][0] == "test"]
    assert_read_as_written(tmp_path, truth, UCF_CLASSES, "UCF-101", {"train": 0, "test": 0})
    # a copy whose files are named HandstandPushups, the lists' HandStandPushups, reads the same
    folder = tmp_path / "UCF-101" / "HandstandPushups"
    for video in folder.iterdir():
        video.rename(folder / video.name.replace("HandStand", "Handstand"))
    assert_read_as_written(tmp_path, truth, UCF_CLASSES, "UCF-101", {"train": 0, "test": 0})

    # a train line whose number is another class's is refused
    listing = tmp_path / "ucfTrainTestlist" / "trainlist01.txt"
    listing.write_bytes(listing.read_bytes().replace(b".avi 1\r\n", b".avi 2\r\n", 1))
    with pytest.raises(ValueError, match=r"v_YoYo_g08_c01.avi is numbered 2, which classInd.txt gives to "
                                         r"'ApplyEyeMakeup', not 'YoYo'"):
        read_video_release("UCF-101", str(tmp_path), Storage())


def test_a_ucf101_line_naming_its_video_with_a_trailing_slash_finds_it(tmp_path: Path) -> None:
    """``YoYo/v_YoYo_g01_c01.avi/`` names the file storage reads as ``YoYo/v_YoYo_g01_c01.avi``: found,
    not counted missing (its file name was taken as ``""``)."""
    write_ucf101(tmp_path)
    listing = tmp_path / "ucfTrainTestlist" / "testlist01.txt"
    listing.write_bytes(listing.read_bytes().replace(b".avi\r\n", b".avi/\r\n", 1))
    release = read_video_release("UCF-101", str(tmp_path), Storage())
    assert len(release.test) == 3 and release.missing == {"train": 0, "test": 0}
    assert release.test[0].uri == str(tmp_path / "UCF-101" / "YoYo" / "v_YoYo_g01_c01.avi")


K400_CLASSES = ("abseiling", "passing American football (in game)", "tying knot (not on a tie)")
K400_TRAIN = [  # the csv's rows, as released: quoted where the name has spaces; the first a deleted video
    ('"tying knot (not on a tie)"', "gone_video1", 4, 14, None),
    ('"tying knot (not on a tie)"', "-2ZAw5Xo7bM", 12, 22, "train"),
    ('"tying knot (not on a tie)"', "a_b-cdEFgh1", 0, 10, "train"),
    ("abseiling", "0347ZoDXyP0", 14, 24, "train"),
    ("abseiling", "035LtPeUFTE", 5, 15, "train"),
    ('"passing American football (in game)"', "-5Kg0rgEqlM", 131, 141, "train"),
    ('"passing American football (in game)"', "08R6RV5zwVo", 275, 285, "train")]
K400_VAL = [('"passing American football (in game)"', "0iNaJt4Etxo", 1, 11, "test"),
            ("abseiling", "3caPS4FHFF8", 36, 46, "test"),
            ('"tying knot (not on a tie)"', "gone_video2", 0, 10, None),
            ('"tying knot (not on a tie)"', "dGnPBvKJjuA", 50, 60, "test")]


def write_kinetics(k400: Path) -> dict[str, tuple[str, int, int]]:
    """CVDF's ``k400/``: the csvs (LF, with a test split's too), the train and val videos they name
    but the deleted ones, a val video no csv names; the truth: key -> (split, class index, colour)."""
    (k400 / "annotations").mkdir(parents=True)
    truth = {}
    for csv_name, folder, rows in (("train", "train", K400_TRAIN), ("val", "val", K400_VAL),
                                   ("test", "test", [('"tying knot (not on a tie)"', "tst_video01", 0, 10, "x")])):
        text = "label,youtube_id,time_start,time_end,split\n"
        for label, youtube_id, start, end, split in rows:
            text += f"{label},{youtube_id},{start},{end},{csv_name}\n"
            key = f"{youtube_id}_{start:06d}_{end:06d}"
            if split is not None:
                write_clip(k400 / folder / f"{key}.mp4", len(truth), "libx264")
            if split in ("train", "test"):
                truth[key] = (split, K400_CLASSES.index(label.strip('"')), len(truth))
        (k400 / "annotations" / f"{csv_name}.csv").write_text(text)
    write_clip(k400 / "val" / "unlisted000_000000_000010.mp4", 20, "libx264")
    return truth


def test_kinetics_reads_the_csvs_and_skips_and_counts_the_videos_not_on_disk(tmp_path: Path) -> None:
    truth = write_kinetics(tmp_path / "k400")
    for root in (tmp_path / "k400", tmp_path):  # CVDF's folder, or one holding it
        assert video_release_at(str(root), Storage()) == "Kinetics-400"
        release = read_video_release("Kinetics-400", str(root), Storage())
        assert (release.classes, release.missing) == (K400_CLASSES, {"train": 1, "test": 1})
        assert {entry.key: entry.label for entry in release.test} == {key: label for key, (split, label, _)
                                                                     in truth.items() if split == "test"}
    assert_read_as_written(tmp_path / "k400", truth, K400_CLASSES, "Kinetics-400", {"train": 1, "test": 1})

    # a split none of whose videos is on disk fails; so does a csv missing
    for video in (tmp_path / "k400" / "val").iterdir():
        video.unlink()
    with pytest.raises(ValueError, match=r"none of the 4 videos .*k400/annotations/val.csv names is under .*k400/val"):
        read_video_release("Kinetics-400", str(tmp_path), Storage())
    (tmp_path / "k400" / "annotations" / "val.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"k400/annotations/val.csv is missing"):
        read_video_release("Kinetics-400", str(tmp_path), Storage())


# SSv2: the labels file's entries out of index order; a class's index is the labels file's, not its place
SSV2_LABELS = {"Putting something on a surface": "2", "Pushing something from left to right": "0",
               "Pushing something from right to left": "1"}
SSV2_CLASSES = ("Pushing something from left to right", "Pushing something from right to left",
                "Putting something on a surface")


def write_ssv2(root: Path) -> dict[str, tuple[str, int, int]]:
    """SSv2 as 20BN released it: ``labels/something-something-v2-*.json`` and VP9 ``<id>.webm`` files;
    the truth: id -> (split, class index, colour)."""
    templates = ["Pushing [something] from left to right", "Pushing [something] from right to left",
                 "Putting [something] on a surface"]
    truth, lists = {}, {"train": [], "validation": []}
    for index, (split, template) in enumerate([("train", t) for t in templates for _ in range(2)]
                                              + [("validation", t) for t in templates]):
        video_id = str(78687 + 13 * index)
        lists[split].append({"id": video_id, "label": template.replace("[something]", "a cup"),
                             "template": template, "placeholders": ["a cup"]})
        write_clip(root / "20bn-something-something-v2" / f"{video_id}.webm", index, "libvpx-vp9")
        truth[video_id] = ("train" if split == "train" else "test", int(SSV2_LABELS[template.replace("[", "")
                                                                                  .replace("]", "")]), index)
    (root / "labels").mkdir()
    (root / "labels" / "something-something-v2-labels.json").write_text(json.dumps(SSV2_LABELS))
    for split, entries in lists.items():
        (root / "labels" / f"something-something-v2-{split}.json").write_text(json.dumps(entries))
    return truth


def test_something_something_reads_classes_by_the_labels_index_and_templates_without_brackets(tmp_path: Path) -> None:
    truth = write_ssv2(tmp_path)
    assert video_release_at(str(tmp_path), Storage()) == "Something-Something v2"
    assert_read_as_written(tmp_path, truth, SSV2_CLASSES, "Something-Something v2", {"train": 0, "test": 0})

    # the later release's names (labels/labels.json, train.json, validation.json) read the same
    for name in ("labels", "train", "validation"):
        (tmp_path / "labels" / f"something-something-v2-{name}.json").rename(tmp_path / "labels" / f"{name}.json")
    release = read_video_release("Something-Something v2", str(tmp_path), Storage())
    assert release.classes == SSV2_CLASSES
    assert {entry.key: ("train", entry.label) for entry in release.train} | {
        entry.key: ("test", entry.label) for entry in release.test} == {key: value[:2] for key, value in truth.items()}

    # a template the labels file lacks is named
    entries = json.loads((tmp_path / "labels" / "validation.json").read_text())
    entries[1]["template"] = "Spinning [something] so it continues spinning"
    (tmp_path / "labels" / "validation.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=rf"validation.json: video {entries[1]['id']}'s template 'Spinning something "
                                         r"so it continues spinning' is not among labels.json's 3 classes"):
        read_video_release("Something-Something v2", str(tmp_path), Storage())


def test_ssv2_concatenates_its_frames_by_default_and_a_pool_given_is_run(tmp_path: Path) -> None:
    """SSv2's classes are motions (left to right, right to left: the same frames reversed), so its
    protocol concatenates; "auto", the default of the probe and the suite, runs it, and the report
    says which pool ran; a pool given is run as given."""
    write_ssv2(tmp_path)
    backbone = tiny_backbone()
    scores = video_probe(backbone, str(tmp_path), CONFIG, Storage(), torch.device("cpu"))
    assert (CONFIG.pool, scores["pool"], scores["feature_dim"]) == ("auto", "concat", 4 * 64)
    given = video_probe(backbone, str(tmp_path), VideoConfig(frames=4, image_size=28, pool="mean"), Storage(),
                        torch.device("cpu"))
    assert (given["pool"], given["feature_dim"]) == ("mean", 64)
    suite = run_suite(backbone, SuiteConfig(tasks=("video",), video_data=str(tmp_path), image_size=28,
                                            video_frames=4))
    assert (suite["config"]["video_pool"], suite["tasks"]["video"]["pool"]) == ("auto", "concat")


def test_a_ucf101_root_without_its_split_lists_is_refused_and_class_folders_are_no_release(tmp_path: Path) -> None:
    (tmp_path / "UCF-101" / "YoYo").mkdir(parents=True)
    (tmp_path / "UCF-101" / "YoYo" / "v_YoYo_g01_c01.avi").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"ucfTrainTestlist/classInd.txt is missing: UCF-101's split "
                                                r"lists ship apart .* UCF101TrainTestSplits-RecognitionTask.zip"):
        video_splits(str(tmp_path), CONFIG, Storage())
    (tmp_path / "folders" / "train" / "YoYo").mkdir(parents=True)
    assert video_release_at(str(tmp_path / "folders"), Storage()) is None


def test_the_probe_scores_a_release(tmp_path: Path) -> None:
    write_kinetics(tmp_path / "k400")
    scores = video_probe(tiny_backbone(), str(tmp_path / "k400"), CONFIG, Storage(), torch.device("cpu"))
    assert (scores["source"], scores["classes"], scores["num_classes"]) == ("Kinetics-400", list(K400_CLASSES), 3)
    assert scores["pool"] == "mean"  # "auto": Kinetics' classes are in the scene, its frames averaged
    assert (scores["num_train"] + scores["num_val"], scores["num_test"], scores["feature_dim"]) == (6, 3, 64)
    assert scores["missing"] == {"train": 1, "test": 1} and scores["bad"] == {"train": 0, "test": 0}
    assert 0 <= scores["test_accuracy"] <= 1 and 0 <= scores["val_accuracy"] <= 1
