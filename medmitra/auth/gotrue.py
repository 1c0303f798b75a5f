"""Sign-in and session issuing of the local Supabase Auth (GoTrue) subset, without HTTP.

The /auth/v1 routes (api/supabase_auth.py) parse a request and call these: the password,
refresh-token and PKCE grants, the session object (access token with the claims Supabase
puts in it, refresh token, user) and the checks on client metadata. Refusals are
``AuthApiError``s in GoTrue's shape ``{code, error_code, msg}``, so auth-js maps them to its
error classes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from medmitra import textsafe
from medmitra.auth import pkce
from medmitra.auth import sessions as sessions_mod
from medmitra.auth import users
from medmitra.auth.jwt import Principal
from medmitra.auth.sessions import RefreshError, SessionChecker
from medmitra.auth.signing import KeyRing
from medmitra.config import Settings
from medmitra.db.auth_models import AuthSession, AuthUser
from medmitra.errors import ApiError

log = logging.getLogger(__name__)

# ``iss`` of the tokens this server issues when ``auth.issuer`` is not configured.
LOCAL_ISSUER = "medmitra-edge"


DEFAULT_AUDIENCE = "authenticated"




class AuthApiError(ApiError):
    """An error in GoTrue's shape: ``{"code": <http status>, "error_code": ..., "msg": ...}``."""

    def __init__(self, status: int, error_code: str, msg: str, *,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(msg, headers=headers)
        self.status = status
        self.error_code = error_code
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"code": self.status, "error_code": self.error_code, "msg": self.message,
                **self.extra}


def validation_error(msg: str) -> AuthApiError:
    return AuthApiError(400, "validation_failed", msg)


def invalid_credentials() -> AuthApiError:
    # The one answer for unknown email and wrong password alike.
    return AuthApiError(400, "invalid_credentials", "Invalid login credentials")


@dataclass
class AuthState:
    settings: Settings
    keyring: KeyRing
    sessions: SessionChecker
    issuer: str
    audience: str


def local_issuer(settings: Settings) -> str:
    return settings.auth.issuer or LOCAL_ISSUER


def str_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise validation_error(f"{name} must be a string")
    return value


def weak_password_error(exc: users.WeakPassword) -> AuthApiError:
    return AuthApiError(422, "weak_password", str(exc), extra={
        "weak_password": {"reasons": [exc.reason], "message": str(exc)}})


async def issue_session(state: AuthState, user: AuthUser, session: AuthSession,
                          refresh_token: str) -> dict[str, Any]:
    ttl_s = state.settings.auth.access_token_ttl_s
    now_s = int(time.time())
    claims = {
        "iss": state.issuer,
        "aud": state.audience,
        "exp": now_s + ttl_s,
        "iat": now_s,
        "sub": user.id,
        "email": user.email,
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"],
                         **(user.app_metadata or {})},
        "user_metadata": user.user_metadata or {},
        "role": user.role,
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": int(session.created_at.timestamp())}],
        "session_id": session.id,
        "is_anonymous": False,
    }
    return {
        "access_token": await state.keyring.sign(claims),
        "token_type": "bearer",
        "expires_in": ttl_s,
        "expires_at": now_s + ttl_s,
        "refresh_token": refresh_token,
        "user": users.user_json(user, state.audience),
    }


async def password_grant(state: AuthState, body: dict[str, Any]) -> dict[str, Any]:
    if body.get("phone"):
        raise validation_error("Phone sign-in is not supported on this server")
    email = str_field(body, "email")
    password = str_field(body, "password")
    if not email:
        raise validation_error("missing email or phone")
    if not password:
        raise validation_error("missing password")
    user = await users.authenticate(email, password)
    if user is None:
        raise invalid_credentials()
    if user.disabled_at is not None:
        # Only said to someone who knows the password, so it reveals nothing new.
        raise AuthApiError(400, "user_banned", "User is banned")
    user.last_sign_in_at = users.utcnow()
    await user.save(update_fields=["last_sign_in_at"])
    session, refresh_token = await sessions_mod.create_session(user)
    return await issue_session(state, user, session, refresh_token)


async def refresh_grant(state: AuthState, body: dict[str, Any]) -> dict[str, Any]:
    token = str_field(body, "refresh_token")
    if not token:
        raise validation_error("refresh_token required")
    try:
        session, user, fresh = await sessions_mod.exchange_refresh_token(
            token, reuse_window_s=state.settings.auth.refresh_reuse_window_s)
    except RefreshError as exc:
        if exc.code == "refresh_token_already_used":
            state.sessions.forget_all()
            log.warning("refresh token replayed outside the reuse window; session revoked")
        raise AuthApiError(400, exc.code, exc.message) from None
    return await issue_session(state, user, session, fresh)


async def pkce_grant(state: AuthState, body: dict[str, Any]) -> dict[str, Any]:
    """The code from the sign-in page (GET /authorize) and its verifier -> a session."""
    try:
        user = await pkce.exchange_code(body.get("auth_code"), body.get("code_verifier"))
    except pkce.FlowError as exc:
        raise AuthApiError(exc.status, exc.error_code, exc.msg) from None
    session, refresh_token = await sessions_mod.create_session(user)
    return await issue_session(state, user, session, refresh_token)


def check_metadata(metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise validation_error("data must be a JSON object")
    if not textsafe.is_storable(metadata):
        raise validation_error("data contains characters that are not valid text")
    if users.metadata_size(metadata) > users.MAX_USER_METADATA_BYTES:
        raise validation_error(f"data is larger than {users.MAX_USER_METADATA_BYTES} bytes "
                               "as JSON")


async def account_of(principal: Principal) -> AuthUser:
    """The live account a verified access token names (its ``sub``)."""
    user = await AuthUser.get_or_none(id=principal.user_id)
    if user is None:
        raise AuthApiError(403, "user_not_found", "User from sub claim in JWT does not exist")
    if user.disabled_at is not None:
        raise AuthApiError(403, "user_banned", "User is banned")
    return user
