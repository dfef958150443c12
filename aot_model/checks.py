"""Argument checks shared by the modules: choices from a fixed set, and ints that are not bools.

``isinstance(True, int)`` holds in Python, so a plain ``isinstance(value, int)`` lets ``True``
through as a count of 1; these helpers refuse bools everywhere a count, size or seed is expected.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def check_choice(name: str, value, allowed: Iterable) -> None:
    """Raise ``ValueError("<name> must be one of <allowed>, got <value!r>")`` unless allowed."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def is_int(value, *, numpy: bool = False) -> bool:
    """True for an ``int`` (or a NumPy integer when ``numpy``), False for bools and the rest."""
    types = (int, np.integer) if numpy else int
    return isinstance(value, types) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int, *, numpy: bool = False, reason: str = "") -> int:
    """``value`` as a Python ``int`` if it is an integer ``>= minimum``, else a ValueError.

    Parameters
    ----------
    name : str
        The parameter's name, quoted in the error.
    value
        What the caller was given.
    minimum : int
        Smallest allowed value.
    numpy : bool
        Also accept NumPy integer scalars. Off where the value ends up in a checkpoint or JSON,
        which hold plain ints only.
    reason : str
        Why the bound holds, appended to the error in parentheses.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        ``"<name> must be an int >= <minimum> (<reason>), got <value!r>"``.
    """
    if not is_int(value, numpy=numpy) or value < minimum:
        why = f" ({reason})" if reason else ""
        raise ValueError(f"{name} must be an int >= {minimum}{why}, got {value!r}")
    return int(value)
