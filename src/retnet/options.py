"""Run options, declared one way: each command's options are a dataclass whose fields carry
their --help text (`opt`), turned into argparse arguments by `add_options`, and checked by
`check_types` (values from a TOML/YAML file or from KEY=VALUE overrides arrive untyped; a
wrong type must be a one-line error naming the field, not a TypeError deep inside a
comparison), then by `check_options` against each field's declared `Range` and choices."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Range:
    """The numbers a numeric option accepts: finite (argparse's float() takes "nan" and "inf"),
    from `low` to `high`, each end included unless marked open. Shared by every options
    dataclass (`opt(..., bounds=...)`) and by SamplingParams, so one rule gives one message."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def accepts(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        # An int is finite however long (math.isfinite would overflow converting 10**400).
        return (isinstance(value, int) or math.isfinite(value)) and above and below

    def check(self, name: str, value: float, integer: bool = False) -> None:
        """Raise a one-line ValueError naming `name` when value is out of range."""
        if not self.accepts(value):
            kind = "an integer" if integer else "a finite number"
            raise ValueError(f"{name} must be {kind} {self}; got {short(value)}")

    def __str__(self) -> str:  # "> 0", "≥ 1", "in [0, 1)"
        low, high = _number(self.low), _number(self.high)
        if self.high == math.inf:
            return f"{'>' if self.low_open else '≥'} {low}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '≤'} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: float) -> str:
    """An int in full (a seed's limit), a float short (1e-06, 0.5)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


POSITIVE = Range(0, low_open=True)  # a learning rate, a repetition penalty
NON_NEGATIVE = Range(0)  # a count that may be 0, a weight decay, a clip norm (0: off)
AT_LEAST_ONE = Range(1)  # steps, batch sizes, intervals
FRACTION = Range(0, 1)
# Seeds reach torch.manual_seed (at most 2**64 - 1) and numpy's SeedSequence (no negatives);
# generate adds the sample index, so a margin below torch's limit.
SEED = Range(0, 2**63 - 1)


def flag(name: str) -> str:
    """The command-line flag of a field: "eval_batches" -> "--eval-batches"."""
    return "--" + name.replace("_", "-")


def check_options(options: Any) -> None:
    """Check every field of an options dataclass instance: its type (`check_types`), then its
    declared choices and `Range`; raise one ValueError naming the first bad --flag.

    Choices are checked here as well as by argparse, because a TOML/YAML file or a Python
    caller does not pass through argparse. None is left alone (it means "unset")."""
    fields = dataclasses.fields(options)
    check_types(type(options), {f.name: getattr(options, f.name) for f in fields})
    for f in fields:
        value, choices, bounds = (getattr(options, f.name), f.metadata.get("choices"),
                                  f.metadata.get("bounds"))
        if value is None or isinstance(value, (list, tuple, dict)):
            continue
        if choices is not None and value not in choices:
            raise ValueError(f"invalid {flag(f.name)} {short(value)}; use one of "
                             f"{', '.join(map(str, choices))}")
        if bounds is not None:
            bounds.check(flag(f.name), value, integer="int" in _parts(f.type))


# ---- Declaring options: one dataclass per command, its fields' help becomes --help ----------

def opt(default: Any = dataclasses.MISSING, help: str = "", *,
        factory: Callable[[], Any] | None = None, choices: Sequence[Any] | None = None,
        metavar: str | tuple[str, ...] | None = None, positional: bool = False,
        aliases: Sequence[str] = (), nargs: int | None = None, const: Any = None,
        secret: bool = False, bounds: Range | None = None) -> Any:
    """A dataclass field of a command's options, with its --help text (as litgpt's option
    dataclasses do, but carried in the field's metadata, never parsed out of source):

        steps: int = opt(1000, "optimiser steps (the schedule's length)")

    factory: default_factory (lists, dicts); positional: an argument without a --flag;
    aliases: other flags for it (e.g. vLLM's names); nargs: a list flag of exactly that many
    values (`--hf CKPT OUT`) instead of a repeatable one; const: the value of the flag given
    without one (`--perplexity` alone); secret: left out of repr; bounds: the `Range` of a
    numeric option (checked by `check_options`)."""
    metadata = {"help": help, "choices": choices, "metavar": metavar, "nargs": nargs,
                "const": const, "bounds": bounds,
                "positional": positional, "aliases": tuple(aliases)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata, repr=not secret)
    return dataclasses.field(default=default, metadata=metadata, repr=not secret)


def _annotation(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _scalar(annotation: str) -> type:
    """int, float or str for 'int', 'float | None', 'list[int]', ... ('str' otherwise)."""
    inner = annotation.split("[", 1)[1].rstrip("]") if "[" in annotation else annotation
    first = inner.split("|")[0].strip()
    return {"int": int, "float": float}.get(first, str)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field of the options dataclass `cls`. Flags default to None, so that
    `given` can tell a flag given from a default left alone (the dataclass holds defaults)."""
    for f in dataclasses.fields(cls):
        meta, annotation, default = f.metadata, _annotation(f), _default(f)
        text = meta.get("help", "")
        kwargs: dict[str, Any] = {"help": text, "choices": meta.get("choices"),
                                  "metavar": meta.get("metavar")}
        if default is not dataclasses.MISSING and not isinstance(default, bool) and default not in (
                None, "", [], {}):
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            kwargs["help"] = f"{text} (default: {shown})"
        if meta.get("positional"):  # optional when it has a default
            many = annotation.startswith("list")  # SRC...: one or more
            parser.add_argument(f.name, type=_scalar(annotation), default=None,
                                nargs="+" if many else None if default is dataclasses.MISSING
                                else "?", **kwargs)
            continue
        names = [flag(f.name), *meta.get("aliases", ())]
        if annotation.startswith("bool"):
            kwargs.pop("metavar")
            kwargs.pop("choices")
            parser.add_argument(*names, dest=f.name, action="store_true", default=None, **kwargs)
        elif annotation.startswith("list") and meta.get("nargs"):  # exactly N values
            parser.add_argument(*names, dest=f.name, nargs=meta["nargs"], type=_scalar(annotation),
                                default=None, required=default is dataclasses.MISSING, **kwargs)
        elif annotation.startswith("list"):  # repeatable: --x 1 2 --x 3
            parser.add_argument(*names, dest=f.name, action="extend", nargs="+",
                                type=_scalar(annotation), default=None, **kwargs)
        elif annotation.startswith("dict"):  # KEY=VALUE pairs (--x a=1 b=2 --x c=3), JSON values
            kwargs["metavar"] = kwargs["metavar"] or "KEY=VALUE"
            parser.add_argument(*names, dest=f.name, action="extend", nargs="+", default=None,
                                **kwargs)
        elif meta.get("const") is not None:  # --flag [VALUE]
            parser.add_argument(*names, dest=f.name, type=_scalar(annotation), default=None,
                                nargs="?", const=meta["const"], **kwargs)
        else:
            parser.add_argument(*names, dest=f.name, type=_scalar(annotation), default=None,
                                required=default is dataclasses.MISSING, **kwargs)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` given on the command line, typed ("KEY=VALUE" lists become dicts)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        values[f.name] = parse_overrides(value) if _annotation(f).startswith("dict") else value
    return values


def parse_overrides(pairs: Sequence[str] | None) -> dict[str, Any]:
    """["d_model=128", "dropout=0.1"] -> {"d_model": 128, "dropout": 0.1} (JSON values)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {short(pair)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def require(extra: str, *modules: str) -> None:
    """Raise a one-line ValueError naming the pip extra when any of `modules` is not installed,
    before any work is done (a missing plotting library must not surface after training)."""
    import importlib.util

    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if absent:
        raise ValueError(f"this needs the [{extra}] extra ({', '.join(absent)} missing): "
                         f"pip install 'retnet-exact[{extra}]'")
