"""Pipeline parameters, fuzzed (hypothesis), against what validates them before a task runs.

Three gates stand between a user's ``key=value`` and a stage's work:

1. ``dinoflow pipeline run|submit`` parses the items (``pipelines.cli._pipeline_params``: known
   keys only, values read as YAML);
2. KFP checks each value against the pipeline input's declared type when the pipeline is called;
3. the pretrain stage builds its recipe from ``preset``, ``overrides``, ``max_minutes`` and ``seed``
   (``components.pretrain.pretrain_config``) before it trains.

Whatever the input, each must give a result the next gate accepts or its own one-line refusal.
Nothing here runs a pipeline: gate 2 is driven by calling a pipeline with no local runner set up,
which KFP refuses only after its type check.

The suite found three bugs, now fixed: YAML that did not parse and ints for Float inputs gave
tracebacks (``max_minutes=2``, the README's own example), a 300-character preset name raised
``OSError``, and seeds of -1 or >= 2**45 validated and failed once training started.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator

import click
import pytest
import torch
import typer
from hypothesis import example, given, settings
from hypothesis import strategies as st

from components.pretrain import pretrain_config
from dinoflow.config import ConfigError, PretrainConfig
from pipelines.cli import _pipeline_params
from pipelines.definitions import build_pipelines

PIPELINES = build_pipelines()
NAMES = sorted(PIPELINES)
KEYS = sorted({key for pipeline in PIPELINES.values() for key in pipeline.component_spec.inputs})
YAML_VALUES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["-1", "0", "2", "1.5", "1e309", "nan", ".nan", "-.inf", "[1, 2]", "[]", "{a: 1}", "null", "~",
                     "true", "[", "{", "'", '"', "!!python/object/apply:os.system [ls]", "&a [*a]", "*a",
                     "2001-02-30", "0x10", "1_000", "[optim.lr=0.1]", "- a\n- b", "a: b: c", "\t", "%TAG"]),
)
ITEMS = st.one_of(
    st.builds(lambda key, value: f"{key}={value}", st.sampled_from([*KEYS, "nope", "", "max_minute", "Seed"]),
              YAML_VALUES),
    st.text(max_size=30),
)


def parse(name: str, items: list[str], params_file: str | None = None) -> dict | str:
    """``_pipeline_params``'s parameters, or the one-line message it refused them with (exit 2)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return _pipeline_params(PIPELINES[name], items, params_file)
    except (typer.Exit, click.exceptions.Exit) as refused:
        message = stderr.getvalue().strip()
        assert refused.exit_code == 2 and message.startswith("error: ") and "\n" not in message, message
        return message


def type_check(name: str, params: dict) -> Exception:
    """What calling pipeline ``name`` with ``params`` raises when no local runner is set up: KFP's
    type refusal, or (every value fits) the missing runner's RuntimeError. Nothing runs."""
    from kfp.local import config as local_config

    saved = local_config.LocalExecutionConfig.instance
    local_config.LocalExecutionConfig.instance = None
    try:
        PIPELINES[name](**params)
    except Exception as err:  # noqa: BLE001 - returned for the caller to judge
        return err
    finally:
        local_config.LocalExecutionConfig.instance = saved
    raise AssertionError("a pipeline call with no runner set up returned")


def required(name: str) -> dict[str, str]:
    """A value for each input of pipeline ``name`` that has no default (``weights_uri``)."""
    return {key: "x" for key, spec in PIPELINES[name].component_spec.inputs.items() if spec.default is None
            and not spec.optional}


def passes_type_check(error: Exception) -> bool:
    return isinstance(error, RuntimeError) and "kfp.local.init()" in str(error)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(NAMES), st.lists(ITEMS, max_size=4))
@example("full", ["max_minutes=2"])  # the README's own example
@example("full", ["max_minutes=["])  # YAML that does not parse
@example("full", ["seed=!!python/object/apply:os.system [ls]"])  # a tag safe_load refuses
def test_key_value_items_give_parameters_kfp_accepts_or_a_one_line_refusal(name: str, items: list[str]) -> None:
    params = parse(name, items)
    if isinstance(params, str):
        return
    error = type_check(name, {**required(name), **params})
    assert passes_type_check(error), f"{items} -> {params}: {type(error).__name__}: {error}"


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(NAMES), st.lists(ITEMS, max_size=3),
       st.text(min_size=1, max_size=20).filter(lambda key: key.isprintable() and "=" not in key))
def test_an_unknown_key_is_refused_in_one_line_naming_it(name: str, items: list[str], key: str) -> None:
    """Whatever surrounds it, a key the pipeline does not declare never reaches it."""
    if key in PIPELINES[name].component_spec.inputs:
        return
    try:
        result = parse(name, [*items, f"{key}=1"])
    except Exception:  # noqa: BLE001 - an earlier item's error: the first test above owns it
        return
    assert isinstance(result, str), f"unknown key {key!r} accepted: {result}"


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(NAMES), st.data())
def test_a_value_of_the_wrong_type_is_refused_naming_its_input_before_any_task(name: str, data: st.DataObject) -> None:
    """Gate 2, which the CLI relies on: KFP's type check names the input and runs nothing."""
    inputs = PIPELINES[name].component_spec.inputs
    key = data.draw(st.sampled_from(sorted(inputs)))
    wrong_values = {
        "String": st.one_of(st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=1)),
        "Integer": st.one_of(st.floats(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=1)),
        "Float": st.one_of(st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=1)),
        "Boolean": st.one_of(st.integers(), st.floats(), st.text(max_size=5)),
        "List": st.one_of(st.integers(), st.floats(), st.booleans(), st.text(max_size=5),
                          st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=1)),
        "Dict": st.one_of(st.integers(), st.floats(), st.booleans(), st.text(max_size=5),
                          st.lists(st.integers(), min_size=1, max_size=1)),
    }[inputs[key].type]
    error = type_check(name, {**required(name), key: data.draw(wrong_values)})
    assert not passes_type_check(error) and f"'{key}'" in str(error), f"{type(error).__name__}: {error}"


PRESETS = st.one_of(st.sampled_from(["tiny", "vits14", "demo", "", ".", "..", "/", "/etc/passwd", "/dev/null",
                                     "tiny.yaml", "configs", "[", "*", "tiny\x00", "a" * 300, "x/" * 200]),
                    st.text(max_size=20))
OVERRIDES = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["optim.lr", "model.depth", "data.kind", "device", "out",
                                                      "max_minutes", "seed", "crops.local_crop_size", "nope"]),
              YAML_VALUES),
    st.text(max_size=20)), max_size=3)
SEEDS = st.integers(min_value=-(2**70), max_value=2**70)


@settings(max_examples=300, deadline=None)
@given(PRESETS, OVERRIDES, st.floats(), SEEDS)
@example("a" * 300, [], 1.0, 0)
def test_the_pretrain_stage_recipe_is_a_config_or_a_config_error(preset: str, overrides: list[str],
                                                                  max_minutes: float, seed: int) -> None:
    try:
        cfg = pretrain_config(preset, overrides, "fashion_mnist", "/data", max_minutes, seed)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err), str(err)
        return
    assert isinstance(cfg, PretrainConfig)
    assert cfg.max_minutes >= 0 and not math.isnan(cfg.max_minutes)


def engine_seeds(seed: int) -> Iterator[None]:
    """Seed the generators as the trainer does at step 0 (batches.make_batch, ResumableBatches,
    the per-step torch seed of a rank of up to 1024)."""
    import numpy as np

    np.random.default_rng([seed, 0])
    torch.manual_seed(seed)
    torch.manual_seed((seed * 1_000_003 + 0) * 1024 + 1023)
    yield


@settings(max_examples=100, deadline=None)
@given(SEEDS)
@example(-1)
@example(2**45)
def test_a_recipe_that_validates_has_a_seed_the_trainer_can_use(seed: int) -> None:
    try:
        cfg = pretrain_config("tiny", [], "fashion_mnist", "/data", 1.0, seed)
    except ConfigError:
        return
    list(engine_seeds(cfg.seed))


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(NAMES), st.dictionaries(st.sampled_from([*KEYS, "nope"]), YAML_VALUES, max_size=4),
       st.sampled_from(["pipeline", "name", ""]), st.lists(ITEMS, max_size=2))
@example("distill", {"alias": "0000-00-00"}, "pipeline", [])  # a date YAML parses and Python refuses
def test_a_parameter_file_gives_parameters_kfp_accepts_or_a_one_line_refusal(
        tmp_path_factory: pytest.TempPathFactory, name: str, values: dict, key: str, items: list[str]) -> None:
    """``--params``: any file (values parsed as YAML, a wrong or missing ``pipeline`` key) is read
    into parameters KFP's type check accepts, with the items over them, or refused in one line."""
    import yaml

    parsed = {}
    for param, text in values.items():
        try:
            parsed[param] = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError, RecursionError):
            parsed[param] = text
    path = tmp_path_factory.mktemp("params") / "set.yaml"
    path.write_text(yaml.safe_dump({key: name, "parameters": parsed} if key else parsed))
    (path.parent / "raw.yaml").write_text(f"pipeline: {name}\nparameters:\n" + "".join(
        f"  {param}: {text}\n" for param, text in values.items() if "\n" not in text))  # YAML as written
    assert isinstance(parse(name, [], str(path.parent / "raw.yaml")), dict | str)  # read or refused in one line
    params = parse(name, items, str(path))
    if isinstance(params, str):
        return
    assert key == "pipeline"
    error = type_check(name, {**required(name), **params})
    assert passes_type_check(error), f"{values} {items} -> {params}: {type(error).__name__}: {error}"


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(NAMES), st.one_of(st.text(max_size=30), st.sampled_from(["", ".", "/", "/dev/null", "a" * 5000,
                                                                                "retrain-weekly", "../README.md"])))
def test_any_parameter_file_name_is_read_or_refused_in_one_line(name: str, given: str) -> None:
    if "\x00" in given:
        return
    result = parse(name, [], given)
    assert isinstance(result, dict) or result.startswith("error: bad parameter file")
