"""The pipelines run for real on kfp.local (subprocess tasks, sqlite MLflow, local or S3 storage).

One ``full`` run is shared by the tests of this module; each test adds the runs it needs.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from components.definitions import GPU_STAGES, Images
from components.pipeline_run import TAG_FAILED_STAGES, TAG_PIPELINE
from dinoflow.registry import champion_version
from dinoflow.storage import Storage
from dinoflow.tracking import TAG_HEALTH, default_tracking_uri
from pipelines.cli import app
from pipelines.cli import _pipeline
from pipelines.definitions import GPU_RESOURCE, S3_SECRET, SETTINGS_CONFIG_MAP, build_pipelines
from pipelines.local import PipelineFailed, StageSummary, format_summary, run_locally, stage_summaries

FAST = {
    # LayerScale 0.1: CLS tokens differ from the first step, so k-NN is above chance however few
    # steps the 3-second budget allows (with 1e-5 every image starts alike)
    "overrides": ["optim.batch_size=32", "model.depth=2", "checkpoint_every=5", "model.layerscale_init=0.1"],
    "max_minutes": 0.05, "train_limit": 2000, "test_limit": 500, "model_name": "tiny-test",
}
DATA = "/usr/share/datasets/fashion-mnist"
STUDENT = {"students": ["distill-tiny"], "student_minutes": 0.05,
           "student_overrides": ["optim.batch_size=32", "model.depth=2", "checkpoint_every=5"]}
STUDENT_MODEL = "tiny-test-distill-tiny"  # <model_name>-<student preset>


class Runs:
    """A run root with its sqlite store, running pipelines one after another."""

    def __init__(self, root: Path) -> None:
        self.root, self.kfp = root, root / "kfp"
        self.tracking_uri = default_tracking_uri(str(root))
        self.pipelines = build_pipelines(gpus=0)  # kfp.local: no GPU here, pretrain on cpu
        self.client = MlflowClient(tracking_uri=self.tracking_uri)

    def run_all(self, name: str, **params: Any) -> list[StageSummary]:
        """Every stage run of one pipeline run, in start order."""
        return run_locally(self.pipelines[name], name, str(self.root), str(self.kfp), self.tracking_uri, params,
                           Storage())

    def run(self, name: str, **params: Any) -> dict[str, StageSummary]:
        """The stage runs by name, for a pipeline run where each stage runs once (no students)."""
        stages = self.run_all(name, **params)
        named = {s.stage: s for s in stages}
        assert len(named) == len(stages), [s.stage for s in stages]
        return named

    def earliest(self, pattern: str) -> Path:
        """The first pipeline run's output matching ``pattern`` (run folders are named by their start time)."""
        return sorted(self.kfp.glob(pattern))[0]

    def parents(self, pipeline: str) -> list[Any]:
        experiment = self.client.get_experiment_by_name("dinoflow")
        return self.client.search_runs([experiment.experiment_id], f"tags.`{TAG_PIPELINE}` = '{pipeline}'",
                                       order_by=["start_time ASC"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    runs = Runs(tmp_path_factory.mktemp("pipelines"))
    runs.first = runs.run("full", data_source=DATA, **FAST)  # type: ignore[attr-defined]
    return runs


def test_full_runs_every_stage_and_registers_a_champion(runs: Runs) -> None:
    stages = runs.first  # type: ignore[attr-defined]
    assert list(stages) == ["ingest", "pretrain", "evaluate", "register"]
    assert all(s.status == "FINISHED" and not s.cached for s in stages.values())
    assert stages["pretrain"].metrics["steps"] >= 1
    assert stages["pretrain"].tags[TAG_HEALTH] == "ok"  # the collapse watch's verdict (warm-up: 100 steps)
    evaluate = stages["evaluate"].metrics
    assert 0.1 < evaluate["knn_top1_k20"] <= 1 and 0.1 < evaluate["linear_top1"] <= 1
    assert evaluate["pixels_knn_top1_k20"] == pytest.approx(0.80, abs=0.05)  # raw pixels, 2000 train images
    assert stages["register"].tags["gate.verdict"] == "promoted"
    parent = runs.parents("full")[0]
    assert parent.info.status == "FINISHED"
    assert champion_version(runs.client, "tiny-test") == stages["register"].tags["gate.model_version"] == "1"
    # the artifacts behind the task outputs
    decision = json.loads(runs.earliest("full-*/register/decision/decision.json").read_text())
    assert decision["promoted"] and decision["reason"] == "no champion yet"
    report = json.loads(runs.earliest("full-*/evaluate/report/report.json").read_text())
    assert report["metrics"]["knn_top1_k20"] == pytest.approx(evaluate["knn_top1_k20"])
    for picture in ("confusion_knn.png", "attention_maps.png"):
        assert runs.earliest(f"full-*/evaluate/report/{picture}").read_bytes()[:4] == b"\x89PNG"
    assert 0 <= evaluate["high_norm_token_share"] < 0.5 and 0 < evaluate["cls_attention_on_patches"] < 1
    assert 0 < evaluate["attention_jaccard"] <= evaluate["attention_jaccard_best_head"] <= 1  # on the garments
    assert runs.earliest("full-*/pretrain/backbone/backbone.safetensors").stat().st_size > 10_000
    assert len(list((runs.root / "data" / "fashion-mnist").iterdir())) == 4


def registered(stages: list[StageSummary], model: str) -> StageSummary:
    """The register stage of ``model`` in one pipeline run."""
    (found,) = [s for s in stages if s.stage == "register" and s.tags["gate.model_name"] == model]
    return found


def test_rerun_reuses_stages_the_gate_decides_both_ways_and_a_student_distils_once(runs: Runs) -> None:
    """Two reruns that differ only in the gate's margin, each also distilling a student from the
    teacher: the first distils, scores and registers the student, the second reuses it (the same
    teacher bytes, at another task's output path, and the same recipe)."""
    kept = runs.run_all("full", data_source=DATA, **{**FAST, **STUDENT, "margin": 1.0})
    assert sorted(s.stage for s in kept) == ["distill", "evaluate", "evaluate", "ingest", "pretrain", "register",
                                             "register"]
    assert all(s.status == "FINISHED" for s in kept)
    trained = {s.stage: s for s in kept if s.stage in ("pretrain", "distill")}
    assert trained["pretrain"].cached and not trained["distill"].cached
    assert trained["pretrain"].tags[TAG_HEALTH] == "ok"  # a reused stage tags the verdict it trained with
    assert not any(s.cached for s in kept if s.stage == "register")  # each run registers a version
    assert trained["distill"].metrics["steps"] >= 1 and trained["distill"].tags["student"] == "distill-tiny"
    scored = [s for s in kept if s.stage == "evaluate"]
    assert sorted(s.cached for s in scored) == [False, True]  # the teacher's scores reused, the student's new
    first = runs.first["evaluate"].metrics["knn_top1_k20"]  # type: ignore[attr-defined]
    assert next(s for s in scored if s.cached).metrics["knn_top1_k20"] == first
    assert all(0.1 < s.metrics["knn_top1_k20"] <= 1 for s in scored)
    assert registered(kept, "tiny-test").tags["gate.verdict"] == "kept"
    assert champion_version(runs.client, "tiny-test") == "1"
    assert registered(kept, STUDENT_MODEL).tags["gate.verdict"] == "promoted"  # its first version: no champion yet
    assert champion_version(runs.client, STUDENT_MODEL) == "1"

    promoted = runs.run_all("full", data_source=DATA, **{**FAST, **STUDENT, "margin": -1.0})
    assert next(s for s in promoted if s.stage == "distill").cached  # same teacher, same recipe: reused
    assert all(s.cached for s in promoted if s.stage == "evaluate")
    teacher = registered(promoted, "tiny-test")
    assert teacher.tags["gate.verdict"] == "promoted"
    assert champion_version(runs.client, "tiny-test") == teacher.tags["gate.model_version"] == "3"


def test_a_failing_stage_fails_the_pipeline_with_its_error(runs: Runs) -> None:
    with pytest.raises(PipelineFailed) as failure:
        runs.run("full", data_source=DATA, **{**FAST, "overrides": ["crops.local_crop_size=13"]})
    assert list(failure.value.errors) == ["pretrain"]
    assert "crops.local_crop_size = 13 is not a multiple of model.patch_size = 7" in failure.value.errors["pretrain"]
    assert "stage 'pretrain' failed" in str(failure.value)
    parent = runs.parents("full")[-1]
    assert parent.info.status == "FAILED" and parent.data.tags[TAG_FAILED_STAGES] == "pretrain"
    # a later stage fails: the finished pretrain (a new seed: trained anew) is reused by the rerun
    # that fixes the input
    started = time.time()
    with pytest.raises(PipelineFailed) as late:
        runs.run("full", data_source=DATA, **{**FAST, "seed": 11, "knn_k": 0})
    assert list(late.value.errors) == ["evaluate"] and "ks = [0, 20]" in late.value.errors["evaluate"]
    failed = {s.stage: s for s in stage_summaries(runs.tracking_uri, "dinoflow", "full", since=started)}
    assert failed["pretrain"].status == "FINISHED" and not failed["pretrain"].cached
    assert failed["evaluate"].status == "FAILED"
    fixed = runs.run("full", data_source=DATA, **{**FAST, "seed": 11})
    assert fixed["pretrain"].cached and not fixed["evaluate"].cached and fixed["register"].status == "FINISHED"


def test_evaluate_only_and_retrain_from_the_champion(runs: Runs) -> None:
    backbone = runs.earliest("full-*/pretrain/backbone")
    scored = runs.run("evaluate_only", weights_uri=str(backbone), data_uri=str(runs.root / "data" / "fashion-mnist"),
                      train_limit=FAST["train_limit"], test_limit=FAST["test_limit"])
    assert list(scored) == ["evaluate"] and scored["evaluate"].cached  # same weights, same benchmark
    picked = runs.run("evaluate_only", model="tiny-test", data_uri=str(runs.root / "data" / "fashion-mnist"),
                      train_limit=FAST["train_limit"], test_limit=FAST["test_limit"])  # the registry's champion
    assert list(picked) == ["champion", "evaluate"] and picked["evaluate"].cached  # the same weights again
    assert picked["champion"].tags["champion.version"] == champion_version(runs.client, "tiny-test")
    champion = champion_version(runs.client, "tiny-test")
    retrained = runs.run("retrain", data_uri=str(runs.root / "data" / "fashion-mnist"), **FAST)
    assert list(retrained) == ["champion", "pretrain", "evaluate", "register"]
    assert retrained["champion"].tags["champion.version"] == champion
    assert not retrained["pretrain"].cached  # other seed, and it starts from the champion's weights
    # and from its heads: registered beside the model, handed over by the champion stage
    handed = runs.earliest("retrain-*/champion/backbone/heads.safetensors")
    trained = {p.read_bytes() for p in runs.kfp.glob("full-*/pretrain/backbone/heads.safetensors")}
    assert handed.read_bytes() in trained
    assert retrained["pretrain"].tags["init_heads"] == str(handed)
    assert retrained["register"].tags["gate.verdict"] in ("promoted", "kept")


def test_distill_from_the_registrys_champion_with_its_heads(runs: Runs) -> None:
    """The distill pipeline picks its teacher from the registry: the backbone and the heads
    registered beside it, so a ``heads`` student distils against the teacher's trained heads. A
    recipe whose prototypes differ from theirs is refused naming them (random teacher heads, built
    from the student's own recipe, would have fitted it)."""
    given = {"teacher_model": "tiny-test", "data_uri": str(runs.root / "data" / "fashion-mnist"),
             "model_name": "tiny-test", "students": ["distill-tiny"], "student_minutes": 0.05,
             "train_limit": FAST["train_limit"], "test_limit": FAST["test_limit"]}
    heads = [*STUDENT["student_overrides"], "distill.objective=heads"]
    stages = runs.run_all("distill", **given, student_overrides=heads)
    assert sorted(s.stage for s in stages) == ["champion", "distill", "evaluate", "register"]
    assert all(s.status == "FINISHED" for s in stages)
    assert next(s for s in stages if s.stage == "distill").metrics["steps"] >= 1
    assert registered(stages, STUDENT_MODEL).tags["gate.model_version"]
    with pytest.raises(PipelineFailed) as failure:
        runs.run_all("distill", **given, student_overrides=[*heads, "heads.num_prototypes=32"])
    assert "heads.num_prototypes = 32 but the teacher's heads have 1024" in failure.value.errors["distill"]


def test_finetune_the_registrys_champion_and_register_a_classifier(runs: Runs, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The finetune pipeline picks a registered backbone, fine-tunes it whole with a classifier and
    registers the result gated on its test top-1; the registered model predicts the classes it
    was scored on, and a rerun reuses the fine-tuning."""
    import mlflow.pyfunc
    import numpy as np

    from trainer.data.fashion_mnist import load_split

    given = {"model": "tiny-test", "data_uri": str(runs.root / "data" / "fashion-mnist"), "max_minutes": 1.0,
             "overrides": ["data.train_limit=512", "data.test_limit=200", "optim.batch_size=64", "optim.epochs=1"],
             "finetuned_name": "tiny-test-finetuned"}
    stages = runs.run("finetune", **given)
    assert list(stages) == ["champion", "finetune", "register"] and not stages["finetune"].cached
    assert stages["finetune"].metrics["steps"] == 8
    top1 = stages["finetune"].metrics["finetune_top1"]
    assert stages["register"].tags["gate.verdict"] == "promoted" and stages["register"].tags["gate.model_name"] == (
        "tiny-test-finetuned")
    tuned = runs.earliest("finetune-*/finetune/tuned")
    champion = runs.earliest("finetune-*/champion/backbone/backbone.safetensors")
    assert (tuned / "classifier.safetensors").is_file()
    assert (tuned / "backbone.safetensors").read_bytes() != champion.read_bytes()  # the whole backbone trained
    report = json.loads(runs.earliest("finetune-*/finetune/report/report.json").read_text())
    assert report["metrics"]["finetune_top1"] == pytest.approx(top1) and len(report["classes"]) == 10
    # the registry's model predicts the classes: its top-1 on the same test images is the gate's figure
    test = load_split(Storage(), DATA, "test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", runs.tracking_uri)
    probabilities = mlflow.pyfunc.load_model("models:/tiny-test-finetuned@champion").predict(test.images[:200])
    assert probabilities.shape == (200, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert float(np.mean(probabilities.argmax(1) == test.labels[:200])) == pytest.approx(top1, abs=1e-6)
    again = runs.run("finetune", **given)
    assert again["finetune"].cached and again["register"].status == "FINISHED"
    # or weights from the UI's weights_uri, in any layout: Meta's .pth of the same backbone here
    import torch

    from trainer.models.hub import load_backbone

    torch.save(load_backbone(str(champion), "safetensors").state_dict(), tmp_path / "released.pth")
    imported = runs.run("finetune", **given, weights_uri=str(tmp_path / "released.pth"))
    assert list(imported) == ["finetune", "register"] and not imported["finetune"].cached
    assert imported["finetune"].metrics["finetune_top1"] == pytest.approx(top1)  # the same weights, seed and data


def test_promote_rolls_the_champion_back_from_the_ui(runs: Runs) -> None:
    """The Kubeflow UI's rollback: the promote pipeline moves the alias past the gate, the move
    written on the version; a version the model lacks fails the run with the versions it has."""
    before = champion_version(runs.client, "tiny-test")
    versions = sorted(int(v.version) for v in runs.client.search_model_versions("name='tiny-test'"))
    target = str(next(v for v in versions if str(v) != before))  # (the reruns above registered several)
    moved = runs.run("promote", model_name="tiny-test", version=target, reason="the newer drifts in use")
    assert list(moved) == ["promote"] and moved["promote"].tags["promote.previous"] == before
    assert f"tiny-test@champion: version {before} -> {target}" in format_summary(list(moved.values()))
    assert champion_version(runs.client, "tiny-test") == target
    move = runs.client.get_model_version("tiny-test", target).tags["alias.champion"]
    assert move.endswith("by hand: the newer drifts in use")
    with pytest.raises(PipelineFailed) as failure:
        runs.run("promote", model_name="tiny-test", version="99")
    listed = ", ".join(map(str, versions))
    assert f"model 'tiny-test' has no version '99'; its versions: {listed}" in failure.value.errors["promote"]
    assert champion_version(runs.client, "tiny-test") == target


def test_evaluate_only_benchmarks_released_and_hugging_face_weights(runs: Runs, tmp_path: Path) -> None:
    """The Kubeflow UI's way to benchmark a released model next to ours: ``weights_uri`` names Meta's
    .pth or a Hugging Face folder (it took only a stage's folder holding backbone.safetensors)."""
    import torch

    from components.stage import file_digest
    from trainer.models.hf import export_hf
    from trainer.models.hub import load_backbone

    model = load_backbone(str(runs.earliest("full-*/pretrain/backbone") / "backbone.safetensors"), "safetensors")
    export_hf(model, tmp_path / "hf")
    torch.save(model.state_dict(), tmp_path / "released.pth")
    limits = {"data_uri": str(runs.root / "data" / "fashion-mnist"), "train_limit": FAST["train_limit"],
              "test_limit": FAST["test_limit"]}
    from_hf = runs.run("evaluate_only", weights_uri=str(tmp_path / "hf"), **limits)["evaluate"]
    assert from_hf.status == "FINISHED" and not from_hf.cached
    assert from_hf.metrics["knn_top1_k20"] == pytest.approx(runs.first["evaluate"].metrics["knn_top1_k20"], abs=0.005)
    released = runs.run("evaluate_only", weights_uri=str(tmp_path / "released.pth"), **limits)["evaluate"]
    assert released.status == "FINISHED" and 0.1 < released.metrics["knn_top1_k20"] <= 1.0  # above chance
    reports = runs.root.glob("cache/evaluate/*/outputs/report.json")  # the cache keyed by the file's bytes
    digests = [json.loads(path.read_text())["backbone_sha256"] for path in reports]
    assert file_digest(tmp_path / "released.pth") in digests
    # a real benchmark data set from the UI's parameters: revisited Oxford's layout, longer sides at 56 px
    from tests.evaluators.test_retrieval import write_revisited

    write_revisited(tmp_path / "oxford")
    oxford = runs.run("evaluate_only", weights_uri=str(tmp_path / "released.pth"), eval_tasks=["retrieval"],
                      retrieval_data=f"roxford5k:{tmp_path / 'oxford'}", eval_image_size=56)["evaluate"]
    assert oxford.status == "FINISHED" and 0 < oxford.metrics["retrieval_map_medium"] <= 1


def test_eval_options_set_the_suites_other_settings_from_the_ui(runs: Runs) -> None:
    """``eval_options``, one mapping of the pipelines' form, carries the suite's settings that have
    no parameter of their own to the evaluate task; a setting that has one is refused naming it,
    the pipeline failing with the stage's error."""
    backbone = str(runs.earliest("full-*/pretrain/backbone"))
    options = {"retrieval_scenes": 6, "scene_size": 28, "seed": 5}
    scored = runs.run("evaluate_only", weights_uri=backbone, eval_tasks=["retrieval"], eval_options=options)
    assert scored["evaluate"].status == "FINISHED" and not scored["evaluate"].cached
    reports = [json.loads(path.read_text()) for path in runs.root.glob("cache/evaluate/*/outputs/report.json")]
    configs = [report["config"] for report in reports if report["config"]["tasks"] == ["retrieval"]]
    assert any({name: config[name] for name in options} == options for config in configs)
    with pytest.raises(PipelineFailed, match="eval option 'video_data' has an input of its own: set it by video_data"):
        runs.run_all("evaluate_only", weights_uri=backbone, eval_tasks=["video"], eval_options={"video_data": "/x"})


def test_compiled_pipelines_hold_their_dag_and_no_secrets_or_local_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = "planted-secret-4f1c"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", planted)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", planted)
    expected = {
        "full": {"open-run": [], "ingest": ["open-run"], "curate": ["ingest", "open-run"],
                 "pretrain": ["curate", "open-run"], "evaluate": ["ingest", "open-run", "pretrain"],
                 "register": ["evaluate", "open-run", "pretrain"],
                 "distil-students": ["curate", "ingest", "open-run", "pretrain"]},
        "evaluate_only": {"open-run": [], "condition-branches-2": ["open-run"]},
        "distill": {"open-run": [], "condition-branches-2": ["open-run"]},
        "finetune": {"open-run": [], "condition-branches-2": ["open-run"]},
        "promote": {"open-run": [], "promote": ["open-run"]},
        "retrain": {"open-run": [], "champion": ["open-run"], "pretrain": ["champion", "open-run"],
                    "evaluate": ["open-run", "pretrain"], "register": ["evaluate", "open-run", "pretrain"]},
    }
    branched = {  # (the parameter choosing the branch, each branch's tasks)
        "evaluate_only": ("model", {"importer": [], "evaluate": ["importer"], "champion": [],
                                    "evaluate-2": ["champion"]}),
        "distill": ("teacher_uri", {"champion": [], "distil-students": ["champion"], "importer": [],
                                    "distil-students-2": ["importer"]}),
        "finetune": ("weights_uri", {"champion": [], "finetune": ["champion"], "register": ["finetune"],
                                     "importer": [], "finetune-2": ["importer"], "register-2": ["finetune-2"]}),
    }
    for name, tasks in expected.items():
        out = tmp_path / f"{name}.yaml"
        result = CliRunner().invoke(app, ["pipeline", "compile", name, "--out", str(out), "--image", "registry.example/dinoflow:1"])
        assert result.exit_code == 0, result.output
        text = out.read_text()
        spec, platform = yaml.safe_load_all(text)
        root = spec["root"]["dag"]["tasks"]
        assert set(root) == {"exit-handler-1", "close-run"}
        assert root["close-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
        inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
        assert {task: sorted(body.get("dependentTasks", [])) for task, body in inner.items()} == tasks
        if name in branched:  # a registered version (its heads with it) if the parameter is empty, else imported
            parameter, branch_tasks = branched[name]
            branches = spec["components"]["comp-condition-branches-2"]["dag"]["tasks"]
            assert [body["triggerPolicy"]["condition"] for body in branches.values()] == [
                f"inputs.parameter_values['pipelinechannel--{parameter}'] == ''",
                f"!(inputs.parameter_values['pipelinechannel--{parameter}'] == '')"]
            assert {task: sorted(body.get("dependentTasks", []))
                    for branch in ("comp-condition-3", "comp-condition-4")
                    for task, body in spec["components"][branch]["dag"]["tasks"].items()} == branch_tasks
        if name == "full":  # each student, in parallel: distil from the teacher, then evaluate and register it
            assert list(spec["components"]["comp-distil-students"]["dag"]["tasks"]) == ["for-loop-1"]
            loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
            assert {task: sorted(body.get("dependentTasks", [])) for task, body in loop.items()} == {
                "distill": [], "evaluate": ["distill"], "register": ["distill", "evaluate"]}
        for task in ("open-run", "register", "champion", "promote"):
            if task in inner:
                assert inner[task]["cachingOptions"] == {}  # caching off: they act, not compute
        images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e}
        assert images == {"registry.example/dinoflow:1"}
        assert_cluster_env(spec, platform)
        defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
        assert defaults["run_root"] == "s3://dinoflow/runs" and defaults["tracking_uri"].startswith("http://mlflow.")
        assert planted not in text
        for local in (str(Path.cwd()), str(Path.home()), str(tmp_path), "/usr/share", "sqlite:"):
            assert local not in text, f"{local} baked into {name}"


def assert_cluster_env(spec: dict[str, Any], platform: dict[str, Any], secret: str = S3_SECRET) -> None:
    """Every container task reads the S3 Secret and the settings ConfigMap as env vars (names only)."""
    executors = {name for name, e in spec["deploymentSpec"]["executors"].items() if "container" in e}
    configs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(configs) == executors
    for name, config in configs.items():
        (secret_env,) = config["secretAsEnv"]
        assert secret_env["secretName"] == secret and not secret_env["optional"], name
        assert {(k["secretKey"], k["envVar"]) for k in secret_env["keyToEnv"]} == {
            ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")}, name
        (settings,) = config["configMapAsEnv"]
        assert settings["configMapName"] == SETTINGS_CONFIG_MAP and not settings["optional"], name
        assert {k["envVar"] for k in settings["keyToEnv"]} == {"AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"}, name


def test_compiled_components_run_on_the_cpu_and_gpu_images_of_a_registry_and_tag(tmp_path: Path) -> None:
    out = tmp_path / "full.yaml"
    result = CliRunner().invoke(app, ["pipeline", "compile", "full", "--out", str(out), "--registry",
                                      "registry.example/team/", "--tag", "2.0.1", "--s3-secret", "team-s3"],
                                env={"DINOFLOW_IMAGE": None})
    assert result.exit_code == 0, result.output
    spec, platform = yaml.safe_load_all(out.read_text())
    images = {name.removeprefix("exec-"): e["container"]["image"]
              for name, e in spec["deploymentSpec"]["executors"].items()}
    assert images.pop("pretrain") == images.pop("distill") == images.pop("evaluate") == images.pop("evaluate-2") == (
        "registry.example/team/dinoflow-gpu:2.0.1")
    assert set(images.values()) == {"registry.example/team/dinoflow-cpu:2.0.1"}
    assert_cluster_env(spec, platform, secret="team-s3")
    # the defaults: this release's images, pinned to its version, and the infra's Secret
    defaults = Images.from_registry()
    version = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["version"]
    assert (defaults.cpu, defaults.gpu) == (f"ghcr.io/dinoflow/dinoflow-cpu:{version}",
                                            f"ghcr.io/dinoflow/dinoflow-gpu:{version}")
    latest = CliRunner().invoke(app, ["pipeline", "compile", "full", "--out", str(out), "--tag", "latest"],
                                env={"DINOFLOW_IMAGE": None})
    assert latest.exit_code == 2 and "fixed tag (not latest)" in latest.stderr


def _compiled(tmp_path: Path, name: str, *options: str) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path / f"{name}.yaml"
    result = CliRunner().invoke(app, ["pipeline", "compile", name, "--out", str(out), *options],
                                env={"DINOFLOW_IMAGE": None, "DINOFLOW_GPUS": None})
    assert result.exit_code == 0, result.output
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform


def _hardware(spec: dict[str, Any], platform: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: image, resources, tolerations, /dev/shm volume and (GPU stages) the device it runs
    on; tasks of every DAG (the exit handler's, the students' loop, the root)."""
    configs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    components, executors = spec["components"], spec["deploymentSpec"]["executors"]
    tasks = {components[task["componentRef"]["name"]]["executorLabel"]: task
             for component in [spec["root"], *components.values()]
             for task in component.get("dag", {}).get("tasks", {}).values()
             if "executorLabel" in components[task["componentRef"]["name"]]}
    return {
        name.removeprefix("exec-"): {
            "image": e["container"]["image"], "resources": e["container"].get("resources", {}),
            "tolerations": configs[name].get("tolerations", []),
            "shm": [m["mountPath"] for m in configs[name].get("emptyDirMounts", [])],
            "device": tasks[name]["inputs"]["parameters"].get("device", {}).get("runtimeValue", {}).get("constant"),
        }
        for name, e in executors.items() if "container" in e  # (an importer runs no container)
    }


@pytest.mark.parametrize("name", ["full", "retrain", "evaluate_only", "distill", "finetune"])
def test_pretrain_and_evaluate_request_a_gpu_and_tolerate_the_gpu_taint(tmp_path: Path, name: str) -> None:
    """The stages that run a backbone over a data set (training, and evaluation: ImageNet's probe
    takes hours on a CPU) get a GPU each, the GPU image, the taint's toleration, device=cuda and
    the shared memory their decoding processes need; no other task does."""
    tasks = _hardware(*_compiled(tmp_path, name))
    gpu_tasks = {task: tasks.pop(task) for task in list(tasks) if task.split("-")[0] in GPU_STAGES}
    expected = {"full": {"pretrain", "distill", "evaluate", "evaluate-2"}, "retrain": {"pretrain", "evaluate"},
                "evaluate_only": {"evaluate", "evaluate-2"},  # evaluate_only, distill: one per branch
                "distill": {"distill", "distill-2", "evaluate", "evaluate-2"},
                "finetune": {"finetune", "finetune-2"}}[name]
    assert set(gpu_tasks) == expected
    for task, hardware in gpu_tasks.items():
        accelerator = hardware["resources"]["accelerator"]
        assert (accelerator["resourceType"], accelerator["resourceCount"]) == (GPU_RESOURCE, "1"), task
        assert hardware["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert hardware["image"].split("/")[-1].startswith("dinoflow-gpu:") and hardware["device"] == "cuda", task
        assert hardware["shm"] == ["/dev/shm"], task  # DataLoader workers share batches through it
    for task, hardware in tasks.items():
        assert "accelerator" not in hardware["resources"] and hardware["tolerations"] == [], task
        assert hardware["image"].split("/")[-1].startswith("dinoflow-cpu:"), task


def test_retrain_trains_on_the_pipelines_data_kind_and_scores_on_its_eval_data(tmp_path: Path) -> None:
    """A champion continued on one's own images (a folder, curated shards), gated on one's own labels."""
    spec, _ = _compiled(tmp_path, "retrain")
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    for task, parameter in (("pretrain", "data_kind"), ("pretrain", "data_uri"), ("evaluate", "eval_data_uri")):
        assert tasks[task]["inputs"]["parameters"][parameter]["componentInputParameter"].endswith(parameter)
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["data_kind"]["defaultValue"] == "fashion_mnist" and defaults["eval_data_uri"]["defaultValue"] == ""


def test_gpus_0_compiles_for_a_cpu_only_cluster(tmp_path: Path) -> None:
    tasks = _hardware(*_compiled(tmp_path, "retrain", "--gpus", "0"))
    assert all("accelerator" not in t["resources"] and t["tolerations"] == [] for t in tasks.values())
    assert {t["image"].split("/")[-1].split(":")[0] for t in tasks.values()} == {"dinoflow-cpu"}
    assert tasks["pretrain"]["device"] == tasks["evaluate"]["device"] == "cpu"
    many = CliRunner().invoke(app, ["pipeline", "compile", "retrain", "--out", str(tmp_path / "x.yaml"), "--gpus",
                                    "2"], env={"DINOFLOW_IMAGE": None})
    assert many.exit_code == 2 and "gpus must be 0 (a CPU-only cluster) or 1" in many.stderr


@pytest.mark.parametrize("gpus", ["1", "0"])
def test_every_task_requests_and_limits_cpu_and_memory(tmp_path: Path, gpus: str) -> None:
    def quantity(value: str) -> float:
        units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
        unit = next((u for u in units if value.endswith(u)), "")
        return float(value.removesuffix(unit)) * units.get(unit, 1)

    tasks = _hardware(*_compiled(tmp_path, "full", "--gpus", gpus))
    assert set(tasks) == {"open-run", "close-run", "ingest", "curate", "pretrain", "distill", "evaluate", "register",
                          "evaluate-2", "register-2"}
    for task, hardware in tasks.items():
        r = hardware["resources"]
        for kind in ("Cpu", "Memory"):
            request, limit = quantity(r[f"resource{kind}Request"]), quantity(r[f"resource{kind}Limit"])
            assert 0 < request <= limit, (task, kind, r)


def test_local_runs_build_without_gpus(tmp_path: Path) -> None:
    """``dinoflow demo`` and ``pipeline run`` (kfp.local) get the pipeline with gpus=0: pretrain on cpu."""
    from kfp import compiler

    out = tmp_path / "local.yaml"
    compiler.Compiler().compile(_pipeline("full"), str(out))
    tasks = _hardware(*yaml.safe_load_all(out.read_text()))
    assert tasks["pretrain"]["device"] == "cpu" and "accelerator" not in tasks["pretrain"]["resources"]


def test_pipeline_cli_rejects_unknown_names_and_parameters() -> None:
    bad = CliRunner().invoke(app, ["pipeline", "run", "nope"])
    assert bad.exit_code == 2
    assert "unknown pipeline 'nope'; allowed: full, evaluate_only, retrain, distill, finetune, promote" in bad.stderr
    param = CliRunner().invoke(app, ["pipeline", "run", "full", "max_minute=3"])
    assert param.exit_code == 2 and "bad pipeline parameter 'max_minute=3'" in param.stderr
    assert "max_minutes" in param.stderr


@pytest.mark.parametrize("name", ["full", "retrain", "evaluate_only", "distill"])
def test_every_evaluate_task_takes_the_benchmark_data_sets_from_the_pipeline(tmp_path: Path, name: str) -> None:
    """``eval_test_uri``, ``seg_data``, ``depth_data``, ``retrieval_data``, ``video_data``, ``eval_image_size``,
    ``eval_precision``, ``eval_seg_steps``, ``eval_depth_steps``, ``eval_depth_head``, ``eval_options``:
    parameters of each evaluating pipeline (the UI's form), fed to every evaluate task (the students' too), so a
    gate may read a dense metric measured on a real data set."""
    spec, platform = _compiled(tmp_path, name)
    given = {"seg_data": "seg_data", "depth_data": "depth_data", "retrieval_data": "retrieval_data",
             "video_data": "video_data", "eval_image_size": "image_size", "eval_precision": "precision",
             "eval_seg_steps": "seg_steps",
             "eval_depth_steps": "depth_steps", "eval_depth_head": "depth_head", "eval_test_uri": "test_uri",
             "eval_options": "options"}
    assert set(given) <= set(spec["root"]["inputDefinitions"]["parameters"])
    evaluates = [task for component in [spec["root"], *spec["components"].values()]
                 for task in component.get("dag", {}).get("tasks", {}).values()
                 if task["componentRef"]["name"].startswith("comp-evaluate")]
    assert len(evaluates) == {"full": 2, "retrain": 1, "evaluate_only": 2, "distill": 2}[name]
    for task in evaluates:
        inputs = task["inputs"]["parameters"]
        for pipeline_param, stage_param in given.items():
            assert inputs[stage_param]["componentInputParameter"].endswith(pipeline_param), (task, stage_param)
