"""Text a database can store: no NUL characters (PostgreSQL text and JSON refuse them) and
no lone surrogates (not encodable as UTF-8). Client input that breaks this is refused;
machine output (model answers) is scrubbed."""

from __future__ import annotations

from typing import Any

_MAX_DEPTH = 64


def _str_ok(s: str) -> bool:
    if "\x00" in s:
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_storable(value: Any, _depth: int = 0) -> bool:
    """True if every string in ``value`` (a JSON-like structure, keys included) can be stored."""
    if _depth > _MAX_DEPTH:
        return False
    if isinstance(value, str):
        return _str_ok(value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _str_ok(k) and is_storable(v, _depth + 1)
                   for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_storable(v, _depth + 1) for v in value)
    return True


def scrub(value: Any) -> Any:
    """A copy of ``value`` with NULs removed and lone surrogates replaced by "?"."""
    if isinstance(value, str):
        if _str_ok(value):
            return value
        return value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value
