"""Notebook parameters: read the defaults of a ``parameters`` cell, check values given for them.

A notebook's ``parameters`` cell holds only ``NAME = literal`` lines (a test enforces it), so
each default literal declares its parameter's type. A value given for a parameter (by the
runner's ``-p NAME=VALUE``, or papermill) must look like its default, checked before any cell
runs, so that a bad value is reported with the parameter's name rather than as a bare error
in some later cell:

- a ``bool`` stays a ``bool``; an ``int`` stays an ``int`` (never a ``bool``); a ``float``
  takes an ``int`` or a ``float``, finite;
- a number whose default is ``>= 0`` must be ``>= 0`` (every count, length, k, layer, seed
  and fraction of the notebooks; zero stays allowed, as it is a valid layer, head, seed or
  depth);
- a ``str`` stays a non-empty ``str`` (when its default is non-empty);
- a list (or tuple) stays a list, non-empty when its default is, and each item must look like
  one of the default's items (so ``None`` is accepted only where the default holds a ``None``);
- a dict stays a dict; one whose default keys are all strings is a record and takes only
  those keys; items are checked against the default's item of the same key (else the first);
- a default of ``None`` says nothing about its type: any value is accepted.

What a value means beyond its type (a model name that exists, a layer below the model's
depth) is checked by the library functions the notebook calls.
"""

from __future__ import annotations

import ast
import math
import numbers

__all__ = ["cell_defaults", "check_parameters"]


def cell_defaults(code: str) -> dict:
    """``{NAME: value}`` of the ``NAME = literal`` lines of a parameters cell's source."""
    found = {}
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue  # not a literal: declares no type to check against
    return found


def check_parameters(defaults: dict, given: dict) -> dict:
    """``given`` when every value looks like its default in ``defaults`` (see the module docstring).

    Raises ``ValueError`` for a name ``defaults`` lacks (listing the known ones) or a value out
    of range, ``TypeError`` for a value of the wrong type; both name the parameter.
    """
    if not isinstance(defaults, dict) or not isinstance(given, dict):
        raise TypeError(f"defaults and given must be dicts, got {type(defaults).__name__} and {type(given).__name__}")
    for name, value in given.items():
        if name not in defaults:
            raise ValueError(f"{name} is not a parameter of this notebook; its parameters cell declares: "
                             f"{', '.join(defaults) or 'nothing'}")
        _conform(value, defaults[name], name)
    return dict(given)


def _kind(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _fail(error, where: str, what: str, default, value):
    article = "an" if what[0] in "aeiouAEIOU" else "a"
    raise error(f"{where} must be {article} {what} (its default is {default!r}), got {value!r}")


def _conform(value, default, where: str) -> None:
    want, got = _kind(default), _kind(value)
    if want == "None":
        return
    numeric = want == "float" and got in ("int", "float")
    if got != want and not numeric:
        _fail(TypeError, where, want, default, value)
    if want in ("int", "float"):
        if want == "float" and not math.isfinite(value):
            _fail(ValueError, where, "finite number", default, value)
        if default >= 0 and value < 0:
            _fail(ValueError, where, f"{want} >= 0", default, value)
    elif want == "str" and default and not value:
        _fail(ValueError, where, "non-empty str", default, value)
    elif want == "list" and default:
        if not value:
            _fail(ValueError, where, "non-empty list", default, value)
        for i, item in enumerate(value):
            _conform(item, _exemplar(default, item, f"{where}[{i}]"), f"{where}[{i}]")
    elif want == "dict" and default:
        record = all(isinstance(k, str) for k in default)
        for key, item in value.items():
            if record and key not in default:
                raise ValueError(f"{where} takes the keys {', '.join(map(repr, default))}, got the key {key!r}")
            if not record:
                _conform(key, _exemplar(list(default), key, f"a key of {where}"), f"a key of {where}")
            _conform(item, default.get(key, next(iter(default.values()))), f"{where}[{key!r}]")


def _exemplar(defaults: list, value, where: str):
    """The item of ``defaults`` that ``value`` is checked against: one of its kind, the smallest number."""
    got = _kind(value)
    same = [d for d in defaults if _kind(d) == got or (got == "int" and _kind(d) == "float")]
    if not same:
        kinds = " or ".join(dict.fromkeys(_kind(d) for d in defaults))
        _fail(TypeError, where, kinds, defaults, value)
    return min(same) if got in ("int", "float") else same[0]
