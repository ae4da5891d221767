"""Named parameter sets of the pipelines (``configs/pipelines/*.yaml``, ``--params``).

Why: a cluster's recipe (its data sets' URIs, the preset, the gate) is a dozen ``key=value``
items that should live with the code, reviewed and reused, not retyped in a shell or the UI.
Submissions go to a stand-in KFP API on 127.0.0.1 (no cluster can run here); the compiler, the
client and the HTTP traffic are real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from components.evaluate import OWN_PARAMETERS
from dinoflow.config import preset_path
from evaluators.suite import SuiteConfig, with_options
from pipelines.cli import PARAMETER_FILES, _pipeline, _pipeline_params, app
from tests.pipelines.test_submit import StandInKfpApi, kfp_api  # noqa: F401  (the stand-in KFP API fixture)

SHIPPED = sorted(PARAMETER_FILES.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_every_shipped_parameter_set_fits_its_pipeline(path: Path) -> None:
    """Each file's parameters are its pipeline's, of their types; its preset exists and its
    evaluation settings make a valid suite (data sets' forms, tasks, eval_options)."""
    name = yaml.safe_load(path.read_text())["pipeline"]
    params = _pipeline_params(_pipeline(name), [], path.stem)
    assert params == yaml.safe_load(path.read_text())["parameters"]
    if "preset" in params:
        assert preset_path(params["preset"]).is_file()
    if "eval_tasks" in params:
        config = SuiteConfig(tasks=tuple(params["eval_tasks"]), data_uri=params.get("data_uri", "x"),
                             **{key: params[key] for key in ("seg_data", "depth_data", "retrieval_data", "video_data")
                                if key in params})
        with_options(config, params.get("eval_options", {}), OWN_PARAMETERS)
    assert len(SHIPPED) >= 3


def test_submit_sends_the_files_parameters_with_the_items_over_them(kfp_api: str) -> None:  # noqa: F811
    """The weekly retraining's set, its preset and budget given after it as the workflow does."""
    result = CliRunner().invoke(app, ["pipeline", "submit", "retrain", "--host", kfp_api, "--params",
                                      "retrain-weekly", "preset=vits14", "max_minutes=90"])
    assert result.exit_code == 0, result.output
    [run] = [body for method, url, body in StandInKfpApi.requests if method == "POST" and "/runs" in url]
    expected = yaml.safe_load((PARAMETER_FILES / "retrain-weekly.yaml").read_text())["parameters"]
    assert run["runtime_config"]["parameters"] == {**expected, "preset": "vits14", "max_minutes": 90}
    assert expected["preset"] != "vits14"  # the item won


@pytest.mark.parametrize(("text", "said"), [
    ("pipeline: retrain\nparameters: {max_minutes: 3}\n", "it holds parameters of the 'retrain' pipeline, not of "
                                                          "'evaluate_only'"),
    ("pipeline: evaluate_only\nparameters: {max_minute: 3}\n", "unknown parameter 'max_minute'; allowed: "
                                                               "weights_uri, model,"),
    ("pipeline: evaluate_only\nparameters: {knn_k: ten}\n", "knn_k takes a Integer, got str 'ten'"),
    ("pipeline: evaluate_only\nparameters: {model_name: x}\nextra: 1\n", "give a mapping of `pipeline: <name>` "
                                                                        "and `parameters: {key: value}`"),
    ("pipeline: evaluate_only\nparameters: [a]\n", "give a mapping of `pipeline: <name>`"),
    ("pipeline: [evaluate_only\n", "not valid YAML"),
])
def test_a_bad_parameter_file_is_refused_in_one_line_naming_it(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "set.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["pipeline", "run", "evaluate_only", "--params", str(path),
                                      "--run-root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and f"error: bad parameter file '{path}'; {said}" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_a_missing_parameter_file_names_the_shipped_ones(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["pipeline", "run", "retrain", "--params", "weekly"])
    assert result.exit_code == 2
    assert ("no such file, nor a name of configs/pipelines/: benchmarks-cluster, benchmarks-finegrained, "
            "benchmarks-robustness, full-vitl14-curated, retrain-weekly") in result.stderr


@pytest.mark.parametrize("name", ["full", "evaluate_only", "retrain", "distill", "finetune", "promote"])
def test_params_prints_a_parameter_file_of_the_defaults_that_reads_back(tmp_path: Path, name: str) -> None:
    """``dinoflow pipeline params <name>``: every parameter with its default (yours over them), as
    a file ``--params`` takes: the template of a named set."""
    changed = {"promote": {"reason": "x"}, "evaluate_only": {"knn_k": 7}}.get(name, {"seed": 7})
    items = [f"{key}={value}" for key, value in changed.items()]
    result = CliRunner().invoke(app, ["pipeline", "params", name, *items])
    assert result.exit_code == 0, result.output
    (tmp_path / "set.yaml").write_text(result.stdout)
    pipeline = _pipeline(name)
    read = _pipeline_params(pipeline, [], str(tmp_path / "set.yaml"))
    inputs = pipeline.component_spec.inputs
    assert set(read) == set(inputs)
    assert read == {**{key: spec.default for key, spec in inputs.items()}, **changed}
    assert all(read[key] != spec.default for key, spec in inputs.items() if key in changed)


def test_compile_makes_a_sets_values_the_defaults_of_the_ui_form(tmp_path: Path) -> None:
    """``pipeline compile --params``: the compiled YAML's parameters default to the set's values
    (the items over them), so the Kubeflow UI's run form opens filled with them; the others keep
    the pipeline's defaults."""
    out = tmp_path / "evaluate_only.yaml"
    result = CliRunner().invoke(app, ["pipeline", "compile", "evaluate_only", "--out", str(out), "--params",
                                      "benchmarks-cluster", "model=dinoflow-vitl14/3"])
    assert result.exit_code == 0, result.output
    spec, _ = yaml.safe_load_all(out.read_text())
    defaults = {key: given.get("defaultValue") for key, given in spec["root"]["inputDefinitions"]["parameters"].items()}
    expected = {**yaml.safe_load((PARAMETER_FILES / "benchmarks-cluster.yaml").read_text())["parameters"],
                "model": "dinoflow-vitl14/3"}
    assert {key: defaults[key] for key in expected} == expected  # (a Struct's 518 reads back as 518.0: equal)
    pipeline = _pipeline("evaluate_only")
    assert all(defaults[key] == spec.default for key, spec in pipeline.component_spec.inputs.items()
               if key not in expected and spec.default is not None)


@pytest.mark.parametrize(("items", "said"), [
    (["eval_tasks=[linear]"], "the gate's metric 'knn_top1_k20' is reported by the knn task, which eval_tasks "
                              "['linear'] leaves out"),
    (["eval_tasks=[knn]", "metric=linear_top1"], "the gate's metric 'linear_top1' is reported by the linear task"),
    (["eval_tasks=[knn, linear]", "metric=seg_miou"], "the gate's metric 'seg_miou' is reported by the seg task"),
])
def test_a_gate_on_a_metric_no_task_reports_is_refused_before_anything_runs(tmp_path: Path, items: list[str],
                                                                            said: str) -> None:
    """k-NN runs only when eval_tasks names it: a gate on knn_top1_k20 with linear alone would fail at
    the register stage, after the pretraining; refused in one line before anything runs."""
    result = CliRunner().invoke(app, ["pipeline", "run", "full", *items, "--run-root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and f"error: {said}" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_gate_on_a_metric_of_a_task_run_passes() -> None:
    from evaluators.suite import metric_task

    pipeline = _pipeline("full")
    for items in (["eval_tasks=[linear]", "metric=linear_top1"], ["eval_tasks=[knn, seg]", "metric=seg_miou"],
                  ["eval_tasks=[logreg]", "metric=test_v2_logreg_top1"], ["metric=knn_top1_k10"],
                  ["eval_tasks=[]"]):  # (an empty list runs the suite's default tasks, knn among them)
        assert _pipeline_params(pipeline, items)  # (no exit)
    assert [metric_task(m) for m in ("pixels_knn_top1_k20", "corruption_linear_mce", "depth_rmse", "val_loss")] == [
        "knn", "linear", "depth", None]
