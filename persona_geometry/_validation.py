"""Parameter checks that raise one message shape everywhere.

Every check raises ``ValueError`` (or ``TypeError`` for a wrong type) with the message
``"The '<param>' parameter of <func> must be <allowed>. Got <value> instead."`` so that a user
reading a traceback, or the CLI's one-line error, knows which argument to fix and how. These
checks run on user input, so they never use ``assert`` (``python -O`` strips asserts).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn


def invalid(
    param: str, func: str, allowed: str, got: Any, *, exc: type[Exception] = ValueError
) -> NoReturn:
    """Raises ``exc`` with the project's one message shape for a bad parameter."""
    raise exc(f"The {param!r} parameter of {func} must be {allowed}. Got {got!r} instead.")


def check_int_in_range(value: Any, param: str, func: str, low: int, high: int) -> int:
    """Returns ``value`` as an int after checking ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, int | _np_integer()):
        invalid(param, func, f"an int in [{low}, {high}]", value, exc=TypeError)
    if not low <= int(value) <= high:
        invalid(param, func, f"an int in [{low}, {high}]", value)
    return int(value)


def check_positive_int(value: Any, param: str, func: str) -> int:
    """Returns ``value`` as an int after checking it is ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int | _np_integer()):
        invalid(param, func, "a positive int", value, exc=TypeError)
    if int(value) < 1:
        invalid(param, func, "a positive int", value)
    return int(value)


def check_probability(value: Any, param: str, func: str, *, open_low: bool = True) -> float:
    """Returns ``value`` as a float after checking it lies in (0, 1) (or [0, 1) if not open_low)."""
    interval = "(0, 1)" if open_low else "[0, 1)"
    try:
        x = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"The {param!r} parameter of {func} must be a float in {interval}. "
            f"Got {value!r} instead."
        ) from e
    ok = (0.0 < x < 1.0) if open_low else (0.0 <= x < 1.0)
    if not ok or math.isnan(x):
        invalid(param, func, f"a float in {'(0, 1)' if open_low else '[0, 1)'}", value)
    return x


def check_one_of(value: Any, param: str, func: str, options: Iterable[Any]) -> Any:
    """Returns ``value`` after checking it is one of ``options``."""
    options = list(options)
    if value not in options:
        invalid(param, func, f"one of {options}", value)
    return value


def check_layers(
    layers: int | Sequence[int] | None, n_layers: int, func: str, param: str = "layers"
) -> list[int]:
    """Returns the sorted unique layer indices, all layers when ``layers`` is None.

    Negative indices count from the end, as in Python (``-1`` is the last block).
    """
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int | _np_integer()) and not isinstance(layers, bool):
        layers = [int(layers)]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int | _np_integer()):
            invalid(param, func, f"ints in [{-n_layers}, {n_layers - 1}]", layer, exc=TypeError)
        if not -n_layers <= int(layer) < n_layers:
            invalid(param, func, f"ints in [{-n_layers}, {n_layers - 1}]", layer)
        out.append(int(layer) % n_layers)
    if not out:
        invalid(param, func, "a non-empty list of layer indices", list(layers))
    return sorted(set(out))


def check_unique_names(names: Sequence[str], param: str, func: str) -> list[str]:
    """Returns ``names`` as a list after checking they are non-empty strings without repeats."""
    names = list(names)
    if not names:
        invalid(param, func, "a non-empty sequence of names", names)
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name.strip():
            invalid(
                param,
                func,
                "non-empty strings",
                name,
                exc=TypeError if not isinstance(name, str) else ValueError,
            )
        if name in seen:
            invalid(param, func, "unique names", f"{name!r} twice")
        seen.add(name)
    return names


def _np_integer() -> type:
    import numpy as np

    return np.integer


def renamed(
    new_value: Any, old_value: Any, *, new: str, old: str, func: str, default: Any = None
) -> Any:
    """Returns the value of a renamed parameter, warning if the old name was used.

    ``default`` is the value meaning "not given"; giving both names is an error.
    """
    if old_value is default:
        return new_value
    if new_value is not default:
        invalid(
            old,
            func,
            f"left out (it was renamed {new!r}; give only {new!r})",
            old_value,
            exc=TypeError,
        )
    import warnings

    warnings.warn(
        f"The {old!r} parameter of {func} is renamed {new!r}; {old!r} will be removed.",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value
