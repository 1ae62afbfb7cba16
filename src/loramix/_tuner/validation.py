"""Small checks shared by the configs: each raises an error that names the field."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable


def check_int(field: str, value: object, minimum: int) -> None:
    """``value`` must be an ``int`` (not a bool) and at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{field}` must be an integer >= {minimum}, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`{field}` must be an integer >= {minimum}, got {value}.")


def check_number(field: str, value: object, minimum: float, maximum: float | None = None, *, open_max=False) -> None:
    """``value`` must be a real number in ``[minimum, maximum]`` (``maximum`` excluded if ``open_max``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{field}` must be a number, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise ValueError(f"`{field}` must be a finite number, got {value}.")
    upper_ok = maximum is None or (value < maximum if open_max else value <= maximum)
    if not (value >= minimum and upper_ok):  # also rejects NaN
        upper = "" if maximum is None else (f", < {maximum}" if open_max else f", <= {maximum}")
        raise ValueError(f"`{field}` must be >= {minimum}{upper}, got {value}.")


def check_choice(field: str, value: object, choices: Iterable[object]) -> None:
    """``value`` must be one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{field}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def check_layers_to_transform(layers_to_transform: object, layers_pattern: object) -> None:
    """PEFT's rule: an int or a list of non-negative ints; ``layers_pattern`` needs it."""
    if layers_pattern and layers_to_transform is None:
        raise ValueError("`layers_pattern` is only used together with `layers_to_transform`; set both or neither.")
    if layers_to_transform is None:
        return
    items = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    if not isinstance(items, (list, tuple)) or not items:
        raise TypeError(
            f"`layers_to_transform` must be an int or a non-empty list of ints, got {layers_to_transform!r}."
        )
    for item in items:
        check_int("layers_to_transform", item, 0)
