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


def positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """``value`` is an integer (not a bool) >= 1, or >= 0 with ``allow_zero``."""
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise fail(name, f"must be an integer >= {low}, got {value!r}")


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
