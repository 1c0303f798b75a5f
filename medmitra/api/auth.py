"""Who is calling: the Bearer token (or, on a trusted LAN, a user_id field)."""

from __future__ import annotations

from typing import Any

from medmitra.auth.trust import trusted_user_id
from medmitra.errors import Unauthorized


def _uuid_or_none(value: str | None) -> str | None:
    # Trust mode accepts only the canonical spelling and never the all-zero UUID.
    return trusted_user_id(value.strip() if value else None)


async def current_user(request: Any, *, claimed_user_id: str | None = None) -> str:
    """The caller's user id. Raises Unauthorized (401 + WWW-Authenticate: Bearer)."""
    ctx = request.app.ctx
    header = request.headers.get("authorization")
    token = None
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Malformed Authorization header; expected 'Bearer <token>'")
        token = value.strip()
    trust = ctx.settings.auth.trust_user_id
    if token is not None:
        if trust and "." not in token:
            # The original frontend sends the bare user UUID as the Bearer value.
            uid = _uuid_or_none(token)
            if uid:
                request.ctx.auth_user = (uid, "trusted-lan", None)   # for the audit trail
                return uid
        principal = ctx.verifier.verify(token)
        if ctx.session_check is not None:
            # Tokens this server signed must name a live session (auth/sessions.py).
            await ctx.session_check(principal)
        request.ctx.auth_user = (principal.user_id, "session" if principal.session_id
                                 else "token", principal.session_id)
        return principal.user_id
    if trust:
        uid = _uuid_or_none(claimed_user_id or request.args.get("user_id"))
        if uid:
            request.ctx.auth_user = (uid, "trusted-lan", None)
            return uid
    raise Unauthorized("Missing bearer token")
