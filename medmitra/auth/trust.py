"""Trust mode (``auth.trust_user_id``): the original frontend's way of naming the user by a
``user_id`` field or a bare UUID as the Bearer value, for a trusted LAN only.

It is narrowed so that it gives up as little as possible: only the canonical UUID spelling
is accepted (one spelling per user, as token subjects), never the all-zero UUID, and it
cannot be combined with ``server.cors_origins = "*"``, which would let any web page open
in a clinic browser act as any user.
"""

from __future__ import annotations

import re
import uuid

from medmitra.config import ConfigError, Settings

# 8-4-4-4-12 hex digits and nothing else (no braces, no urn:uuid:, no missing hyphens).
_CANONICAL = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
NIL_UUID = str(uuid.UUID(int=0))


def trusted_user_id(value: str | None) -> str | None:
    """The user id a trust-mode request names, or None when it names none acceptably."""
    if not value or not _CANONICAL.match(value):
        return None
    uid = value.lower()
    return None if uid == NIL_UUID else uid


def check_settings(settings: Settings) -> None:
    """Refuse to start with trust mode and a CORS wildcard together."""
    if not settings.auth.trust_user_id:
        return
    origins = [o.strip() for o in settings.server.cors_origins.split(",")]
    if "*" in origins:
        raise ConfigError(
            'auth.trust_user_id = true cannot be combined with server.cors_origins = "*": '
            "any web page opened in a clinic browser could act as any user. List the "
            "frontend's origins in server.cors_origins (or set it empty).")
