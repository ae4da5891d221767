"""Stage plumbing: content-hash cache entries on file:// and s3://, error records, cache keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.stage import StageContext, cache_key, error_uri, file_digest, recording_errors, run_cached
from dinoflow.storage import Storage, join_uri


def _work(out: Path, calls: list[int], value: str):
    def work() -> dict:
        calls.append(1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "weights.bin").write_text(value)
        (out / "nested").mkdir(exist_ok=True)
        (out / "nested" / "report.json").write_text(json.dumps({"v": value}))
        return {"value": value}
    return work


def test_a_finished_stage_is_reused_and_its_outputs_restored(storage_root: tuple[Storage, str], tmp_path: Path) -> None:
    storage, root = storage_root
    ctx = StageContext(run_root=root)
    calls: list[int] = []
    first = run_cached(ctx, storage, "pretrain", "k1", tmp_path / "a", _work(tmp_path / "a", calls, "one"))
    assert first == {"value": "one", "cached": False} and len(calls) == 1
    second = run_cached(ctx, storage, "pretrain", "k1", tmp_path / "b", _work(tmp_path / "b", calls, "two"))
    assert second == {"value": "one", "cached": True} and len(calls) == 1
    assert (tmp_path / "b" / "weights.bin").read_text() == "one"
    assert json.loads((tmp_path / "b" / "nested" / "report.json").read_text()) == {"v": "one"}
    other = run_cached(ctx, storage, "pretrain", "k2", tmp_path / "c", _work(tmp_path / "c", calls, "three"))
    assert other["cached"] is False and len(calls) == 2


def test_an_entry_without_its_result_is_recomputed(storage_root: tuple[Storage, str], tmp_path: Path) -> None:
    storage, root = storage_root
    ctx = StageContext(run_root=root)
    # a stage killed while uploading: outputs there, result.json (written last) missing
    storage.write_bytes(join_uri(root, "cache", "evaluate", "k", "outputs", "weights.bin"), b"half")
    calls: list[int] = []
    result = run_cached(ctx, storage, "evaluate", "k", tmp_path / "o", _work(tmp_path / "o", calls, "full"))
    assert result["cached"] is False and len(calls) == 1
    assert storage.read_bytes(join_uri(root, "cache", "evaluate", "k", "outputs", "weights.bin")) == b"full"


def test_cache_off_always_recomputes(tmp_path: Path) -> None:
    ctx = StageContext(run_root=str(tmp_path / "root"), use_cache=False)
    calls: list[int] = []
    for name in ("a", "b"):
        run_cached(ctx, Storage(), "s", "k", tmp_path / name, _work(tmp_path / name, calls, name))
    assert len(calls) == 2 and not (tmp_path / "root" / "cache").exists()


def test_errors_are_recorded_then_raised(tmp_path: Path) -> None:
    storage = Storage()
    ctx = StageContext(run_root=str(tmp_path), pipeline_run_id="run-7")
    with pytest.raises(KeyError, match="missing"), recording_errors(ctx, storage, "evaluate"):
        raise KeyError("missing")
    record = json.loads(storage.read_bytes(error_uri(ctx, "evaluate")))
    assert record["stage"] == "evaluate" and record["error"] == "KeyError: 'missing'"
    assert "Traceback" in record["traceback"] and "run-7" in error_uri(ctx, "evaluate")


def test_a_bad_evaluate_setting_is_recorded_before_any_work(tmp_path: Path) -> None:
    """The suite's settings are checked inside the error record: the pipeline's failure then names
    the setting, not only the task (no tracking, no backbone needed to get there)."""
    from components.evaluate import run_evaluate_stage

    ctx = StageContext(run_root=str(tmp_path), pipeline_run_id="run-8")
    with pytest.raises(ValueError, match="unknown tasks"):
        run_evaluate_stage(ctx, tmp_path / "backbone", tmp_path / "report", "", tasks=["knn", "segment"])
    record = json.loads(Storage().read_bytes(error_uri(ctx, "evaluate")))
    assert record["error"].startswith("ValueError: unknown tasks") and "allowed: knn, linear" in record["error"]


def test_cache_key_depends_on_parameters_and_input_bytes(tmp_path: Path) -> None:
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc")
    key = cache_key("evaluate", {"k": 20}, {"backbone": weights})
    assert key == cache_key("evaluate", {"k": 20}, {"backbone": weights})
    assert key != cache_key("evaluate", {"k": 10}, {"backbone": weights})
    assert key != cache_key("pretrain", {"k": 20}, {"backbone": weights})
    weights.write_bytes(b"abd")
    assert key != cache_key("evaluate", {"k": 20}, {"backbone": weights})
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "x").write_bytes(b"1")
    digest = file_digest(folder)
    (folder / "x").rename(folder / "y")
    assert file_digest(folder) != digest  # names count, not only bytes


def test_a_context_needs_a_run_root() -> None:
    with pytest.raises(ValueError, match="run_root is empty"):
        StageContext(run_root="")
