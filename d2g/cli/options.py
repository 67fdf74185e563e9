"""Options from YAML and flags for pydantic config models: one way, shared by every CLI.

Precedence: the model's defaults < the YAML file < flags. Errors name the file (or "flags") and
the option, and the message lists every bad field at once.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError


def read_yaml_options(path: str) -> dict:
    """A YAML mapping of option: value (dashes in keys read as underscores). Raises ValueError."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def describe_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    """One line per invalid field: the source (file or "flags"), the option's name, the reason, the value."""
    lines = []
    for item in err.errors():
        field = prefix + (".".join(str(p) for p in item["loc"]) or "(config)")
        lines.append(f"{source}: option {field!r}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def build_model(model: type[BaseModel], yaml_path: str | None, overrides: dict | None, error: type[Exception]):
    """Defaults < YAML < non-None overrides, validated; any problem raises `error` naming the field."""
    data: dict = {}
    source = "flags"
    if yaml_path:
        source = yaml_path
        try:
            data.update(read_yaml_options(yaml_path))
        except ValueError as err:
            raise error(str(err)) from None
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model(**data)
    except ValidationError as err:
        raise error(describe_validation_error(err, source)) from None


def _mapping_flag(flag: str):
    """A flag value parsed as a YAML flow mapping (JSON is YAML too), so the same text works in a
    config file and on the command line; argparse turns the ValueError into a usage error naming the flag."""

    def parse(text: str) -> dict:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise argparse.ArgumentTypeError(f"not a YAML/JSON mapping: {err}".splitlines()[0]) from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a mapping like '{{key: value}}', got {text!r}")
        return value

    parse.__name__ = flag  # argparse names the type in its message
    return parse


def _flag_kind(annotation) -> tuple[object, list | None]:
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:
        inner = args[0]
        if typing.get_origin(inner) is typing.Literal:
            return str, list(typing.get_args(inner))
        return inner, None
    return annotation, None


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field (`--num-pairs` for num_pairs), help from the field's description.
    Booleans get --x/--no-x; dicts take JSON; fixed-length tuples take several values."""
    for name, info in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.default if info.default_factory is None else info.default_factory()
        help_text = f"{info.description} [default: {default}]"
        kind, choices = _flag_kind(info.annotation)
        origin = typing.get_origin(info.annotation)
        is_model = isinstance(kind, type) and issubclass(kind, BaseModel)
        if is_model:
            help_text = f"{info.description} [default: the preset]"
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is dict or origin is dict or is_model:
            parser.add_argument(flag, dest=name, type=_mapping_flag(flag), default=None,
                                help=help_text + " (a YAML or JSON mapping, e.g. '{lambda_gan: 0.1}')")
        elif origin is tuple:
            item_types = typing.get_args(info.annotation)
            parser.add_argument(flag, dest=name, type=item_types[0], nargs=len(item_types), default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text)


def flag_overrides(args: argparse.Namespace, model: type[BaseModel]) -> dict:
    """The model's fields that were given as flags (argparse leaves the others None)."""
    return {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
