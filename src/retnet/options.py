"""Type checks for run-options dataclasses. Values from a TOML/YAML file or from KEY=VALUE
overrides arrive untyped; a wrong type must be a one-line error naming the field, not a
TypeError deep inside a comparison."""

from __future__ import annotations

import dataclasses
from typing import Any

# Annotation names this checker understands; an int is a valid float, a bool is neither.
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,),
                                       "bool": (bool,), "None": (type(None),),
                                       "list": (list, tuple), "dict": (dict,)}
_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
          "None": "null", "list": "a list", "dict": "a table of KEY = VALUE"}


def short(value: Any, limit: int = 100) -> str:
    """repr(value), cut to about `limit` characters: errors never echo unbounded input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def _parts(annotation: Any) -> list[str]:
    """'int | None' -> ['int', 'None']; 'list[str]' -> ['list']."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__",
                                                                  str(annotation))
    return [part.strip().split("[")[0] for part in text.split("|")]


def _accepts(parts: list[str], value: Any) -> bool:
    for part in parts:
        kinds = _TYPES.get(part)
        if kinds is None:  # an annotation this checker does not know: the field checks itself
            return True
        if isinstance(value, bool) and part in ("int", "float"):
            continue
        if isinstance(value, kinds):
            return True
    return False


def check_types(cls: type, values: dict[str, Any], prefix: str = "") -> None:
    """Raise ValueError naming the first of `values` whose type does not fit cls's field.

    Keys that are not fields of cls are left to the caller (it names the valid ones)."""
    fields = {f.name: _parts(f.type) for f in dataclasses.fields(cls)}
    for name, value in values.items():
        parts = fields.get(name)
        if parts is not None and not _accepts(parts, value):
            wanted = " or ".join(_NAMES.get(p, p) for p in parts)
            raise ValueError(f"{prefix}{name} must be {wanted}; got {short(value)}")
