"""Typed configs: YAML in, strict keys, errors that name the offending key, and command-line flags derived from the
same fields that override the YAML."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import pytest
from pydantic import ByteSize, Field, ValidationError

from clt_core.config import Config, add_config_arguments, config_from_args
from clt_core.data.synthetic import SyntheticConfig
from clt_core.errors import ConfigError


class Demo(Config):
    """Every kind of field the flag derivation has to handle."""

    size: int = Field(3, ge=1)
    """How many."""
    rate: float = 0.5
    """How fast."""
    fast: bool = False
    """Take the shortcut."""
    mode: Literal["a", "b"] = "a"
    """Which way."""
    limit: int | None = None
    """Optional cap."""
    budget: ByteSize = ByteSize(1000)
    """Memory to use."""
    name: str = "x"
    """A label."""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def parse(model: type[Config], argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(parser, model)
    return parser.parse_args(argv)


def test_yaml_values_are_loaded_and_the_rest_defaulted(tmp_path: Path) -> None:
    cfg = SyntheticConfig.from_yaml(write(tmp_path, "rows: 100\ndtype: float16\nnoise: 0.0\n"))
    assert (cfg.rows, cfg.dtype, cfg.noise) == (100, "float16", 0.0)
    assert cfg.num_layers == SyntheticConfig().num_layers


def test_an_empty_yaml_file_gives_the_defaults(tmp_path: Path) -> None:
    assert SyntheticConfig.from_yaml(write(tmp_path, "")) == SyntheticConfig()


def test_to_yaml_round_trips(tmp_path: Path) -> None:
    cfg = Demo(size=9, mode="b", limit=4, budget=ByteSize(2048))
    assert Demo.from_yaml(write(tmp_path, cfg.to_yaml())) == cfg


def test_an_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "rows: 10\nrowz: 11\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'rowz'$"):
        SyntheticConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("rows: 0", r"rows: Input should be greater than or equal to 1 \(got 0\)"),
        ("rows: many", r"rows: Input should be a valid integer.*\(got 'many'\)"),
        ("dtype: int8", r"dtype: Input should be 'bfloat16', 'float16' or 'float32' \(got 'int8'\)"),
        ("noise: -1", r"noise: Input should be greater than or equal to 0 \(got -1\)"),
    ],
)
def test_a_bad_value_names_its_key_and_value(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        SyntheticConfig.from_yaml(write(tmp_path, text))


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        SyntheticConfig.from_yaml(write(tmp_path, "rows: 0\nbogus: 1\nd_model: x\n"))
    message = str(info.value)
    assert "rows:" in message and "unknown key 'bogus'" in message and "d_model:" in message
    assert "\n" not in message  # the CLI prints it as one line


@pytest.mark.parametrize(
    ("text", "pattern"),
    [("rows: [1, 2", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping of keys to values, got list")],
)
def test_malformed_yaml_is_a_config_error(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        SyntheticConfig.from_yaml(write(tmp_path, text))


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        SyntheticConfig.from_yaml(tmp_path / "absent.yaml")


def test_assignment_is_validated_too() -> None:
    cfg = SyntheticConfig()
    with pytest.raises(ValidationError):
        cfg.rows = 0


def test_there_is_one_flag_per_field_with_its_docstring_as_help() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SyntheticConfig)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    assert {"--" + name.replace("_", "-") for name in SyntheticConfig.model_fields} <= flags
    help_text = " ".join(parser.format_help().split())
    assert "Token rows to write. (default: 8192)" in help_text


def test_flags_override_yaml_and_unset_flags_keep_it(tmp_path: Path) -> None:
    path = write(tmp_path, "rows: 100\nd_model: 32\nseed: 5\n")
    args = parse(SyntheticConfig, ["--rows", "7", "--dtype", "float32"])
    cfg = config_from_args(SyntheticConfig, args, path)
    assert (cfg.rows, cfg.dtype) == (7, "float32")  # from the flags
    assert (cfg.d_model, cfg.seed) == (32, 5)  # from the YAML
    assert cfg.num_layers == 4  # default


def test_flags_alone_build_a_config() -> None:
    cfg = config_from_args(SyntheticConfig, parse(SyntheticConfig, ["--rows-per-chunk", "64"]))
    assert cfg.rows_per_chunk == 64 and cfg.rows == 8192


def test_flag_types_follow_the_field_types() -> None:
    cfg = config_from_args(
        Demo,
        parse(Demo, ["--size", "4", "--rate", "0.25", "--fast", "--mode", "b", "--limit", "9", "--budget", "2KiB"]),
    )
    assert cfg == Demo(size=4, rate=0.25, fast=True, mode="b", limit=9, budget=ByteSize(2048), name="x")
    assert config_from_args(Demo, parse(Demo, ["--no-fast"])).fast is False


def test_a_flag_can_switch_off_a_boolean_set_in_yaml(tmp_path: Path) -> None:
    cfg = config_from_args(Demo, parse(Demo, ["--no-fast"]), write(tmp_path, "fast: true\n"))
    assert cfg.fast is False


def test_a_choice_outside_a_literal_is_refused_by_the_parser() -> None:
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'c'"):
        parse(Demo, ["--mode", "c"])


def test_a_bad_flag_value_is_a_config_error_naming_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"^command line: size: Input should be greater than or equal to 1"):
        config_from_args(Demo, parse(Demo, ["--size", "0"]))
