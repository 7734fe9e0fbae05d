"""Command lines into configs: ``--config FILE`` (YAML) and ``--field value`` / ``--group.field value`` overrides.

:func:`parse_config` builds any config dataclass from a command line with ``jsonargparse`` (``--help``
documents every field from its docstring), then lets the dataclass validate itself. Whatever goes wrong (bad
YAML, an unknown or mistyped field, an integer too large for a float) becomes one
:class:`~chainlora.errors.ConfigError` line naming the field, never a traceback or a usage dump.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from chainlora.errors import ConfigError

T = TypeVar("T")
Base = Callable[[dict[str, Any]], Mapping[str, Any] | None]


def parse_config(cls: type[T], argv: Sequence[str], *, prog: str, base: Base | None = None) -> T:
    """Parse ``--config FILE`` (YAML) and ``--field value`` / ``--group.field value`` overrides into dataclass
    ``cls`` (validated by its ``__post_init__``). ``--help`` documents every field from its docstring.

    ``base``, when given, is called with the values given on the command line and returns the values beneath
    them (e.g. the config of the run being resumed, or the ``sweep:`` block of a sweep YAML), or None; what the
    command line gives overrides it, field by field, nested fields included."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, exit_on_error=False)  # cls's docstring titles its group of options
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML config file; later arguments override it."
    )
    parser.add_class_arguments(cls, None, sub_configs=True)
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            mapping = read_yaml_mapping(argv[i + 1])  # one clear line for a missing or broken file
            coerced = _coerce_shorthands(cls, mapping)
            if coerced != mapping:  # e.g. `data: FILE`: hand jsonargparse the mapping form
                argv[i + 1] = json.dumps(coerced)
    try:
        namespace = parser.parse_args(_bare_flags_true(cls, _shorthands(cls, argv)), defaults=base is None)
    except OverflowError as err:  # an integer beyond the float range given to a float field
        pairs = itertools.pairwise(argv)
        option = next((a for a, v in pairs if a.startswith("--") and _overflows(v)), "--?")
        raise ConfigError(f"{option[2:]}: {_one_line(err)}") from None
    except Exception as err:  # jsonargparse's ArgumentError, or a YAML/type error while reading --config
        raise ConfigError(_one_line(err)) from None
    values = _strip_meta(namespace.as_dict())
    if base is not None:
        values = _merged(dict(base(values) or {}), values)
    return cls.from_dict(values) if hasattr(cls, "from_dict") else cls(**values)


def read_yaml_mapping(path: str | Path, *, name: str = "--config") -> dict[str, Any]:
    """The mapping a YAML config file holds (empty for an empty file); else one line starting with ``name`` and
    the file, saying what is wrong and where: missing, unreadable, not UTF-8, invalid YAML, or not a mapping."""
    import yaml

    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{name} {path}: cannot read it ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{name} {path}: not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save it as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{name} {path}: invalid YAML{where}: {problem}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{name} {path}: expected a mapping of fields, got a {type(data).__name__}")
    return data or {}


def _merged(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` on top, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _overflows(text: str) -> bool:
    """An integer literal too large for a float."""
    try:
        float(int(text))
    except (ValueError, OverflowError) as err:
        return isinstance(err, OverflowError)
    return False


def _bool_options(cls: type, prefix: str = "--") -> set[str]:
    """``--name`` of every bool field of dataclass ``cls``, nested dataclasses included (``--lora.rslora``)."""
    options = set()
    for name, hint in typing.get_type_hints(cls).items():
        if hint is bool:
            options.add(prefix + name)
        elif dataclasses.is_dataclass(hint):
            options |= _bool_options(hint, f"{prefix}{name}.")
    return options


def _shorthand_fields(cls: type) -> dict[str, str]:
    """Nested config fields whose class names a ``shorthand`` field: ``{"data": "path"}``."""
    return {
        name: hint.shorthand
        for name, hint in typing.get_type_hints(cls).items()
        if dataclasses.is_dataclass(hint) and isinstance(getattr(hint, "shorthand", None), str)
    }


def _coerce_shorthands(cls: type, mapping: dict[str, Any]) -> dict[str, Any]:
    """A YAML mapping with ``data: FILE`` written as ``data: {path: FILE}``."""
    short = _shorthand_fields(cls)
    return {k: {short[k]: v} if k in short and isinstance(v, str) else v for k, v in mapping.items()}


def _shorthands(cls: type, argv: Sequence[str]) -> list[str]:
    """``--data FILE`` means ``--data.path FILE`` for a nested config whose class names a ``shorthand`` field."""
    short = {f"--{name}": f"--{name}.{field}" for name, field in _shorthand_fields(cls).items()}
    out: list[str] = []
    for arg in argv:
        option, eq, value = arg.partition("=")
        if option in short:
            out.append(short[option] + eq + value)
        else:
            out.append(arg)
    return out


def _bare_flags_true(cls: type, argv: Sequence[str]) -> list[str]:
    """Let a bool field be given as a bare flag: ``--overwrite`` means ``--overwrite true``."""
    flags, out = _bool_options(cls), []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in flags and (following is None or following.startswith("--")):
            out.append("true")
    return out


def _strip_meta(data: dict[str, Any]) -> dict[str, Any]:
    """Drop jsonargparse's bookkeeping keys (``config``, ``__path__``) at every level."""
    return {
        k: _strip_meta(v) if isinstance(v, dict) else v
        for k, v in data.items()
        if k not in ("config", "__path__") and not k.startswith("__")
    }


def _type_name(text: str) -> str:
    """``<class 'float'>`` → ``float``, ``<class 'NoneType'>`` → ``null``, Literal[...] → its values."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text.strip()).replace("NoneType", "null")
    literal = re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", text)
    return f"one of {literal.group(1)}" if literal else text


def _one_line(err: BaseException) -> str:
    """jsonargparse's multi-line error as ``field: expected TYPE, got VALUE``."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', text)
    field, problem = (match.group(1), match.group(2)) if match else (None, text)
    problem = problem.split(' - Parser key "')[0]  # jsonargparse repeats nested errors
    union = re.search(r"Subtypes: \[(.*?)\] Errors: .* Given value: (.*)$", problem)
    single = re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", problem)
    if union:
        types = " or ".join(_type_name(t) for t in re.split(r", (?![^\[]*\])", union.group(1)))
        problem = f"expected {types}, got {union.group(2)}"
    elif single:
        problem = f"expected {_type_name(single.group(1))}, got {single.group(2)}"
    return f"{field}: {problem}" if field else problem
