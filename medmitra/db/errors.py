"""Database errors the server answers in a particular way."""

from __future__ import annotations

# SQLite's SQLITE_FULL (13) and PostgreSQL's disk_full SQLSTATE.
_SQLITE_FULL = 13
_PG_DISK_FULL = "53100"
# How deep the cause chain is searched (the ORM wraps driver errors in its own).
_MAX_CHAIN = 10


def is_database_full(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it wraps) says the database could not grow because
    the disk is full. The ORM wraps driver errors, so the whole cause chain is searched."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < _MAX_CHAIN:
        if getattr(cur, "sqlite_errorcode", None) == _SQLITE_FULL or \
                getattr(cur, "sqlstate", None) == _PG_DISK_FULL:
            return True
        if "database or disk is full" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False
