"""Sessions and their single-use refresh tokens.

Rules (Supabase's refresh token rotation): exchanging a refresh token marks it used and
returns a new one. A used token presented again within ``reuse_window_s`` is still honoured
(two browser tabs refreshing at once, or a response lost on a flaky network); later, it is
treated as stolen and the whole session (every token of the chain) is revoked.

``SessionChecker`` is what the case API awaits for every verified token.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Collection

from tortoise.transactions import in_transaction

from medmitra.db.auth_models import AuthApiToken, AuthRefreshToken, AuthSession, AuthUser
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
    """End every sign-in of the user and every ``token create`` token made for them."""
    query = AuthSession.filter(user_id=user_id, revoked_at=None)
    if except_session_id is not None:
        query = query.exclude(id=except_session_id)
    ended = await query.update(revoked_at=_utcnow(), revoke_reason=reason)
    tokens = AuthApiToken.filter(user_id=user_id, revoked_at=None)
    if except_session_id is not None:
        tokens = tokens.exclude(id=except_session_id)
    return ended + await tokens.update(revoked_at=_utcnow(), revoke_reason=reason)


class SessionChecker:
    """``app.ctx.session_check``: for every token this server signed, refuses it unless it
    names a live session (a sign-in, or a ``token create`` token row) of a user who is not
    disabled.

    "This server signed it" is decided by the key, not by a claim anyone can write: a kid of
    the server's own key ring, an HS256 token when the HS256 secret is the one this server
    generated (no Supabase project shares it), or -- when ``auth.issuer`` is not configured
    -- the server's default issuer name. Tokens of a real Supabase project (its HS256
    secret, its JWKS keys) carry session ids this server never saw: their sessions live
    there, so they are left alone even when ``auth.issuer`` names that project.
    """

    def __init__(self, local_issuer: str, *, issuer_configured: bool = False,
                 hs256_is_local: bool = False,
                 local_kids: Callable[[], Collection[str]] = frozenset,
                 cache_ttl_s: float = SESSION_CACHE_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.local_issuer = local_issuer
        self._issuer_configured = issuer_configured
        self._hs256_is_local = hs256_is_local
        self._local_kids = local_kids
        self._ttl_s = cache_ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[str | None, float]] = {}
        # One lookup per session at a time: when an entry expires under load, the requests
        # of that session await the same lookup (a busy client's 50 concurrent requests
        # otherwise ran 50 x 3 ORM queries every TTL; py-spy: 17% of GET case).
        self._inflight: dict[str, asyncio.Future] = {}
        self._generation = 0

    def forget_all(self) -> None:
        self._cache.clear()
        self._inflight.clear()    # lookups begun before a revocation are not joined
        self._generation += 1     # ... and their answers are not kept

    async def state(self, session_id: str, *, use_cache: bool = True) -> str | None:
        """ACTIVE, REVOKED, BANNED, or None when no such session (or token row) exists."""
        now = self._clock()
        if use_cache:
            hit = self._cache.get(session_id)
            if hit is not None and now - hit[1] < self._ttl_s:
                return hit[0]
            pending = self._inflight.get(session_id)
            if pending is not None:
                return await asyncio.shield(pending)
        generation = self._generation
        lookup = asyncio.ensure_future(_session_state(session_id))
        self._inflight[session_id] = lookup
        try:
            state = await asyncio.shield(lookup)
        finally:
            if self._inflight.get(session_id) is lookup:
                del self._inflight[session_id]
        if generation != self._generation:
            return state
        if len(self._cache) >= MAX_CACHED_SESSIONS:
            self._cache.clear()
        self._cache[session_id] = (state, now)
        return state

    def is_local(self, principal: Any) -> bool:
        """Did this server sign the token? (See the class notes.)"""
        kid = getattr(principal, "kid", None)
        if kid is not None:
            return kid in self._local_kids()
        if getattr(principal, "alg", None) == "HS256" and self._hs256_is_local:
            return True
        return not self._issuer_configured and principal.claims.get("iss") == self.local_issuer

    async def __call__(self, principal: Any) -> None:
        if not self.is_local(principal):
            return      # a Supabase project's token: its sessions live there
        if not principal.session_id:
            raise Unauthorized("Token has no session; issue a new one")
        if await self.state(principal.session_id) == ACTIVE:
            return
        raise Unauthorized("Session has ended; sign in again")


async def _session_state(session_id: str) -> str | None:
    rows = await AuthSession.filter(id=session_id).values("revoked_at", "user__disabled_at")
    if rows:
        if rows[0]["revoked_at"] is not None:
            return REVOKED
        return BANNED if rows[0]["user__disabled_at"] is not None else ACTIVE
    tokens = await AuthApiToken.filter(id=session_id).values("revoked_at", "user_id")
    if not tokens:
        return None
    if tokens[0]["revoked_at"] is not None:
        return REVOKED
    if await AuthUser.filter(id=tokens[0]["user_id"], disabled_at__isnull=False).exists():
        return BANNED
    return ACTIVE
