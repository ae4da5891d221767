"""``benchmarks/drop_path.py`` on a small block: it compiles the three forms of stochastic depth,
times them in alternating rounds and writes its figures (a run stopped in its rounds keeps the compiled
forms'); the subset forms agree from the same draws. Timings are never asserted: only that each figure
is there and positive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.trainer.test_distributed import ROOT
from tests.trainer.test_gpu_summary import gpu_summary

SCRIPT = ROOT / "benchmarks" / "drop_path.py"
SMALL = ["--device", "cpu", "--dim", "32", "--heads", "4", "--global-tokens", "17", "--local-tokens", "5"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *SMALL, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)), timeout=600, check=False)


def test_the_three_forms_are_timed_and_the_subset_forms_agree(tmp_path: Path) -> None:
    figures_path = tmp_path / "drop_path.json"
    done = _run("--batch", "5", "--rate", "0.4", "--steps", "1", "--rounds", "2", "--json", str(figures_path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    figures = json.loads(figures_path.read_text())
    assert figures["shapes"] == [[10, 17], [40, 5]] and figures["kept"] == [6, 24]
    assert list(figures["forms"]) == ["mask", "subset", "index_add"]
    assert all(form["ms"] > 0 and form["mask_over_this"] > 0 for form in figures["forms"].values())
    assert figures["forms"]["mask"]["mask_over_this"] == 1.0
    assert figures["subset_vs_index_add_max_difference"] <= 1e-5  # the same draws, the same rows
    assert "subset against index_add from the same draws" in done.stdout


def test_a_run_stopped_in_its_rounds_keeps_the_compiled_forms_figures(tmp_path: Path) -> None:
    """As ``gpu_check.sh``'s timeout stops it: the JSON written once the forms are compiled holds their
    difference, and the summary shows the untimed forms without times."""
    figures_path = tmp_path / "drop_path.json"
    run = subprocess.Popen([sys.executable, str(SCRIPT), *SMALL, "--batch", "5", "--rate", "0.4", "--steps", "1",
                            "--rounds", "1000000", "--json", str(figures_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                       PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 300
        while not figures_path.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        run.kill()
        _, stderr = run.communicate()
    assert figures_path.exists(), stderr[-4000:]
    figures = json.loads(figures_path.read_text())
    assert list(figures["forms"]) == ["mask", "subset", "index_add"]
    assert all("ms" not in form for form in figures["forms"].values())  # the rounds never finished
    assert figures["subset_vs_index_add_max_difference"] <= 1e-5
    steps = [{"step": "drop_path", "status": "timeout", "exit_code": "124", "seconds": "90", "limit_seconds": "90",
              "result": figures}]
    text = gpu_summary.markdown(steps)
    assert "| mask | - | - |  |" in text and "| index_add | - | - |  |" in text
    assert "subset against index_add from the same draws: max abs output difference" in text


def test_a_batch_whose_groups_cannot_keep_the_rate_is_refused() -> None:
    done = _run("--batch", "4", "--rate", "0.1")
    assert done.returncode == 2
    assert "at --rate 0.1 the groups [(8, 17), (32, 5)] cannot keep their share in whole samples" in done.stderr
