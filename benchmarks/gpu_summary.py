"""The summary of a ``benchmarks/gpu_check.sh`` run: its steps (status, time), the correctness
checks and every probe row, from the files the steps left in OUTDIR (``steps.tsv``, written by
the script, and each step's ``<step>.json``, written row by row, so a step stopped by its timeout
still shows what it finished). Under each probe's table, issue 11's bar (dinoflow's fastest
compiled row against the compiled probe, img/s and peak memory; with ``train_step.py --rounds``,
also at the median of alternating rounds, and each row's ratio over them) and, with the FLOP count of
dinoflow's step at its sizes (``flops_small.json`` beside ``probe_small.json``, from
``step_flops.py``), that work against the probe's and dinoflow's rows at their real TFLOP/s; the
loss tail's times (``loss_tail.json``), the subset row against the mask form, one block's drop path
in its three forms (``drop_path.json``); at the end the device timelines of the profiled steps (the
GPU's idle time between kernels, ``profile_*.txt``).
Writes ``summary.json`` and ``summary.md`` there and prints the latter.

    python benchmarks/gpu_summary.py OUTDIR
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

STEP_COLUMNS = ("step", "status", "exit_code", "seconds", "limit_seconds")


def read_steps(out: Path) -> list[dict[str, Any]]:
    """The steps the script ran, in order, with the JSON each one left (or None)."""
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        step = dict(zip(STEP_COLUMNS, line.split("\t"), strict=True))
        result = out / f"{step['step']}.json"
        step["result"] = json.loads(result.read_text()) if result.is_file() else None
        steps.append(step)
    return steps


def row_notes(row: dict[str, Any]) -> list[str]:
    """What a probe row's figures need said beside them: an eager fallback, CUDA graphs not used,
    where the subset form of stochastic depth starts when a row moved it."""
    notes = ["compilation failed: eager"] * row["compile_fell_back"]
    if row.get("cudagraph_skips"):  # inductor counts a skip only where CUDA graphs were asked for
        notes.append(f"{row['cudagraph_skips']} graphs without CUDA graphs")
    if "subset_drop_above" in row:
        notes.append(f"stochastic depth in its subset form above rate {row['subset_drop_above']}")
    return notes


def preparation_text(figures: dict[str, Any], title: str) -> str:
    """The batch preparation's figures (``train_step.preparation_figures``) in one line."""
    text = f"{title}: {figures['img_per_s']:.1f} img/s"
    if "step" in figures:
        text += (f"; before {figures['step']}'s step: {figures['end_to_end_img_per_s']:.1f} img/s end to end, "
                 f"{100 * figures['share']:.0f} % of the time preparing")
    for loop in figures.get("loops", []):
        text += f"; {loop['step']} with the next batch prepared in its wait, as the loop runs: "
        text += f"{loop['img_per_s']:.1f} img/s" if "img_per_s" in loop else "-"
        if "side_stream_img_per_s" in loop:
            text += f", {loop['side_stream_img_per_s']:.1f} with the batch made on a second stream"
        if "error" in loop:
            text += f" (failed: {loop['error']})"
    return text


def preparation_check_text(result: dict[str, Any]) -> str:
    """``batch_preparation.py``'s figures in a line (and where a call waited for the device)."""
    text = (f"batch {result['batch']}: prepared in {result['prepare_ms']:.2f} ms ({result['img_per_s']:.1f} img/s), "
            f"crops {result['crops_ms']:.2f} ms")
    if "crops_compiled_ms" in result:
        eager, compiled = result["crops_eager_ms"], result["crops_compiled_ms"]
        text += (f" (pixel stages eager: {eager:.2f} ms, compiled: {compiled:.2f} ms, {eager / compiled:.2f}x, "
                 f"largest difference {result['crops_compiled_max_diff']:.1e})")
    if "queue_ms" in result:
        text += f"; behind {result['busy_ms']:.0f} ms of queued GPU work it returned in {result['queue_ms']:.2f} ms"
    if "copy_pinned_ms" in result:
        text += (f"; the loader's images copied behind the same work returned in {result['copy_pageable_ms']:.2f} ms "
                 f"from pageable memory, {result['copy_pinned_ms']:.2f} ms from pinned memory")
    if "waited" in result:
        text += ("; sync check: a call waited for the GPU:\n\n    " + result["waited"].replace("\n", "\n    ")
                 if result["waited"] else "; sync check: no call waited for the GPU")
    return text


def loss_tail_lines(result: dict[str, Any]) -> list[str]:
    """``loss_tail.py``'s figures: a table of each kind of target's tail times and GB/s of its least
    traffic, and the compiled gradient's largest difference from the library's; then the prototypes'
    weight norm, autograd's against the head's, and the shared head in one call against a call each."""
    lines = ["| targets | library ms | eager ms | compiled ms | compiled GB/s | library / compiled | "
             "max abs grad diff |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, row in result["kinds"].items():
        compiled = row["compiled_ms"] / 1000
        lines.append(f"| {kind} | {row['library_ms']:.3f} | {row['eager_ms']:.3f} | {row['compiled_ms']:.3f} | "
                     f"{row['least_bytes'] / compiled / 1e9:.1f} | {row['library_ms'] / row['compiled_ms']:.2f} | "
                     f"{row['max_grad_difference']:.2g} of {row['grad_scale']:.2g} |")
    if "weight_norm" in result:
        norm = result["weight_norm"]
        lines += ["", f"The prototypes' weight norm ({norm['prototypes']} x {norm['bottleneck']}, forward and "
                      f"backward, each head call): autograd {norm['autograd_ms']:.3f} ms, written out "
                      f"{norm['written_ms']:.3f} ms ({norm['autograd_ms'] / norm['written_ms']:.2f}x), max abs "
                      f"gradient difference {norm['max_grad_difference']:.2g} of {norm['grad_scale']:.2g}"]
    if "shared_head" in result:
        head = result["shared_head"]
        lines += ["", f"The shared head ({' -> '.join(map(str, head['dims']))}) on {head['rows'][0]} CLS and "
                      f"{head['rows'][1]} patch rows with their fused losses, forward and backward: one call "
                      f"{head['one_call_ms']:.3f} ms, a call each {head['call_each_ms']:.3f} ms "
                      f"({head['call_each_ms'] / head['one_call_ms']:.2f}x), loss difference "
                      f"{head['max_loss_difference']:.2g} of {head['loss']:.3g}"]
    return lines


def drop_path_lines(result: dict[str, Any]) -> list[str]:
    """``drop_path.py``'s figures: each form of stochastic depth in one compiled block, its median ms
    and its speed over the mask form's, its peak memory; the subset forms' difference from the same draws."""
    lines = [f"groups {result['shapes']}, kept {result['kept']}, forward and backward", "",
             "| form | ms | mask / form | peak MiB |", "|---|---:|---:|---:|"]
    for name, form in result["forms"].items():  # without ms where the rounds were cut short
        peak = f"{form['peak_mib']:.0f}" if form["peak_mib"] is not None else ""
        timed = f"{form['ms']:.3f} | {form['mask_over_this']:.2f}" if "ms" in form else "- | -"
        lines.append(f"| {name} | {timed} | {peak} |")
    return lines + ["", "subset against index_add from the same draws: max abs output difference "
                        f"{result['subset_vs_index_add_max_difference']:.2g}"]


def work_text(flops: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """dinoflow's counted work per image (``step_flops.py``) against the probe's, and dinoflow's
    rows' img/s turned into TFLOP/s with it, in one line."""
    rates = ", ".join(f"{row['step']} {row['img_per_s'] * flops['gflop_per_image'] / 1e3:.2f}"
                      for row in rows if row["step"].startswith("dinoflow") and "error" not in row)
    return (f"dinoflow's step counted: {flops['gflop_per_image']:.2f} GFLOP/image (backbones "
            f"{flops['backbone_gflop_per_image']:.2f}, heads and losses "
            f"{flops['heads_and_losses_gflop_per_image']:.2f}), "
            f"{flops['ours_vs_probe']:.3f}x the probe's work; its real TFLOP/s: {rates}")


def compiled_probe(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The compiled probe's row, if it was measured: what issue 11's bar sets dinoflow against."""
    return next((r for r in rows if r["step"] == "probe_compiled" and "error" not in r), None)


def bar_text(rows: list[dict[str, Any]], rounds: dict[str, Any] | None = None) -> str:
    """Issue 11's bar in one line: dinoflow's fastest compiled row against the compiled probe, in
    img/s and peak memory, and with ``rounds`` (``train_step.py --rounds``) its ratio over the
    alternating rounds too, which must then also be at least 1 at the median ("" without both rows)."""
    probe = compiled_probe(rows)
    ours = max((r for r in rows if "error" not in r and r["compiled"] and r["step"].startswith("dinoflow")),
               key=lambda r: r["img_per_s"], default=None)
    if probe is None or ours is None:
        return ""
    speed, memory = ours["img_per_s"] / probe["img_per_s"], ours["peak_mib"] / probe["peak_mib"]
    ratios = (rounds or {}).get("ours_vs_probe", {}).get(ours["step"])
    in_rounds = f", {statistics.median(ratios):.2f}x at the median of the alternating rounds" if ratios else ""
    verdict = "met" if min(speed, statistics.median(ratios or [speed])) >= 1 and memory <= 1 else "not met"
    return (f"issue 11's bar (at least the compiled probe's img/s at no more peak memory): {ours['step']} "
            f"{speed:.2f}x its img/s{in_rounds} at {100 * (memory - 1):+.0f} % peak memory: {verdict}")


def subset_text(rows: list[dict[str, Any]], rounds: dict[str, Any] | None = None) -> str:
    """The subset form of stochastic depth against its mask form in one line: the ``dinoflow_subset``
    row (``--subset-drop-above``) over the row of the recipe's form in the same compile mode
    (``dinoflow_cudagraphs`` for CUDA graphs, else ``dinoflow_compiled``), in img/s and peak memory,
    and over the alternating rounds if they have both; it says whether the threshold should come
    down to the row's ("" without both rows)."""
    subset = next((r for r in rows if r["step"] == "dinoflow_subset" and "error" not in r), None)
    label = "dinoflow_cudagraphs" if (subset or {}).get("compile_mode") == "reduce-overhead" else "dinoflow_compiled"
    mask = next((r for r in rows if r["step"] == label and "error" not in r), None)
    if subset is None or mask is None:
        return ""
    speed, memory = subset["img_per_s"] / mask["img_per_s"], subset["peak_mib"] / mask["peak_mib"]
    ratios = (rounds or {}).get("ours_vs_probe", {})
    paired = [s / m for s, m in zip(ratios.get("dinoflow_subset", []), ratios.get(label, []))]
    in_rounds = f", {statistics.median(paired):.3f}x at the median of the alternating rounds" if paired else ""
    faster = min(speed, statistics.median(paired or [speed])) > 1
    return (f"stochastic depth in its subset form from rate {subset['subset_drop_above']} against the recipe's "
            f"form (dinoflow_subset over {label}): {speed:.3f}x img/s{in_rounds}, "
            f"{100 * (memory - 1):+.0f} % peak memory: "
            + (f"faster, so trainer.models.layers.SUBSET_DROP_ABOVE can come down to {subset['subset_drop_above']}"
               if faster else "not faster, SUBSET_DROP_ABOVE stays"))


def rounds_text(rounds: dict[str, Any]) -> str:
    """``train_step.py --rounds``' figures in one line: each dinoflow row's img/s over the compiled
    probe's, median and range over the rounds."""
    rows = ", ".join(f"{label} {statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"
                     for label, ratios in rounds["ours_vs_probe"].items())
    return (f"in {rounds['rounds']} alternating rounds of {rounds['steps']} steps (the compiled rows back to back, "
            f"the order reversed every other round), img/s over the compiled probe's, median (range): {rows}")


def markdown(steps: list[dict[str, Any]]) -> str:
    """Steps, then each correctness check and each probe table, with its FLOP count's line."""
    lines = ["# GPU check", "", "| step | status | exit code | seconds | limit |", "|---|---|---:|---:|---:|"]
    lines += [f"| {s['step']} | {s['status']} | {s['exit_code']} | {s['seconds']} | {s['limit_seconds']} |"
              for s in steps]
    counts = {s["step"].replace("flops_", "probe_", 1): s["result"] for s in steps if s["step"].startswith("flops_")}
    for step in steps:
        result = step["result"]
        if result is None or step["step"].startswith("flops_"):
            continue
        lines += ["", f"## {step['step']}: {result['config']} on {result['device_name']}, torch {result['torch']}", ""]
        if result["overrides"]:
            lines += [f"overrides: `{' '.join(result['overrides'])}`", ""]
        if "prepare_ms" in result:
            lines.append(preparation_check_text(result))
        elif "kinds" in result:
            lines += loss_tail_lines(result)
        elif "forms" in result:
            lines += drop_path_lines(result)
        elif "checks" in result:
            lines += [f"- {'PASS' if c['ok'] else 'FAIL'} `{c['name']}` (rtol {c['rtol']}): " + (
                f"max abs diff {c['max_abs_diff']:.3g} at scale {c['max_abs_reference']:.3g}" if "terms" not in c else
                ", ".join(f"{t} {v['got']:.5f} vs {v['reference']:.5f}" for t, v in c["terms"].items()))
                for c in result["checks"]]
        else:
            masked = f"{result['masked_rows']} masked patches, " if "masked_rows" in result else ""
            lines += [f"batch {result['batch']}, {result['num_local_crops']} local crops, {masked}"
                      f"{result['gflop_per_image']:.2f} GFLOP/image, {result['steps']} timed steps after "
                      f"{result['warmup']} warm-up", "",
                      "| step | img/s | TFLOP/s | peak MiB | vs eager probe | vs compiled probe | note |",
                      "|---|---:|---:|---:|---:|---:|---|"]
            probe = compiled_probe(result["rows"])
            for row in result["rows"]:
                if "error" in row:
                    lines.append(f"| {row['step']} | | | | | | {row['error']} |")
                    continue
                ratio = f"{row['ours_vs_probe']:.2f}" if row["ours_vs_probe"] is not None else ""
                against = f"{row['img_per_s'] / probe['img_per_s']:.2f}" if probe and row["compiled"] else ""
                note = "; ".join(row_notes(row))
                lines.append(f"| {row['step']} | {row['img_per_s']:.1f} | {row['tflop_per_s']:.2f} | "
                             f"{row['peak_mib']:.0f} | {ratio} | {against} | {note} |")
            if bar := bar_text(result["rows"], result.get("rounds")):
                lines += ["", bar]
            if result.get("rounds"):
                lines += ["", rounds_text(result["rounds"])]
            if subset := subset_text(result["rows"], result.get("rounds")):
                lines += ["", subset]
            preparation = result.get("batch_preparation")
            if preparation:
                lines += ["", preparation_text(preparation, "batch preparation (multi-crop, masks)")]
            if counts.get(step["step"]):
                lines += ["", work_text(counts[step["step"]], result["rows"])]
    return "\n".join(lines) + "\n"


TIMELINE_MARK = "the device's timeline over 2 more steps"  # opens the line train_step.write_profile writes


def timeline_lines(out: Path) -> list[str]:
    """Each profile's device timeline (``train_step.device_timeline``: idle time a step, its split by
    gap length and the largest gaps) under a heading, from the ``profile_*.txt`` files in ``out``."""
    lines: list[str] = []
    for path in sorted(out.glob("profile_*.txt")):
        text = path.read_text().splitlines()
        marks = [i for i, line in enumerate(text) if line.startswith(TIMELINE_MARK)]
        if not marks:
            continue
        gaps = itertools.takewhile(lambda line: line.startswith("  "), text[marks[0] + 1:])
        lines += ["", f"{path.stem}: " + text[marks[0]].removeprefix(TIMELINE_MARK).lstrip(" :"), "", "```", *gaps,
                  "```"]
    return ["", "## device timelines (idle time between kernels)", *lines] if lines else []


def main(out: Path) -> None:
    steps = read_steps(out)
    (out / "summary.json").write_text(json.dumps({"steps": steps}, indent=2))
    timelines = timeline_lines(out)
    text = markdown(steps) + ("\n".join(timelines) + "\n" if timelines else "")
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
