"""``benchmarks/train_step.py`` on tiny sizes: it starts a real single process and 2 real
DeepSpeed ZeRO-3 ranks (torchrun, gloo on 127.0.0.1) and prints one table whose rows parse.
Timings are never asserted: only that each figure is there, has its unit's sense and is positive.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.trainer.test_deepspeed import ENV
from tests.trainer.test_distributed import ROOT, SMALL

SCRIPT = ROOT / "benchmarks" / "train_step.py"


def _table(output: str) -> list[dict[str, str]]:
    """The rows under the ``strategy ranks ...`` header, as column -> text."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["strategy", "ranks"])
    columns = lines[start].split()
    return [dict(zip(columns, line.split(), strict=True)) for line in lines[start + 1:] if line.strip()]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **ENV)


def test_benchmark_prints_single_and_deepspeed_rows_with_positive_figures() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--strategy", "deepspeed", "--nproc", "2", "--steps", "2", "--warmup", "1",
         "--threads", "2", "--", *SMALL, "optim.batch_size=2"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = _table(done.stdout)
    assert [(r["strategy"], int(r["ranks"])) for r in rows] == [("single", 1), ("deepspeed", 2)]
    for row in rows:
        assert int(row["global_batch"]) == 4  # 2 images x 2 ranks, all 4 in the single process
        assert float(row["img_per_s"]) > 0 and float(row["vs_single"]) > 0
        peaks = [float(mib) for mib in row["peak_mib_per_rank"].split(",")]
        assert len(peaks) == int(row["ranks"]) and all(mib > 0 for mib in peaks)
    assert float(rows[0]["vs_single"]) == 1.0


def test_benchmark_refuses_a_strategy_on_the_wrong_number_of_ranks() -> None:
    for strategy, nproc in (("single", "2"), ("deepspeed", "1")):
        done = subprocess.run([sys.executable, str(SCRIPT), "--strategy", strategy, "--nproc", nproc], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2 and "--strategy single runs on --nproc 1" in done.stderr, done.stderr[-2000:]


def test_alternating_rounds_reverse_the_rows_every_other_round_and_set_each_against_the_probe(monkeypatch) -> None:
    """``--rounds``: each round times every kept row (one untimed step, then the timed ones), the
    order reversed every other round; each dinoflow row's ratio is the probe's seconds over its own,
    round by round."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import train_step
    calls: list[str] = []
    steps = {label: (lambda label=label: calls.append(label)) for label in ("probe_compiled", "dinoflow_compiled",
                                                                          "dinoflow_cudagraphs")}
    seconds = train_step.alternating_rounds(steps, rounds=3, count=2, device=torch.device("cpu"))
    forward, backward = ["probe_compiled", "dinoflow_compiled", "dinoflow_cudagraphs"], [
        "dinoflow_cudagraphs", "dinoflow_compiled", "probe_compiled"]
    assert calls == [label for order in (forward, backward, forward) for label in order for _ in range(3)]
    assert {label: len(times) for label, times in seconds.items()} == dict.fromkeys(steps, 3)
    ratios = train_step.rounds_ratios({"probe_compiled": [2.0, 3.0], "dinoflow_compiled": [1.0, 4.0]})
    assert ratios == {"dinoflow_compiled": [2.0, 0.75]}


def test_each_row_timed_as_the_loop_runs_gets_its_line_and_a_failed_loop_says_why(monkeypatch) -> None:
    """The preparation's figures keep every row timed as the loop runs (the compiled and CUDA-graph
    rows), in row order, with a loop that failed reported by its error; the summary's line gives
    each."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_summary
    import train_step

    failed = "loop_side_stream: RuntimeError: replayed too soon"
    rows = [{"step": "probe_compiled", "img_per_s": 1400.0},
            {"step": "dinoflow_compiled", "img_per_s": 1380.0, "loop_img_per_s": 1190.0,
             "loop_side_stream_img_per_s": 1300.0},
            {"step": "dinoflow_cudagraphs", "img_per_s": 1420.0, "loop_img_per_s": 1250.0, "loop_error": failed}]
    figures = train_step.preparation_figures(128 / 7700, 128, rows)
    assert figures["step"] == "dinoflow_cudagraphs"  # the fastest step, after the preparation
    assert figures["loops"] == [
        {"step": "dinoflow_compiled", "img_per_s": 1190.0, "side_stream_img_per_s": 1300.0},
        {"step": "dinoflow_cudagraphs", "img_per_s": 1250.0, "error": failed}]
    text = gpu_summary.preparation_text(figures, "batch preparation")
    assert ("dinoflow_compiled with the next batch prepared in its wait, as the loop runs: 1190.0 img/s, 1300.0 with "
            "the batch made on a second stream; dinoflow_cudagraphs with the next batch prepared in its wait, as the "
            "loop runs: 1250.0 img/s (failed: loop_side_stream: RuntimeError: replayed too soon)") in text
