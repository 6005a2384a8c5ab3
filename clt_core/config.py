"""Typed configuration: pydantic models that load from YAML and refuse unknown keys.

Every config field carries its description; the command line is derived from the same fields
(`add_config_arguments`), so flags never drift from the code.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, ValidationError

from clt_core.errors import ConfigError


def format_validation_error(err: ValidationError, source: str) -> str:
    """One readable line per problem: `source: field.path: message (got value)`."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{where}'")
        elif e["type"] == "value_error":  # a model validator's own message: already names the values
            message = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{source}: {message}" if where == "<root>" else f"{source}: {where}: {message}")
        else:
            lines.append(f"{source}: {where}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """A YAML parse error on one line: `line L, column C: problem (context)` (PyYAML's own text spans lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or " ".join(str(err).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(err, "context", None)
    return f"{where}{problem}" + (f" ({context})" if context else "")


class Config(BaseModel):
    """Base for every configuration section: strict keys, validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, source)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as err:  # a directory, unreadable, not text
            raise ConfigError(f"{path}: cannot read the config file ({err}); give a YAML text file") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {describe_yaml_error(err)}; fix the file's syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


C = TypeVar("C", bound=Config)


def _argparse_type(annotation: Any) -> tuple[Any, bool]:
    """The scalar type argparse should parse for a field, and whether the field may be None."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
    if typing.get_origin(annotation) is typing.Literal:
        return str, optional
    if annotation is ByteSize:
        return str, optional
    if annotation in (int, float, str, bool):
        return annotation, optional
    return str, optional


def add_config_arguments(
    parser: argparse.ArgumentParser, model: type[Config], skip: Collection[str] = frozenset(), section: str = ""
) -> None:
    """Add one `--field-name` flag per field of `model`, defaulting to None (= keep the config's value). With
    `section`, the value lands in `args` as `"{section}.{field}"`, for `config_from_args` to nest it."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        dest = f"{section}.{name}" if section else name
        kind, _ = _argparse_type(field.annotation)
        # argparse %-formats help strings: a literal "%" must reach it as "%%"
        help_text = ((field.description or "") + f" (default: {field.default!r})").replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, dest=dest, default=None, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        choices = None
        ann = field.annotation
        if typing.get_origin(ann) in (typing.Union, types.UnionType):
            ann = next(a for a in typing.get_args(ann) if a is not type(None))
        if typing.get_origin(ann) is typing.Literal:
            choices = list(typing.get_args(ann))
        parser.add_argument(flag, dest=dest, default=None, type=kind, choices=choices, help=help_text)


def config_from_args(model: type[C], args: argparse.Namespace, yaml_path: str | Path | None = None) -> C:
    """Build a config from an optional YAML file, then override with the flags the user gave."""
    base = model.from_yaml(yaml_path).model_dump() if yaml_path else {}
    for name, value in vars(args).items():
        if value is None:
            continue
        section, _, field = name.rpartition(".")
        if section in model.model_fields:
            if base.get(section) is None:  # an optional section the file leaves out
                base[section] = {}
            if isinstance(base[section], BaseModel):
                base[section] = base[section].model_dump()
            current = base[section].get(field)
            if isinstance(value, dict) and isinstance(current, dict):  # a nested section's fields: merged
                value = {**current, **value}
            base[section][field] = value
        elif name in model.model_fields:
            base[name] = value
    return model.from_dict(base, source=str(yaml_path) if yaml_path else "command line")
