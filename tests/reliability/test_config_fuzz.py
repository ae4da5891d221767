"""The config parsers fail only with ConfigError (one line naming the field), whatever they are fed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinoflow.config import (
    ConfigError,
    PretrainConfig,
    apply_overrides,
    load_config,
    load_yaml,
)

FIELDS = ["seed", "out", "optim.lr", "optim.batch_size", "model.depth", "crops.global_crop_size", "model.patch_size",
          "loss.centering", "data.kind", "model", "optim", "a.b.c", "seed.x", "eval.at_minutes"]
VALUES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["-1", "0", "1e309", "nan", "inf", "[1, 2]", "{a: 1}", "null", "~", "true", "[", "{", "'",
                     "!!python/object/apply:os.system [ls]", "&a [*a]", "2001-02-29", "0x10", "1_000"]),
)
OVERRIDES = st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(FIELDS), VALUES), st.text(max_size=30))


@settings(max_examples=300, deadline=None)
@given(st.lists(OVERRIDES, max_size=4))
def test_overrides_give_a_config_or_a_config_error(overrides: list[str]) -> None:
    try:
        config = load_config(PretrainConfig, None, overrides)
    except ConfigError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert isinstance(config, PretrainConfig)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_preset_text_gives_a_config_or_a_config_error(tmp_path_factory: pytest.TempPathFactory,
                                                           text: str) -> None:
    path = tmp_path_factory.mktemp("preset") / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(PretrainConfig, path)
    except ConfigError:
        pass


def test_unsafe_yaml_tags_are_never_constructed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path)
    assert not marker.exists()


def test_a_self_including_preset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("_base_: b\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("_base_: a\nseed: 2\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_yaml(tmp_path / "a.yaml")


@pytest.mark.parametrize("where", ["override", "preset"])
def test_an_impossible_date_is_a_config_error(tmp_path: Path, where: str) -> None:
    path = tmp_path / "date.yaml"
    path.write_text("name: 2001-02-30\n")
    with pytest.raises(ConfigError):
        if where == "override":
            apply_overrides({}, ["name=2001-02-30"])
        else:
            load_config(PretrainConfig, path)


def test_a_deeply_nested_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load_config(PretrainConfig, None, ["seed=" + "[" * 2000])
