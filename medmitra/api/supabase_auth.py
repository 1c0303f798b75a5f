"""Local subset of the Supabase Auth (GoTrue) REST API under ``/auth/v1``.

A supabase-js client pointed at this server signs in unchanged: password and refresh-token
grants, the user endpoints, logout scopes, settings, health and the JWKS its ``getClaims()``
fetches. Access tokens are ES256 (signing.py) with the claims Supabase puts in them; errors
use GoTrue's body ``{code, error_code, msg}`` so auth-js maps them to its error classes.

What is deliberately missing: email/phone flows (OTP, magic links, recovery, email change),
OAuth providers, MFA, anonymous sign-in and the admin API. An administrator creates users
with the CLI (``medmitra users add``); self sign-up is off unless ``auth.signup_enabled``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse, empty, json as json_response

from medmitra import __version__
from medmitra.auth import pkce
from medmitra.auth import sessions as sessions_mod
from medmitra.auth import users
from medmitra.auth.jwt import Principal
from medmitra.auth.ratelimit import SignInGuard, retry_after_header
from medmitra.auth.sessions import BANNED, REVOKED, RefreshError, SessionChecker
from medmitra.auth.signing import KeyRing
from medmitra import textsafe
from medmitra.config import Settings
from medmitra.db.auth_models import AuthSession, AuthUser
from medmitra.errors import ApiError, Unauthorized

log = logging.getLogger(__name__)

PREFIX = "/auth/v1"
# ``iss`` of the tokens this server issues when ``auth.issuer`` is not configured.
LOCAL_ISSUER = "medmitra-edge"
DEFAULT_AUDIENCE = "authenticated"
# user_metadata is free-form client data; bounded so it cannot bloat every token.
MAX_USER_METADATA_BYTES = 8 * 1024
LOGOUT_SCOPES = ("global", "local", "others")


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


def _validation(msg: str) -> AuthApiError:
    return AuthApiError(400, "validation_failed", msg)


def _invalid_credentials() -> AuthApiError:
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


def _state(request: Request) -> AuthState:
    return request.app.ctx.auth


def _json_body(request: Request) -> dict[str, Any]:
    raw = request.body or b""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise _validation("Could not parse request body as JSON") from None
    if not isinstance(data, dict):
        raise _validation("Request body must be a JSON object")
    return data


def _str_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _validation(f"{name} must be a string")
    return value


def _weak_password(exc: users.WeakPassword) -> AuthApiError:
    return AuthApiError(422, "weak_password", str(exc), extra={
        "weak_password": {"reasons": ["length"], "message": str(exc)}})


async def _token_response(state: AuthState, user: AuthUser, session: AuthSession,
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


async def _password_grant(state: AuthState, body: dict[str, Any]) -> dict[str, Any]:
    if body.get("phone"):
        raise _validation("Phone sign-in is not supported on this server")
    email = _str_field(body, "email")
    password = _str_field(body, "password")
    if not email:
        raise _validation("missing email or phone")
    if not password:
        raise _validation("missing password")
    user = await users.authenticate(email, password)
    if user is None:
        raise _invalid_credentials()
    if user.disabled_at is not None:
        # Only said to someone who knows the password, so it reveals nothing new.
        raise AuthApiError(400, "user_banned", "User is banned")
    user.last_sign_in_at = users.utcnow()
    await user.save(update_fields=["last_sign_in_at"])
    session, refresh_token = await sessions_mod.create_session(user)
    return await _token_response(state, user, session, refresh_token)


async def _refresh_grant(state: AuthState, body: dict[str, Any]) -> dict[str, Any]:
    token = _str_field(body, "refresh_token")
    if not token:
        raise _validation("refresh_token required")
    try:
        session, user, fresh = await sessions_mod.exchange_refresh_token(
            token, reuse_window_s=state.settings.auth.refresh_reuse_window_s)
    except RefreshError as exc:
        if exc.code == "refresh_token_already_used":
            state.sessions.forget_all()
            log.warning("refresh token replayed outside the reuse window; session revoked")
        raise AuthApiError(400, exc.code, exc.message) from None
    return await _token_response(state, user, session, fresh)


async def _pkce_grant(state: AuthState, body: dict[str, Any]) -> dict[str, Any]:
    """The code from the sign-in page (GET /authorize) and its verifier -> a session."""
    try:
        user = await pkce.exchange_code(body.get("auth_code"), body.get("code_verifier"))
    except pkce.FlowError as exc:
        raise AuthApiError(exc.status, exc.error_code, exc.msg) from None
    session, refresh_token = await sessions_mod.create_session(user)
    return await _token_response(state, user, session, refresh_token)


def client_address(request: Request) -> str:
    # remote_addr honours configured proxy headers only; else the socket peer.
    return request.remote_addr or request.ip or "unknown"


def sign_in_account(email: Any) -> str | None:
    """The per-account rate-limit key of a typed email (whether or not the user exists)."""
    if not isinstance(email, str) or not email.strip():
        return None
    return users.normalize_email(email)[:users.MAX_EMAIL_CHARS]


def _check_guard(request: Request, account: str | None) -> None:
    """429 before any password is checked when this client has guessed too often."""
    wait_s = request.app.ctx.sign_in_guard.wait(client_address(request), account)
    if wait_s > 0:
        raise AuthApiError(429, "over_request_rate_limit",
                           "Too many failed sign-in attempts; try again later",
                           headers={"Retry-After": retry_after_header(wait_s)})


async def _require_user(request: Request) -> tuple[Principal, AuthUser]:
    """The caller of /user and /logout: a valid access token of a live session."""
    state = _state(request)
    header = request.headers.get("authorization") or ""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthApiError(401, "no_authorization",
                           "This endpoint requires a valid Bearer token",
                           headers={"WWW-Authenticate": "Bearer"})
    try:
        principal = request.app.ctx.verifier.verify(token.strip())
    except Unauthorized as exc:
        raise AuthApiError(403, "bad_jwt", f"invalid JWT: {exc.message}") from None
    if principal.session_id:
        session_state = await state.sessions.state(principal.session_id, use_cache=False)
        if session_state == BANNED:
            raise AuthApiError(403, "user_banned", "User is banned")
        if session_state == REVOKED or (session_state is None
                                        and state.sessions.is_local(principal.claims)):
            raise AuthApiError(403, "session_not_found",
                               "Session from session_id claim in JWT does not exist")
    user = await AuthUser.get_or_none(id=principal.user_id)
    if user is None:
        raise AuthApiError(403, "user_not_found", "User from sub claim in JWT does not exist")
    if user.disabled_at is not None:
        raise AuthApiError(403, "user_banned", "User is banned")
    return principal, user


def _make_blueprint() -> Blueprint:
    bp = Blueprint("supabase_auth", url_prefix=PREFIX)

    @bp.post("/token")
    async def token(request: Request) -> HTTPResponse:
        state = _state(request)
        grant = request.args.get("grant_type")
        body = _json_body(request)
        if grant == "password":
            # Only password guessing is rate limited (auth/ratelimit.py).
            guard, address = request.app.ctx.sign_in_guard, client_address(request)
            account = sign_in_account(body.get("email"))
            _check_guard(request, account)
            try:
                session = await _password_grant(state, body)
            except AuthApiError as exc:
                if exc.error_code == "invalid_credentials":
                    guard.failed(address, account)
                raise
            if account is not None:
                guard.succeeded(address, account)
            return json_response(session)
        if grant == "refresh_token":
            return json_response(await _refresh_grant(state, body))
        if grant == "pkce":
            return json_response(await _pkce_grant(state, body))
        raise _validation("unsupported_grant_type: use password, refresh_token or pkce")

    @bp.post("/signup")
    async def signup(request: Request) -> HTTPResponse:
        state = _state(request)
        if not state.settings.auth.signup_enabled:
            raise AuthApiError(422, "signup_disabled", "Signups not allowed for this instance")
        # Every sign-up attempt counts against the address (it can probe which emails exist).
        _check_guard(request, None)
        request.app.ctx.sign_in_guard.failed(client_address(request), None)
        body = _json_body(request)
        if body.get("phone"):
            raise _validation("Phone sign-up is not supported on this server")
        email = _str_field(body, "email")
        password = _str_field(body, "password")
        if not email or not password:
            raise _validation("Signup requires a valid email and password")
        if not users.valid_email(users.normalize_email(email)):
            raise _validation("Unable to validate email address: invalid format")
        metadata = body.get("data") or {}
        _check_metadata(metadata)
        try:
            user = await users.create_user(email, password, user_metadata=metadata)
        except users.WeakPassword as exc:
            raise _weak_password(exc) from None
        except users.UserExists:
            raise AuthApiError(422, "user_already_exists", "User already registered") from None
        user.last_sign_in_at = users.utcnow()
        await user.save(update_fields=["last_sign_in_at"])
        session, refresh_token = await sessions_mod.create_session(user)
        return json_response(await _token_response(state, user, session, refresh_token))

    @bp.get("/user")
    async def get_user(request: Request) -> HTTPResponse:
        _, user = await _require_user(request)
        return json_response(users.user_json(user, _state(request).audience))

    @bp.put("/user")
    async def update_user(request: Request) -> HTTPResponse:
        state = _state(request)
        principal, user = await _require_user(request)
        body = _json_body(request)
        email = _str_field(body, "email")
        if email and users.normalize_email(email) != user.email:
            raise AuthApiError(422, "validation_failed",
                               "Changing the email address is not supported on this server; "
                               "ask an administrator")
        if body.get("phone"):
            raise _validation("Phone numbers are not supported on this server")
        password = _str_field(body, "password")
        metadata = None
        if "data" in body:
            _check_metadata(body["data"] or {})
            metadata = {**(user.user_metadata or {}), **(body["data"] or {})}
            _check_metadata(metadata)
        if password is not None:
            # Everything is validated before anything is saved: no half-applied update.
            try:
                users.check_password_rules(password)
            except users.WeakPassword as exc:
                raise _weak_password(exc) from None
            if await users.password_matches(user, password):
                raise AuthApiError(422, "same_password",
                                   "New password should be different from the old password.")
        if metadata is not None:
            user.user_metadata = metadata
            user.updated_at = users.utcnow()
            await user.save(update_fields=["user_metadata", "updated_at"])
        if password is not None:
            await users.set_password(user, password)
            # A changed password ends every other sign-in (a thief's included).
            await sessions_mod.revoke_user_sessions(
                user.id, "password_change", except_session_id=principal.session_id)
            state.sessions.forget_all()
        return json_response(users.user_json(user, state.audience))

    @bp.post("/logout")
    async def logout(request: Request) -> HTTPResponse:
        state = _state(request)
        scope = request.args.get("scope", "global")
        if scope not in LOGOUT_SCOPES:
            raise _validation(f"Unsupported logout scope {scope!r}")
        principal, user = await _require_user(request)
        sid = principal.session_id
        if scope == "local":
            if sid:
                await sessions_mod.revoke_session(sid, "logout")
        elif scope == "global":
            await sessions_mod.revoke_user_sessions(user.id, "logout")
        else:
            await sessions_mod.revoke_user_sessions(user.id, "logout", except_session_id=sid)
        state.sessions.forget_all()
        return empty(status=204)

    @bp.get("/settings")
    async def settings_route(request: Request) -> HTTPResponse:
        signup = _state(request).settings.auth.signup_enabled
        external = {name: False for name in (
            "anonymous_users", "apple", "azure", "bitbucket", "discord", "facebook", "figma",
            "github", "gitlab", "google", "keycloak", "linkedin_oidc", "notion", "phone",
            "saml", "slack_oidc", "spotify", "twitch", "twitter", "workos", "zoom")}
        external["email"] = True
        return json_response({
            "external": external,
            "disable_signup": not signup,
            "mailer_autoconfirm": True,     # no mail server offline: accounts are confirmed
            "phone_autoconfirm": False,
            "sms_provider": "",
            "saml_enabled": False,
        })

    @bp.get("/health")
    async def health(request: Request) -> HTTPResponse:
        return json_response({"version": __version__, "name": "GoTrue",
                              "description": "MedMitra Edge local subset of the Supabase "
                                             "Auth API"})

    @bp.get("/.well-known/jwks.json")
    async def jwks(request: Request) -> HTTPResponse:
        body = await _state(request).keyring.jwks()
        return json_response(body, headers={"Cache-Control": "public, max-age=600"})

    return bp


def _check_metadata(metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise _validation("data must be a JSON object")
    if not textsafe.is_storable(metadata):
        raise _validation("data contains characters that are not valid text")
    if len(json.dumps(metadata)) > MAX_USER_METADATA_BYTES:
        raise _validation(f"data is larger than {MAX_USER_METADATA_BYTES} bytes")


def register_auth_api(app: Sanic) -> None:
    """Add the /auth/v1 routes and the start-up listener that opens the key ring (runs after
    app.py's ``open_resources``, which opened the database and built ``app.ctx.verifier``)."""
    settings: Settings = app.ctx.settings
    app.ctx.sign_in_guard = SignInGuard(
        address_per_min=settings.auth.rate_limit_per_min,
        account_address_per_hour=settings.auth.account_address_failures_per_hour,
        account_per_hour=settings.auth.account_failures_per_hour)
    app.blueprint(_make_blueprint())

    @app.before_server_start
    async def open_auth(app: Sanic) -> None:
        issuer = local_issuer(settings)
        keyring = KeyRing(settings.data_path, token_ttl_s=settings.auth.access_token_ttl_s,
                          leeway_s=settings.auth.leeway_s, verifier=app.ctx.verifier)
        await keyring.start()
        checker = SessionChecker(issuer)
        app.ctx.auth = AuthState(settings=settings, keyring=keyring, sessions=checker,
                                 issuer=issuer,
                                 audience=settings.auth.audience or DEFAULT_AUDIENCE)
        app.ctx.session_check = checker
        await users.warm_up()
