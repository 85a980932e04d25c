"""Command-line flags generated from a settings dataclass: one place for each default and its help.

A field becomes `--field-name` (or `metadata["flag"]`), typed from its annotation:
int / float / str take a value; bool is a switch (`--x`); `bool | None` gets `--x` / `--no-x` and
stays None when neither is given; `list[int]`, `list[float]` and `list[str]` take a comma-separated
value (`metadata["items"]` names what is expected and `metadata["example"]` shows one, for the
one-line error). The help is `metadata["help"]` followed by the default. Fields with
`metadata["cli"] = False` get no flag. `settings_from_args` builds the dataclass back from the
parsed namespace, so the parser and the code share the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from lorascope import LorascopeError


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _kind(cls, f: dataclasses.Field) -> tuple[str, Any]:
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    args = typing.get_args(t)
    optional = type(None) in args
    if optional:
        t = next(a for a in args if a is not type(None))
    if typing.get_origin(t) is list:
        return "list", typing.get_args(t)[0]
    if t is bool:
        return ("optbool" if optional else "bool"), bool
    return "scalar", t


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def add_settings_args(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of the dataclass `cls` (see the module docstring)."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False:
            continue
        kind, item = _kind(cls, f)
        default = _default(f)
        text = f.metadata.get("help", "")
        flag, dest = _flag(f), f.name
        if kind == "bool":
            parser.add_argument(flag, dest=dest, action="store_true", help=text)
        elif kind == "optbool":
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif kind == "list":
            parser.add_argument(flag, dest=dest, default=None, metavar="A,B,...",
                                help=f"{text} (comma-separated; default {_shown(default)})")
        else:
            shown = f" (default {_shown(default)})" if default is not None else ""
            parser.add_argument(flag, dest=dest, type=item, default=None, help=text + shown)


def settings_from_args(cls, ns: argparse.Namespace, **extra: Any):
    """The dataclass `cls` from parsed flags: a flag not given keeps the field's default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False or not hasattr(ns, f.name):
            continue
        given = getattr(ns, f.name)
        kind, item = _kind(cls, f)
        if kind == "bool" and not given:
            continue
        if given is None:
            continue
        if kind == "list":
            parts = [x.strip() for x in str(given).split(",") if x.strip()]
            try:
                given = [item(x) for x in parts]
            except ValueError:
                what = f.metadata.get("items", f"{item.__name__} values")
                example = f.metadata.get("example")
                raise LorascopeError(f"{_flag(f)} {given!r}: expected comma-separated {what}"
                                     + (f", e.g. {example}" if example else "")) from None
        values[f.name] = given
    return cls(**values, **extra)
