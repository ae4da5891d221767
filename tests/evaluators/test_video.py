"""The video benchmark (evaluators/video.py): frames taken, pooled features against the backbone
run frame by frame, the synthetic clips' direction seen by a concatenation and not by a mean, and
class folders of video files, frame folders and animations read as the pictures they hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dinoflow.storage import Storage
from evaluators.features import to_model_input
from evaluators.suite import SuiteConfig, run_suite
from evaluators.video import (
    DIRECTIONS,
    ClipArray,
    VideoConfig,
    VideoFolder,
    decode_video,
    frame_indices,
    make_videos,
    video_features,
    video_probe,
)
from pipelines.cli import app
from trainer.data.datasets import resize_center_crop
from trainer.models.hub import save_backbone
from trainer.models.vit import build_vit


def tiny_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_small", img_size=28, patch_size=7, embed_dim=64, depth=3, num_heads=4,
                     layerscale_init=1.0).eval()


def write_video(path: Path, frames: np.ndarray, codec: str = "ffv1") -> None:
    """Frames ``(T, H, W, 3)`` uint8 as a video file through PyAV (FFV1 in RGB: lossless)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_frames_taken_are_the_first_the_last_and_evenly_between() -> None:
    assert frame_indices(8, 8) == list(range(8))
    assert frame_indices(16, 8) == [round(x) for x in np.linspace(0, 15, 8)] == [0, 2, 4, 6, 9, 11, 13, 15]
    assert frame_indices(3, 5) == [0, 0, 1, 2, 2]  # a short video gives some twice
    assert frame_indices(300, 8)[::7] == [0, 299]
    with pytest.raises(ValueError, match="no frames"):
        frame_indices(0, 8)


def test_pooled_features_are_the_frames_cls_tokens_and_only_a_concatenation_sees_the_direction() -> None:
    backbone = tiny_backbone()
    clips, labels = make_videos(2, 8, 28, seed=0)
    assert [DIRECTIONS[i] for i in labels[:4]] == ["left", "right", "up", "down"]
    assert np.array_equal(clips[1], clips[0][::-1]) and np.array_equal(clips[3], clips[2][::-1])
    # the reference: the backbone on each frame alone, its CLS tokens averaged or laid side by side
    with torch.no_grad():
        frames = to_model_input(torch.from_numpy(clips).flatten(0, 1).permute(0, 3, 1, 2), patch_size=7)
        cls = backbone.forward_features(frames)["x_norm_clstoken"].view(len(clips), 8, -1)
    for pool, expected in (("mean", cls.mean(1)), ("concat", cls.flatten(1))):
        features, got, bad = video_features(backbone, ClipArray(clips, labels, 8), 28, pool, batch_size=3)
        torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
        assert got.tolist() == labels.tolist() and bad == 0
    mean, _, _ = video_features(backbone, ClipArray(clips, labels, 8), 28, "mean")
    torch.testing.assert_close(mean[0], mean[1], rtol=1e-5, atol=1e-6)  # a clip and its reversal: one mean

    # so a probe on means can get one clip of each pair right at most; a concatenation tells them apart
    scores = {pool: video_probe(backbone, "", VideoConfig(pool=pool, image_size=28), Storage(), torch.device("cpu"))
              for pool in ("mean", "concat")}
    assert scores["mean"]["test_accuracy"] <= 0.5
    assert scores["concat"]["test_accuracy"] > 0.7, scores["concat"]
    assert scores["concat"]["classes"] == list(DIRECTIONS) and scores["concat"]["frames"] == 8
    # the suite's task: the synthetic clips at its scenes' size, drawn from its seed
    suite = run_suite(backbone, SuiteConfig(tasks=("video",), scene_size=28, video_pool="concat", seed=5))
    direct = video_probe(backbone, "", VideoConfig(pool="concat", image_size=28), Storage(), torch.device("cpu"), seed=8)
    assert suite["metrics"]["video_top1"] == direct["test_accuracy"] == suite["tasks"]["video"]["test_accuracy"]
    with pytest.raises(ValueError, match="unknown video pool 'max'; allowed: auto, mean, concat"):
        SuiteConfig(tasks=("video",), video_pool="max")


def write_folders(root: Path, clips: np.ndarray, labels: np.ndarray) -> None:
    """Each clip in a class folder as FFV1 .mkv, a folder of PNG frames or a lossless animated
    WebP, in turn; and an undecodable .mp4 in the first class."""
    for index, (clip, label) in enumerate(zip(clips, labels)):
        folder = root / DIRECTIONS[label]
        folder.mkdir(parents=True, exist_ok=True)
        kind = index % 3
        if kind == 0:
            write_video(folder / f"clip{index}.mkv", clip)
        elif kind == 1:
            (folder / f"clip{index}").mkdir()
            for t, frame in enumerate(clip):
                Image.fromarray(frame).save(folder / f"clip{index}" / f"{t:04d}.png")
        else:
            first, *rest = [Image.fromarray(frame) for frame in clip]
            first.save(folder / f"clip{index}.webp", save_all=True, append_images=rest, lossless=True)


def test_an_unreadable_video_is_a_value_error_naming_it_and_the_suite_imports_without_pyav() -> None:
    """PyAV's own errors become the ``ValueError`` a clip's reader skips; PyAV is imported only to
    decode a video file, so the suite (and a GPU image without PyAV) runs every other task."""
    with pytest.raises(ValueError, match="^clips/broken.mp4: "):
        decode_video(b"\x00\x00\x00\x18ftypmp42" + bytes(200), "clips/broken.mp4", 4)
    blocked = "import sys; sys.modules['av'] = None; import evaluators.suite; import evaluators.video; print('ok')"
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_class_folders_of_videos_frames_and_animations_read_as_their_pictures(tmp_path: Path) -> None:
    clips, labels = make_videos(2, 12, 40, seed=1)
    write_folders(tmp_path / "train", clips, labels)
    (tmp_path / "train" / "left" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    (tmp_path / "train" / "left" / ".hidden.mkv").write_bytes(b"skipped")
    videos = VideoFolder(Storage(), str(tmp_path / "train"), frames=4, load_size=32)
    assert videos.classes == ("down", "left", "right", "up") and len(videos) == len(clips) + 1
    kinds = set()
    for index in range(len(videos)):
        sample = videos[index]
        if sample.key.endswith("broken.mp4"):
            assert sample.image is None
            continue
        source = int(sample.key.rsplit("clip", 1)[1].split(".")[0])
        kinds.add(sample.key.rsplit(".", 1)[-1] if "." in sample.key.rsplit("/", 1)[1] else "frames")
        expected = np.stack([np.asarray(resize_center_crop(Image.fromarray(clips[source][t]), 32))
                             for t in frame_indices(12, 4)])
        assert videos.classes[sample.label] == DIRECTIONS[labels[source]] and sample.image.shape == (4, 3, 32, 32)
        assert np.array_equal(sample.image.permute(0, 2, 3, 1).numpy(), expected), sample.key
    assert kinds == {"mkv", "frames", "webp"}

    # an MPEG-4 file is lossy: its frames close to the source's
    (tmp_path / "lossy" / "left").mkdir(parents=True)
    write_video(tmp_path / "lossy" / "left" / "clip.mp4", clips[0], codec="mpeg4")
    lossy = VideoFolder(Storage(), str(tmp_path / "lossy"), frames=4, load_size=32)[0]
    expected = np.stack([np.asarray(resize_center_crop(Image.fromarray(clips[0][t]), 32))
                         for t in frame_indices(12, 4)])
    decoded = lossy.image.permute(0, 2, 3, 1).numpy().astype(float)
    assert lossy.label == 0 and np.abs(decoded - expected).mean() < 6
    every = np.stack([np.asarray(resize_center_crop(Image.fromarray(frame), 32)) for frame in clips[0]])
    nearest = [int(np.abs(frame - every).mean(axis=(1, 2, 3)).argmin()) for frame in decoded]
    assert nearest == frame_indices(12, 4)  # the frames taken as the container counted them

    with pytest.raises(FileNotFoundError, match="no videos under"):
        VideoFolder(Storage(), str(tmp_path / "train" / "left"), frames=4, load_size=32)
    write_folders(tmp_path / "val", clips[:2], np.array([0, 1]))
    (tmp_path / "val" / "sideways").mkdir()
    write_video(tmp_path / "val" / "sideways" / "x.mkv", clips[0])
    with pytest.raises(ValueError, match=r"classes \['sideways'\] are not among train's 4"):
        VideoFolder(Storage(), str(tmp_path / "val"), 4, 32, videos.classes)


def test_a_folder_of_frames_is_taken_in_the_order_of_the_numbers_in_their_names(tmp_path: Path) -> None:
    """FFmpeg's ``%d`` names (1.png ... 12.png) sort as text as 1, 10, 11, 12, 2, ...: the frames are
    taken by their numbers instead, as zero-padded names (already in text order) still are."""
    names = {"ffmpeg": "{}.png", "padded": "{:05d}.png", "prefixed": "frame_{}.png"}
    for video, pattern in names.items():
        (tmp_path / "train" / "left" / video).mkdir(parents=True)
        for t in range(12):  # frame t (from 1 in FFmpeg's numbering) of the shade 20 t
            Image.new("RGB", (8, 8), (20 * t,) * 3).save(tmp_path / "train" / "left" / video / pattern.format(t + 1))
    videos = VideoFolder(Storage(), str(tmp_path / "train"), frames=12, load_size=8)
    for index in range(len(videos)):
        sample = videos[index]
        assert sample.image[:, 0, 0, 0].tolist() == [20 * t for t in range(12)], sample.key


def test_the_command_probes_class_folders_of_videos_and_refuses_a_bad_pool(tmp_path: Path) -> None:
    save_backbone(tiny_backbone(), str(tmp_path / "backbone.safetensors"))
    for split, seed in (("train", 2), ("val", 3)):
        clips, labels = make_videos(6 if split == "train" else 2, 8, 32, seed)
        write_folders(tmp_path / "videos" / split, clips, labels)
    args = ["eval", "video", "--weights", str(tmp_path / "backbone.safetensors"), "--video-data",
            str(tmp_path / "videos"), "--image-size", "28", "--video-frames", "8", "--video-pool", "concat"]
    result = CliRunner().invoke(app, [*args, "--pictures", str(tmp_path / "pictures")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pictures" / "video_frames.png").stat().st_size > 5000  # 4 test videos x 8 frames
    report = json.loads(result.stdout)
    video = report["tasks"]["video"]
    assert (video["num_train"] + video["num_val"], video["num_test"], video["pool"]) == (24, 8, "concat")
    assert video["feature_dim"] == 8 * 64 and report["metrics"]["video_top1"] == video["test_accuracy"]
    refused = CliRunner().invoke(app, [*args[:-1], "max"])
    assert refused.exit_code == 2 and "unknown video pool 'max'; allowed: auto, mean, concat" in refused.stderr
