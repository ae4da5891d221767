"""dinoflow.config: presets, overrides, one-line errors naming the field."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dinoflow.config import (
    CONFIG_DIR,
    ConfigError,
    DemoConfig,
    DistillConfig,
    FinetuneConfig,
    PretrainConfig,
    apply_overrides,
    load_config,
)
from dinoflow.config_dump import flatten, to_yaml
from pipelines.cli import app


SCHEMA_OF_FOLDER = {"configs": DemoConfig, "pretrain": PretrainConfig, "distill": DistillConfig,
                    "finetune": FinetuneConfig}


def test_every_preset_round_trips(tmp_path: Path) -> None:
    presets = sorted(set(CONFIG_DIR.rglob("*.yaml")) - set(CONFIG_DIR.glob("pipelines/*.yaml")))  # (pipelines':
    assert len(presets) >= 2, "configs/ holds no presets"  # tests/pipelines/test_param_files.py)
    for preset in presets:
        schema = SCHEMA_OF_FOLDER[preset.parent.name]
        config = load_config(schema, preset)
        dumped = tmp_path / f"{preset.stem}.yaml"
        dumped.write_text(to_yaml(config))
        assert load_config(schema, dumped) == config


def test_preset_by_name_and_overrides() -> None:
    config = load_config(
        DemoConfig,
        "demo",
        ["data.knn_k=10", "data.knn_temperature=1e-3", "tracking.experiment=123", "out=s3://b/x"],
    )
    assert config.data.knn_k == 10
    assert config.data.knn_temperature == pytest.approx(1e-3)
    assert config.tracking.experiment == "123"
    assert config.out == "s3://b/x"
    assert config.data.source == "/usr/share/datasets/fashion-mnist"  # untouched keys stay


def test_base_preset_is_extended(tmp_path: Path) -> None:
    (tmp_path / "parent.yaml").write_text("name: parent\ndata:\n  knn_k: 7\n  knn_temperature: 0.5\n")
    (tmp_path / "child.yaml").write_text("_base_: parent\ndata:\n  knn_k: 9\n")
    config = load_config(DemoConfig, tmp_path / "child.yaml")
    assert (config.name, config.data.knn_k, config.data.knn_temperature) == ("parent", 9, 0.5)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.knnk=3"], r"unknown key 'data.knnk' \(allowed: source, knn_k, knn_temperature\)"),
        (["optim.lr=1e-3"], r"unknown key 'optim' \(allowed: name, out, seed, data, tracking, device, pretrain_"),
        (["data.knn_k=abc"], r"data.knn_k = 'abc': Input should be a valid integer"),
        (["data.knn_k=2.5"], r"data.knn_k = '2.5': Input should be a valid integer"),
        (["data.knn_k=0"], r"data.knn_k = '0': Input should be greater than or equal to 1"),
        (["data.knn_temperature=-1"], r"data.knn_temperature = '-1': Input should be greater than 0"),
        (["device=tpu"], r"device = 'tpu': Input should be 'cpu' or 'cuda'"),
        (["data=[1, 2]"], r"data = \[1, 2\]: Input should be a valid dictionary"),
        (["name.first=x"], r"'name' is a value \('demo'\), not a section"),
        (["knn_k"], r"override 'knn_k' must look like section.field=value"),
        (["data..knn_k=1"], r"must look like section.field=value"),
    ],
)
def test_bad_input_gives_one_line_naming_the_field(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(DemoConfig, "demo", overrides)
    assert "\n" not in str(caught.value)


def test_bad_yaml_and_bad_presets(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        load_config(DemoConfig, broken)
    assert "\n" not in str(caught.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(DemoConfig, listed)
    looped = tmp_path / "loop.yaml"
    looped.write_text("_base_: loop\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(DemoConfig, looped)
    with pytest.raises(ConfigError, match="preset 'no-such-preset' not found; available: demo$"):
        load_config(DemoConfig, "no-such-preset")
    with pytest.raises(ConfigError, match="preset file '.*/runs/demo.yaml' not found"):  # not the built-in demo
        load_config(DemoConfig, tmp_path / "runs" / "demo.yaml")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "child.yaml").write_text("_base_: ../nowhere/demo\n")
    with pytest.raises(ConfigError, match="preset file '../nowhere/demo' not found"):
        load_config(DemoConfig, sub / "child.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("tracking:\n  experimnt: x\n")
    with pytest.raises(ConfigError, match="unknown key 'tracking.experimnt'"):
        load_config(DemoConfig, unknown)


@pytest.mark.parametrize("schema, folders", [(DemoConfig, [CONFIG_DIR]), (PretrainConfig, [CONFIG_DIR / "pretrain"]),
                                             (DistillConfig, [CONFIG_DIR / "distill", CONFIG_DIR / "pretrain"]),
                                             (FinetuneConfig, [CONFIG_DIR / "finetune"])])
def test_a_missing_preset_lists_the_presets_of_the_kind_loaded(schema: type[Any], folders: list[Path]) -> None:
    """Not every kind's: a pretraining's or a pipeline's parameter set is no answer to a mistyped fine-tuning recipe."""
    names = sorted(path.stem for folder in folders for path in folder.glob("*.yaml"))
    with pytest.raises(ConfigError) as caught:
        load_config(schema, "no-such-preset")
    assert str(caught.value) == f"preset 'no-such-preset' not found; available: {', '.join(names)}"


def test_cross_field_check_names_the_fields() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(PretrainConfig, "tiny", ["crops.local_crop_size=12"])
    assert str(caught.value) == (
        "invalid PretrainConfig: crops.local_crop_size = 12 is not a multiple of model.patch_size = 7"
    )



@pytest.mark.parametrize(("override", "message"), [
    ("crops.global_crop_scale=[1.0,0.32]", r"crops.global_crop_scale = \[1.0, 0.32\] must hold 0 < low <= high <= 1"),
    ("crops.local_crop_scale=[0,0.3]", r"crops.local_crop_scale = \[0.0, 0.3\] must hold 0 < low <= high <= 1"),
    ("crops.local_crop_scale=[0.05,2]", r"crops.local_crop_scale = \[0.05, 2.0\] must hold"),
    ("loss.mask_ratio_min=0.9", r"loss.mask_ratio_min = 0.9 must be at most loss.mask_ratio_max = 0.5"),
    ("optim.epochs=inf", r"optim.epochs = 'inf': Input should be a finite number"),
    ("loss.student_temp=nan", r"loss.student_temp = 'nan': Input should be a finite number"),
])
def test_values_that_would_fail_later_are_refused_naming_them(override: str, message: str) -> None:
    """Accepted, each failed at the first step (or the schedule) with an error naming no setting."""
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, "tiny", [override])


def test_config_is_frozen_and_flattens() -> None:
    config = load_config(DemoConfig, "demo")
    with pytest.raises(ValueError):
        config.data.knn_k = 3  # type: ignore[misc]
    flat = flatten(config)
    assert flat["data.knn_k"] == 20 and flat["tracking.experiment"] == "dinoflow-demo"
    assert yaml.safe_load(to_yaml(config))["data"]["knn_k"] == 20


def test_apply_overrides_does_not_touch_its_input() -> None:
    data = {"data": {"knn_k": 1}}
    assert apply_overrides(data, ["data.knn_k=2"]) == {"data": {"knn_k": "2"}}
    assert apply_overrides(data, ["data.uri=", "data.limit=null"]) == {"data": {"knn_k": 1, "uri": "", "limit": None}}
    assert data == {"data": {"knn_k": 1}}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=4))
def test_fuzzed_overrides_fail_only_with_config_errors(overrides: list[str]) -> None:
    try:
        config = load_config(DemoConfig, "demo", overrides)
    except ConfigError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(config, DemoConfig)


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
))
def test_fuzzed_yaml_fails_only_with_config_errors(tmp_path_factory: pytest.TempPathFactory, document: object) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "preset.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_config(DemoConfig, path)
    except ConfigError as err:
        assert "\n" not in str(err)


def test_cli_config_show() -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["config", "show", "demo", "data.knn_k=5"])
    assert shown.exit_code == 0, shown.output
    assert yaml.safe_load(shown.stdout)["data"]["knn_k"] == 5
    bad = runner.invoke(app, ["config", "show", "demo", "data.knn_k=0"])
    assert bad.exit_code == 2
    assert "error: invalid DemoConfig: data.knn_k = '0'" in bad.stderr


def test_cli_version_and_help() -> None:
    runner = CliRunner()
    version = runner.invoke(app, ["version"])
    assert version.exit_code == 0 and version.stdout.startswith("dinoflow 0.")
    help_text = runner.invoke(app, ["--help"])
    assert help_text.exit_code == 0 and "demo" in help_text.stdout and "config" in help_text.stdout


def _commands(group: Any, ctx: Any) -> list[Any]:
    """Every command under ``group``, sub-groups' too (typer's groups are its own click's)."""
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        found += _commands(command, ctx) if hasattr(command, "list_commands") else [command]
    return found


def test_cli_help_reads_as_paragraphs() -> None:
    """The help prints a docstring's first paragraph joined into one line but keeps the line breaks
    of the others: a command's summary fits the command list's 80 columns in two lines, and a
    longer line elsewhere would break raggedly at a terminal's 80 columns."""
    group = typer.main.get_command(app)
    commands = _commands(group, group.context_class(group))
    assert len(commands) >= 14
    for command in commands:
        first, *rest = inspect.cleandoc(command.help or "").split("\n\n")
        assert first and len(" ".join(first.split())) <= 130, (command.name, first)
        for line in "\n".join(rest).splitlines():
            assert len(line) <= 76, (command.name, line)
