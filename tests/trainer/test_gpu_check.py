"""``benchmarks/gpu_check.sh OUTDIR --cpu-smoke``: the GPU check's own steps, run for real on the
CPU with the tiny recipe (correctness against the CPU, both probes eager and compiled by inductor,
the FLOP count of dinoflow's step at each probe's sizes), leave their logs, JSON and a summary in
OUTDIR. Timings are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBES = ("probe_small", "probe_large")
STEPS = ("correctness", *PROBES, "preparation", "loss_tail", "drop_path", "flops_small", "flops_large")


@pytest.mark.timeout(1500)  # inductor compiles ~10 graphs on a cold cache: 4-5 minutes on 2 loaded cores
def test_cpu_smoke_writes_every_output_and_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "check"
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--cpu-smoke"], cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, AUTOTUNE="1"),
                          capture_output=True, text=True, timeout=1400, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    outputs = [f"{step}.{kind}" for step in STEPS for kind in ("log", "json")]
    for name in ("env.txt", "steps.tsv", "summary.md", "summary.json", *outputs):
        assert (out / name).is_file(), name
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert [(s["step"], s["status"]) for s in steps] == [(name, "ok") for name in STEPS]
    correctness = json.loads((out / "correctness.json").read_text())
    assert correctness["ok"]
    assert [c["name"] for c in correctness["checks"]] == ["backbone_fp32", "step_fp32", "step_bf16", "step_compiled",
                                                          "side_stream", "subset_cudagraphs", "lagged_skip"]
    subset = correctness["checks"][-2]  # the subset drop path, compiled: exactly the drawn share dropped, twice
    assert subset["dropped"] == [[2, 4], [2, 4]] and subset["draws_differ"]
    for probe in PROBES:
        rows = json.loads((out / f"{probe}.json").read_text())["rows"]
        extra = ["dinoflow_cudagraphs", "dinoflow_subset", "dinoflow_autotune"] if probe == "probe_small" else []
        assert [r["step"] for r in rows] == ["probe", "dinoflow", "probe_compiled", "dinoflow_compiled", *extra]
        assert all(r["img_per_s"] > 0 and not r["compile_fell_back"] for r in rows), rows
    profile = (out / "profile_small.txt").read_text()  # the compiled step's operators, by the profiler
    assert "compiled True" in profile and "aten::" in profile
    assert "aten::" in (out / "profile_small_probe.txt").read_text()  # the compiled probe's, to compare
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | ok |" in summary for name in STEPS)
    assert summary.count("PASS") == 7 and "| dinoflow_compiled |" in summary
    for probe in PROBES:  # the batch preparation's figures, beside the fastest dinoflow step
        preparation = json.loads((out / f"{probe}.json").read_text())["batch_preparation"]
        assert preparation["img_per_s"] > 0 and preparation["step"].startswith("dinoflow")
        assert 0 < preparation["share"] < 1
        # the compiled rows as the loop runs them: with --cuda-graphs (probe_small) the CUDA-graph row too
        loops = ["dinoflow_compiled", "dinoflow_cudagraphs"] if probe == "probe_small" else ["dinoflow_compiled"]
        assert [loop["step"] for loop in preparation["loops"]] == loops
        assert all(loop["img_per_s"] > 0 and loop["side_stream_img_per_s"] > 0 for loop in preparation["loops"])
    assert summary.count("batch preparation (multi-crop, masks):") == 2
    preparation = json.loads((out / "preparation.json").read_text())  # the preparation alone (no sync check on CPU)
    assert preparation["batch"] == 4 and preparation["prepare_ms"] > 0 and "waited" not in preparation
    assert preparation["crops_eager_ms"] > 0 and preparation["crops_compiled_ms"] > 0
    assert preparation["crops_compiled_max_diff"] < 1e-4  # the compiled stages make the eager crops
    assert "## preparation: tiny on cpu" in summary and "batch 4: prepared in " in summary
    assert summary.count("dinoflow_compiled with the next batch prepared in its wait") == 2
    assert summary.count("dinoflow_cudagraphs with the next batch prepared in its wait") == 1
    tail = json.loads((out / "loss_tail.json").read_text())  # the losses' tail, each kind of target, three ways
    assert (tail["rows"], tail["prototypes"]) == (64, 4096)
    assert set(tail["kinds"]) == {"centred", "probabilities", "indexed"}
    for row in tail["kinds"].values():
        assert min(row["library_ms"], row["eager_ms"], row["compiled_ms"]) > 0
        assert row["max_grad_difference"] <= 0.01 * row["grad_scale"]  # bf16 gradients, the same maths
    assert "## loss_tail: a block of 64 x 4096 on cpu" in summary and summary.count("| indexed |") == 1
    norm = tail["weight_norm"]  # the prototypes' weight norm, autograd's way and the head's
    assert (norm["prototypes"], norm["bottleneck"]) == (4096, 256) and min(norm["autograd_ms"], norm["written_ms"]) > 0
    assert norm["max_grad_difference"] <= 1e-5 * norm["grad_scale"]  # fp32, the same gradient
    assert "The prototypes' weight norm (4096 x 256, forward and backward, each head call): autograd " in summary
    head = tail["shared_head"]  # the shared head on CLS and patch rows, one call and a call each: the same losses
    assert head["rows"] == [64, 96] and min(head["one_call_ms"], head["call_each_ms"]) > 0
    assert head["max_loss_difference"] <= 1e-5 * head["loss"]
    assert "The shared head (384 -> 2048 -> 2048 -> 256 -> 4096) on 64 CLS and 96 patch rows" in summary
    for probe in PROBES:  # dinoflow's counted work at the probe's sizes, and its rows' real TFLOP/s
        flops = json.loads((out / f"{probe.replace('probe_', 'flops_')}.json").read_text())
        assert flops["batch"] == 4 and 0 < flops["heads_and_losses_gflop_per_image"] < flops["gflop_per_image"]
        assert f"counted: {flops['gflop_per_image']:.2f} GFLOP/image" in summary
    assert summary.count("its real TFLOP/s: dinoflow ") == 2
    (graphs,) = [r for r in json.loads((out / "probe_small.json").read_text())["rows"] if r["step"] == "dinoflow_cudagraphs"]
    assert graphs["cudagraph_skips"] > 0  # asked for CUDA graphs, which inductor declines on the CPU...
    assert "graphs without CUDA graphs |" in summary  # ...and the summary says so
    rounds = json.loads((out / "probe_small.json").read_text())["rounds"]
    assert (rounds["rounds"], rounds["steps"]) == (2, 1)
    assert set(rounds["ours_vs_probe"]) == {"dinoflow_compiled", "dinoflow_cudagraphs", "dinoflow_subset",
                                            "dinoflow_autotune"}
    assert all(len(ratios) == 2 and min(ratios) > 0 for ratios in rounds["ours_vs_probe"].values())
    assert summary.count("in 2 alternating rounds of 1 steps") == 1  # ViT-S/14's probe only
    small_rows = json.loads((out / "probe_small.json").read_text())["rows"]
    (subset,) = [r for r in small_rows if r["step"] == "dinoflow_subset"]
    assert subset["compile_mode"] == "reduce-overhead"  # beside the CUDA-graph row, as CUDA graphs
    assert summary.count("stochastic depth in its subset form from rate 0.05 against the recipe's form "
                         "(dinoflow_subset over dinoflow_cudagraphs)") == 1
    drop = json.loads((out / "drop_path.json").read_text())  # one block's drop path in its three forms
    assert list(drop["forms"]) == ["mask", "subset", "index_add"] and drop["kept"] == [6, 24]
    assert drop["subset_vs_index_add_max_difference"] <= 1e-5
    assert "## drop_path: one block of width 32 at drop rate 0.4 on cpu" in summary and "| index_add |" in summary
