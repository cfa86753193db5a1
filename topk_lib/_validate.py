"""Argument checks shared by every layer, so one wrong input gets one kind of error.

A value of the wrong type raises ``TypeError``, a value of the right type that is out of
range raises ``ValueError``; both messages name the argument, what it must be, and what
was given. ``bool`` is never accepted as an int (``True`` is an ``int`` in Python, but
``k=True`` is always a mistake).
"""

from __future__ import annotations

import numbers

__all__ = ["positive_int", "int_at_least", "optional_k", "index", "int_sequence", "fraction_sequence", "non_empty_text"]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_at_least(value, arg: str, minimum: int) -> int:
    """``value`` as an ``int`` when it is an integer ``>= minimum``."""
    if not _is_int(value):
        raise TypeError(f"{arg} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{arg} must be an int >= {minimum}, got {value!r}")
    return int(value)


def positive_int(value, arg: str) -> int:
    """``value`` as an ``int`` when it is an integer ``>= 1``."""
    if not _is_int(value):
        raise TypeError(f"{arg} must be a positive int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return int(value)


def optional_k(value, arg: str) -> int | None:
    """A top-k budget: a positive ``int``, or ``None`` for exact (dense) computation."""
    if value is None:
        return None
    if not _is_int(value):
        raise TypeError(f"{arg} must be a positive int or None (exact), got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{arg} must be a positive int or None (exact), got {value!r}")
    return int(value)


def index(value, arg: str, size: int, what: str) -> int:
    """An index into ``size`` things called ``what`` (e.g. ``"layers"``)."""
    if not _is_int(value):
        raise TypeError(f"{arg} must be an int in 0..{size - 1} ({size} {what}), got {value!r} ({type(value).__name__})")
    if not 0 <= value < size:
        raise ValueError(f"{arg} must be an int in 0..{size - 1} ({size} {what}), got {value!r}")
    return int(value)


def int_sequence(values, arg: str, *, minimum: int = 1, example: str = "(1, 4, 16, 64)") -> tuple[int, ...]:
    """A non-empty list or tuple of ints ``>= minimum``, in the order given."""
    what = f"{arg} must be a non-empty list/tuple of ints >= {minimum}, e.g. {example}; got {values!r}"
    if not isinstance(values, (list, tuple)) or any(not _is_int(v) for v in values):
        raise TypeError(what)
    if not values or any(v < minimum for v in values):
        raise ValueError(what)
    return tuple(int(v) for v in values)


def fraction_sequence(values, arg: str, *, example: str = "(0.9, 0.99)") -> tuple[float, ...]:
    """A non-empty list or tuple of fractions in ``(0, 1]``, in the order given."""
    what = f"{arg} must be a non-empty list/tuple of floats in (0, 1], e.g. {example}; got {values!r}"
    if not isinstance(values, (list, tuple)) or any(
        isinstance(f, bool) or not isinstance(f, numbers.Real) for f in values
    ):
        raise TypeError(what)
    if not values or any(not 0 < f <= 1 for f in values):
        raise ValueError(what)
    return tuple(float(f) for f in values)


def non_empty_text(value, arg: str) -> str:
    """``value`` when it is a string with something besides whitespace."""
    if not isinstance(value, str):
        raise TypeError(f"{arg} must be a non-empty string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{arg} must be a non-empty string")
    return value
