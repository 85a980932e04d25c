"""The one parser of NAME=PATH arguments (`lorascope drift --tuned`, `lorascope serve-bench --adapter`, ...).

Names are letters, digits, '_' and '.': they become file names and, joined with '-', the
names of pairs ('base-full', 'full-lora'), so '-' is not allowed in a name.
"""

from __future__ import annotations

import re

from lorascope import LorascopeError

NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")


def parse_named_paths(values, flag: str, what: str, example: str,
                      reserved: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """['a=dir1', 'b=dir2'] (or a dict) -> [('a', 'dir1'), ('b', 'dir2')], checked, in order.

    flag: the option named in errors ('--tuned'); what: what PATH is ('CHECKPOINT'); example:
    a valid value for the error messages; reserved: names that may not be used."""
    items = list(values.items()) if isinstance(values, dict) else []
    if not isinstance(values, dict):
        for v in values or []:
            if "=" not in v:
                raise LorascopeError(f"{flag} {v!r}: expected NAME={what}, e.g. {flag} {example}")
            items.append(tuple(s.strip() for s in v.split("=", 1)))
    if not items:
        raise LorascopeError(f"{flag}: give at least one NAME={what}, e.g. {flag} {example}")
    out: list[tuple[str, str]] = []
    for name, path in items:
        if not NAME_RE.match(name) or name in reserved:
            not_reserved = f" and not {', '.join(repr(r) for r in reserved)}" if reserved else ""
            raise LorascopeError(f"{flag} {name}={path}: the name {name!r} must be letters, digits, '_' or '.'"
                                 f"{not_reserved}, e.g. {flag} {example}")
        if not path:
            raise LorascopeError(f"{flag} {name}=: the path is empty")
        if any(name == n for n, _ in out):
            raise LorascopeError(f"{flag} {name}={path}: the name {name!r} is given twice")
        out.append((name, str(path)))
    return out
