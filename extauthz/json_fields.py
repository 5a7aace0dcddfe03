"""Readers for the JSON values of REST bodies (the transcoder hands them over as a
`google.protobuf.Struct`): each takes (field name, value) and returns the value typed, or
raises InvalidArgument naming the field. Shared by the key and budget bodies."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from keys.errors import InvalidArgument

_MAX_NAMED = 10  # field names an error lists at most


def string(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string")
    return value


def strings(field: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f'{field} must be a list of strings, like ["gpt-4"]')
    return value


def number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{field} must be a number")
    return float(value)


def whole(field: str, value: object) -> int:
    """A Struct carries every number as a double: 3.0 is 3, 3.5 is an error."""
    got = number(field, value)
    if not math.isfinite(got) or not got.is_integer():
        raise InvalidArgument(f"{field} must be a whole number")
    return int(got)


def boolean(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{field} must be true or false")
    return value


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def quoted(names: list[str]) -> str:
    """Names the client sent, bounded, so an error never echoes unbounded input."""
    shown = ", ".join(json.dumps(n[:64]) for n in names[:_MAX_NAMED])
    more = len(names) - _MAX_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def by_name(
    body: Mapping[str, object],
    known: tuple[str, ...],
    takes: str,
    offered: tuple[str, ...] | None = None,
) -> dict[str, object]:
    """The body's values under their proto names; an unknown name is an error naming it
    (and listing `offered`, by default every known name), and so is a field sent under
    both of its names. lowerCamelCase names count, as in proto3 JSON."""
    aliases = {alias: n for n in known for alias in (n, camel(n))}
    unknown = sorted(k for k in body if k not in aliases)
    if unknown:
        listed = ", ".join(known if offered is None else offered)
        raise InvalidArgument(f"unknown fields: {quoted(unknown)}; {takes}: {listed}")
    fields: dict[str, object] = {}
    for alias, value in body.items():
        name = aliases[alias]
        if name in fields:
            raise InvalidArgument(f"{name} is sent twice")
        fields[name] = value
    return fields
