"""One way to load every stage's config dataclass: YAML file or named preset, then overrides, then flags.

A stage config is a plain ``@dataclass`` whose fields have defaults; a field's help text is
``field(metadata={"help": "..."})``.  :func:`load_config` reads ``spec`` (a YAML path or the name of a
preset shipped in ``latentdiff/configs/``), applies ``overrides`` (field -> value) and coerces every value
to the type of the field's default (lists and dicts given as strings are parsed as YAML; YAML is read
with ``safe_load``, never evaluated).  :func:`add_config_flags` adds one ``--field-name`` flag per field
to an ``argparse`` parser (next to ``deepspeed.add_config_arguments``'s flags, which it does not touch),
and :func:`config_from_args` turns the parsed flags back into a config.  An unknown field is an error
that suggests the nearest field, or the field a common alias stands for (``ALIASES`` on the class).

Field metadata understood besides ``help``: ``flag`` (the flag's name when it is not ``--field-name``,
e.g. ``--input`` for the list field ``inputs``) and ``repeat`` (a list field given by repeating the
flag, ``--input A --input B``).  A boolean flag alone means true (``--flip``); ``--flip false`` also
works.  A field whose default is ``None`` takes the type its annotation names (``int | None``) and
the value ``none``/``null``.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from latentdiff.utils.errors import ConfigError

__all__ = ["preset_names", "read_yaml", "load_config", "add_config_flags", "config_from_args", "field_help"]

T = TypeVar("T")
PRESET_PACKAGE = "latentdiff.configs"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def preset_names() -> list[str]:
    """Names of the YAML presets shipped as package data (``latentdiff/configs/NAME.yaml``)."""
    try:
        return sorted(p.name[:-5] for p in resources.files(PRESET_PACKAGE).iterdir() if p.name.endswith(".yaml"))
    except (ModuleNotFoundError, FileNotFoundError):
        return []


def read_yaml(spec: str) -> dict:
    """The mapping in a YAML file or preset; a clear error for a missing file or bad YAML."""
    path = Path(spec)
    if path.is_file():
        text, where = path.read_text(), str(path)
    elif spec in preset_names():
        text, where = resources.files(PRESET_PACKAGE).joinpath(spec + ".yaml").read_text(), f"preset {spec}"
    else:
        raise ConfigError(f"--config {spec}: no such file or preset; presets: {', '.join(preset_names()) or 'none'}")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of field: value")
    return data


_KINDS = (("bool", bool), ("int", int), ("float", float), ("list", list), ("dict", dict), ("str", str))


def _kind(f: dataclasses.Field) -> type:
    """The type a field's values are coerced to: its default's, else the first type its annotation names."""
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if default is not None:
        return type(default)
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for word in annotation.replace("|", " ").replace("[", " ").replace("Optional", " ").split():
        for name, kind in _KINDS:
            if word == name:
                return kind
    return str


def _coerce_field(f: dataclasses.Field, value: Any):
    """``value`` as the field's type; ``none``/``null`` is None for a field whose default is None."""
    if f.default is None and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
        return None
    return _coerce(f.name, value, _kind(f)())


def _coerce(name: str, value: Any, default: Any):
    """``value`` as the type of ``default`` (bool, int, float, list, dict or str)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{name}: {value!r} is not a boolean (true/false)")
    if isinstance(default, int):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name}: {value!r} is not an integer") from None
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{name}: {value!r} is not an integer")
        return int(value)
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: {value!r} is not a number") from None
    if isinstance(default, (list, dict)):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{name}: {value!r} is not valid YAML") from None
        if not isinstance(value, type(default)):
            raise ConfigError(f"{name}: expected a {type(default).__name__}, got {value!r}")
        return value
    return value if value is None or isinstance(value, str) else str(value)


def _unknown_fields_message(cls, unknown: list[str], names: set[str]) -> str:
    aliases = getattr(cls, "ALIASES", {})
    hints = []
    for u in unknown:
        match = aliases.get(u) or next(iter(difflib.get_close_matches(u, names, 1)), None)
        hints.append(f"{u} (did you mean {match}?)" if match else u)
    return f"unknown {cls.__name__} field(s): {', '.join(hints)}"


def load_config(cls: type[T], spec: str | None = None, overrides: dict | None = None) -> T:
    """A ``cls`` instance from a YAML file or preset name, then ``overrides`` (field -> value)."""
    base = cls()
    data = read_yaml(spec) if spec else {}
    data.update(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(_unknown_fields_message(cls, unknown, set(fields)))
    return dataclasses.replace(base, **{k: _coerce_field(fields[k], v) for k, v in data.items()})


def field_help(f: dataclasses.Field) -> str:
    """The help text of a config field (``metadata["help"]``) with its default."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    text = f.metadata.get("help", "")
    return f"{text} (default: {default!r})" if text else f"default: {default!r}"


def add_config_flags(parser: argparse.ArgumentParser, cls, *, with_config: bool = True, skip=(),
                     with_presets: bool = True) -> None:
    """``--config`` plus one ``--field-name`` flag per field of ``cls`` (parsed later by ``load_config``).

    ``with_presets=False``: the ``--config`` help names no preset (the presets are training configs).
    """
    if with_config:
        names = ", ".join(preset_names()) or "none"
        parser.add_argument("--config", default=None, metavar="YAML",
                            help=f"YAML file or preset ({names})" if with_presets
                            else f"YAML file of {cls.__name__} fields")
    group = parser.add_argument_group(f"{cls.__name__} fields (override the YAML)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _kind(f)
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        extra: dict = {"metavar": kind.__name__.upper() if kind in (int, float, str) else kind.__name__.upper() + "(YAML)"}
        if kind is bool:
            extra = {"nargs": "?", "const": "true", "metavar": "BOOL"}
        elif f.metadata.get("repeat"):
            extra = {"action": "append", "metavar": f.metadata.get("metavar", "VALUE")}
        group.add_argument(flag, dest="cfg_" + f.name, default=None, help=field_help(f), **extra)


def config_from_args(cls: type[T], args: argparse.Namespace, overrides: dict | None = None) -> T:
    """The config the parsed flags of :func:`add_config_flags` describe (flags override the YAML)."""
    flags = {f.name: getattr(args, "cfg_" + f.name) for f in dataclasses.fields(cls)
             if getattr(args, "cfg_" + f.name, None) is not None}
    return load_config(cls, getattr(args, "config", None), {**(overrides or {}), **flags})
