"""Field checks shared by the configs: each raises a :class:`~chainlora.errors.ConfigError` whose one line starts
with the field's name (``lora.r: must be an integer >= 1, got 0``)."""

from __future__ import annotations

import math
import typing
from typing import Any

from chainlora.errors import ConfigError


def fail(name: str, problem: str) -> ConfigError:
    """The error for field ``name``: ``name: problem``."""
    return ConfigError(f"{name}: {problem}")


INT64_MAX = 2**63 - 1  # every integer field must fit torch's and numpy's int64
SEED_MAX = 2**32 - 1  # numpy's (and so HF's set_seed's) seed range


def positive_int(name: str, value: Any, *, allow_zero: bool = False, high: int = INT64_MAX) -> None:
    """``value`` is an integer (not a bool) >= 1 (>= 0 with ``allow_zero``) and <= ``high``."""
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise fail(name, f"must be an integer >= {low}, got {_short(value)}")
    if value > high:
        raise fail(name, f"must be an integer <= {high}, got {_short(value)}")


def _short(value: Any) -> str:
    """``repr(value)``, cut to 40 characters (an integer may have thousands of digits)."""
    shown = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else f"{str(value)[:20]}..."
    return shown if len(shown) <= 40 else f"{shown[:37]}..."


def number(
    name: str, value: Any, *, low: float = 0.0, high: float = math.inf, open_low: bool = False
) -> None:
    """``value`` is a finite number (not a bool) in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not finite(value):
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."
        raise fail(name, f"must be a finite number, got {shown}")
    if value < low or (open_low and value == low) or value > high:
        bound = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise fail(name, f"must be {bound}, got {value!r}")


def finite(value: int | float) -> bool:
    """Finite as a float (an int beyond the float range is not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond the float range
        return False


def choice(name: str, value: Any, allowed: Any) -> None:
    """``value`` must be one of the strings of the ``Literal`` type ``allowed`` (the field's annotation)."""
    choices = typing.get_args(allowed)
    if value not in choices:
        raise fail(name, f"must be one of {', '.join(choices)}, got {value!r}")
