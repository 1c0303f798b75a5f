"""Log formats: today's text lines, or one JSON object per line (``log.format = "json"``)
carrying the request id that the server also returns in ``X-Request-Id``."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from contextvars import ContextVar
from datetime import datetime, timezone

# Set for the duration of a request (ops/server.py); None outside requests.
REQUEST_ID: ContextVar[str | None] = ContextVar("medmitra_request_id", default=None)
# A client's X-Request-Id is kept when it is short and plain; anything else is replaced.
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


# A server-made id: this process's random prefix and a counter, 32 hex digits like
# uuid4().hex (unique without a random draw, a system call, per request).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def request_id_from(header: str | None) -> str:
    if header and _CLIENT_ID_RE.fullmatch(header):
        return header
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = REQUEST_ID.get()
        if rid is not None:
            obj["request_id"] = rid
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


def use_json() -> None:
    """Give every handler already configured (root, Sanic's own) the JSON formatter."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values()
        if isinstance(lg, logging.Logger)]
    fmt = JsonFormatter()
    for lg in loggers:
        for h in lg.handlers:
            h.setFormatter(fmt)
