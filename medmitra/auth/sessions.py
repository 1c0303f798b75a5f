"""Sessions and their single-use refresh tokens.

Rules (Supabase's refresh token rotation): exchanging a refresh token marks it used and
returns a new one. A used token presented again within ``reuse_window_s`` is still honoured
(two browser tabs refreshing at once, or a response lost on a flaky network); later, it is
treated as stolen and the whole session (every token of the chain) is revoked.

``SessionChecker`` is what the case API awaits for tokens carrying a ``session_id``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from tortoise.transactions import in_transaction

from medmitra.db.auth_models import AuthRefreshToken, AuthSession, AuthUser
from medmitra.errors import Unauthorized

REFRESH_TOKEN_BYTES = 32
# Positive answers are cached this long; every revocation in this process clears the cache,
# so only a revocation made by another process (the CLI) waits for it.
SESSION_CACHE_TTL_S = 2.0
MAX_CACHED_SESSIONS = 10_000

ACTIVE, REVOKED, BANNED = "active", "revoked", "banned"


class RefreshError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_refresh_token() -> str:
    return secrets.token_urlsafe(REFRESH_TOKEN_BYTES)


async def create_session(user: AuthUser) -> tuple[AuthSession, str]:
    """A new session with its first refresh token (plain text returned once, hash stored)."""
    now = _utcnow()
    token = new_refresh_token()
    async with in_transaction():
        session = await AuthSession.create(id=str(uuid.uuid4()), user=user, created_at=now)
        await AuthRefreshToken.create(token_hash=token_hash(token), session=session,
                                      created_at=now)
    return session, token


async def exchange_refresh_token(token: str, *, reuse_window_s: int
                                 ) -> tuple[AuthSession, AuthUser, str]:
    """Spend ``token``; returns (session, user, new refresh token) or raises RefreshError."""
    row = await AuthRefreshToken.get_or_none(token_hash=token_hash(token)) \
        .select_related("session", "session__user")
    if row is None or row.session.revoked_at is not None:
        raise RefreshError("refresh_token_not_found",
                           "Invalid Refresh Token: Refresh Token Not Found")
    session, user = row.session, row.session.user
    if user.disabled_at is not None:
        raise RefreshError("user_banned", "User is banned")
    now = _utcnow()
    if row.used_at is None:
        # Conditional update: of two concurrent exchanges exactly one flips used_at; the
        # other finds it used a moment ago, which the reuse window allows.
        await AuthRefreshToken.filter(id=row.id, used_at=None).update(used_at=now)
        await row.refresh_from_db(fields=["used_at"])
    if now - row.used_at > timedelta(seconds=reuse_window_s):
        await revoke_session(session.id, "refresh_token_reuse")
        raise RefreshError("refresh_token_already_used", "Invalid Refresh Token: Already Used")
    fresh = new_refresh_token()
    async with in_transaction():
        await AuthRefreshToken.create(token_hash=token_hash(fresh), session=session,
                                      parent_id=row.id, created_at=now)
        await AuthSession.filter(id=session.id).update(refreshed_at=now)
    return session, user, fresh


async def revoke_session(session_id: str, reason: str) -> int:
    return await AuthSession.filter(id=session_id, revoked_at=None).update(
        revoked_at=_utcnow(), revoke_reason=reason)


async def revoke_user_sessions(user_id: str, reason: str, *,
                               except_session_id: str | None = None) -> int:
    query = AuthSession.filter(user_id=user_id, revoked_at=None)
    if except_session_id is not None:
        query = query.exclude(id=except_session_id)
    return await query.update(revoked_at=_utcnow(), revoke_reason=reason)


class SessionChecker:
    """``app.ctx.session_check``: refuses access tokens whose session is revoked, whose user
    is disabled, or (for tokens this server issued) whose session it does not know.

    Tokens from a real Supabase project (HS256) carry session ids this server never saw;
    they are told apart by their issuer and left alone.
    """

    def __init__(self, local_issuer: str, *, cache_ttl_s: float = SESSION_CACHE_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.local_issuer = local_issuer
        self._ttl_s = cache_ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[str | None, float]] = {}

    def forget_all(self) -> None:
        self._cache.clear()

    async def state(self, session_id: str, *, use_cache: bool = True) -> str | None:
        """ACTIVE, REVOKED, BANNED, or None when no such session exists."""
        now = self._clock()
        hit = self._cache.get(session_id) if use_cache else None
        if hit is not None and now - hit[1] < self._ttl_s:
            return hit[0]
        rows = await AuthSession.filter(id=session_id).values("revoked_at", "user__disabled_at")
        if not rows:
            state = None
        elif rows[0]["revoked_at"] is not None:
            state = REVOKED
        elif rows[0]["user__disabled_at"] is not None:
            state = BANNED
        else:
            state = ACTIVE
        if len(self._cache) >= MAX_CACHED_SESSIONS:
            self._cache.clear()
        self._cache[session_id] = (state, now)
        return state

    def is_local(self, claims: dict[str, Any]) -> bool:
        return claims.get("iss") == self.local_issuer

    async def __call__(self, principal: Any) -> None:
        state = await self.state(principal.session_id)
        if state == ACTIVE:
            return
        if state is None and not self.is_local(principal.claims):
            return      # a Supabase project's token: its sessions live there
        raise Unauthorized("Session has ended; sign in again")
