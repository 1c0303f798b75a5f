"""Local subset of the Supabase Auth (GoTrue) REST API under ``/auth/v1``: the routes.
Sign-in and session issuing live in auth/gotrue.py; users, sessions and keys in auth/.

A supabase-js client pointed at this server signs in unchanged: password and refresh-token
grants, the user endpoints, logout scopes, settings, health and the JWKS its ``getClaims()``
fetches. Access tokens are ES256 (signing.py) with the claims Supabase puts in them; errors
use GoTrue's body ``{code, error_code, msg}`` so auth-js maps them to its error classes.

What is deliberately missing: email/phone flows (OTP, magic links, recovery, email change),
OAuth providers, MFA, anonymous sign-in and the admin API. An administrator creates users
with the CLI (``medmitra users add``); self sign-up is off unless ``auth.signup_enabled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import timedelta
from typing import Any

from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse, empty, json as json_response

from medmitra import __version__
from medmitra.auth import sessions as sessions_mod
from medmitra.auth import users
from medmitra.auth.gotrue import (DEFAULT_AUDIENCE, AuthApiError, AuthState, account_of,
                                  check_metadata, issue_session, local_issuer, password_grant,
                                  pkce_grant, refresh_grant, str_field, validation_error,
                                  weak_password_error)
from medmitra.auth.jwt import Principal
from medmitra.auth.ratelimit import SignInGuard, retry_after_header
from medmitra.auth.sessions import ACTIVE, BANNED, SessionChecker
from medmitra.auth.signing import KeyRing
from medmitra.config import Settings
from medmitra.db.auth_models import AuthSession, AuthUser
from medmitra.errors import Unauthorized

PREFIX = "/auth/v1"
LOGOUT_SCOPES = ("global", "local", "others")
# A password change without the current password is allowed this long after the session's
# sign-in (as Supabase's secure password change allows a recent sign-in).
RECENT_SIGN_IN_S = 5 * 60


def _state(request: Request) -> AuthState:
    return request.app.ctx.auth


def _json_body(request: Request) -> dict[str, Any]:
    raw = request.body or b""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise validation_error("Could not parse request body as JSON") from None
    if not isinstance(data, dict):
        raise validation_error("Request body must be a JSON object")
    return data


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
    if state.sessions.is_local(principal):
        # A token this server signed must name a live session (auth/sessions.py).
        session_state = await state.sessions.state(principal.session_id, use_cache=False) \
            if principal.session_id else None
        if session_state == BANNED:
            raise AuthApiError(403, "user_banned", "User is banned")
        if session_state != ACTIVE:
            raise AuthApiError(403, "session_not_found",
                               "Session from session_id claim in JWT does not exist")
    return principal, await account_of(principal)


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
                session = await password_grant(state, body)
            except AuthApiError as exc:
                if exc.error_code == "invalid_credentials":
                    guard.failed(address, account)
                raise
            if account is not None:
                guard.succeeded(address, account)
            return json_response(session)
        if grant == "refresh_token":
            return json_response(await refresh_grant(state, body))
        if grant == "pkce":
            return json_response(await pkce_grant(state, body))
        raise validation_error("unsupported_grant_type: use password, refresh_token or pkce")

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
            raise validation_error("Phone sign-up is not supported on this server")
        email = str_field(body, "email")
        password = str_field(body, "password")
        if not email or not password:
            raise validation_error("Signup requires a valid email and password")
        if not users.valid_email(users.normalize_email(email)):
            raise validation_error("Unable to validate email address: invalid format")
        metadata = body.get("data") or {}
        check_metadata(metadata)
        try:
            user = await users.create_user(email, password, user_metadata=metadata)
        except users.WeakPassword as exc:
            raise weak_password_error(exc) from None
        except users.UserExists:
            raise AuthApiError(422, "user_already_exists", "User already registered") from None
        user.last_sign_in_at = users.utcnow()
        await user.save(update_fields=["last_sign_in_at"])
        session, refresh_token = await sessions_mod.create_session(user)
        return json_response(await issue_session(state, user, session, refresh_token))

    @bp.get("/user")
    async def get_user(request: Request) -> HTTPResponse:
        _, user = await _require_user(request)
        return json_response(users.user_json(user, _state(request).audience))

    @bp.put("/user")
    async def update_user(request: Request) -> HTTPResponse:
        state = _state(request)
        principal, user = await _require_user(request)
        body = _json_body(request)
        email = str_field(body, "email")
        if email and users.normalize_email(email) != user.email:
            raise AuthApiError(422, "validation_failed",
                               "Changing the email address is not supported on this server; "
                               "ask an administrator")
        if body.get("phone"):
            raise validation_error("Phone numbers are not supported on this server")
        password = str_field(body, "password")
        metadata = None
        if "data" in body:
            check_metadata(body["data"] or {})
            metadata = {**(user.user_metadata or {}), **(body["data"] or {})}
            check_metadata(metadata)
        if password is not None:
            # Everything is validated before anything is saved: no half-applied update.
            try:
                users.check_password_rules(password)
            except users.WeakPassword as exc:
                raise weak_password_error(exc) from None
            await _check_reauthenticated(request, principal, user,
                                         str_field(body, "current_password"))
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
            raise validation_error(f"Unsupported logout scope {scope!r}")
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


async def _check_reauthenticated(request: Request, principal: Principal, user: AuthUser,
                                 current_password: str | None) -> None:
    """A password change needs the current password, or a sign-in (password or PKCE grant)
    of this session within the last ``RECENT_SIGN_IN_S``: a stolen access token alone must
    not be enough to take the account over. A wrong current password counts as a failed
    sign-in of this account (the sign-in guard)."""
    if current_password is not None:
        _check_guard(request, user.email)
        if not await users.password_matches(user, current_password):
            request.app.ctx.sign_in_guard.failed(client_address(request), user.email)
            raise AuthApiError(400, "current_password_mismatch",
                               "Current password required when setting new password")
        return
    if principal.session_id:
        signed_in = await AuthSession.filter(id=principal.session_id, user_id=user.id) \
            .values_list("created_at", flat=True)
        if signed_in and users.utcnow() - signed_in[0] <= timedelta(seconds=RECENT_SIGN_IN_S):
            return
    raise AuthApiError(400, "reauthentication_needed",
                       "Changing the password needs the current password (current_password) "
                       f"or a sign-in within the last {RECENT_SIGN_IN_S // 60} minutes")


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
        checker = SessionChecker(issuer, issuer_configured=bool(settings.auth.issuer),
                                 hs256_is_local=not settings.auth.jwt_secret,
                                 local_kids=lambda: keyring.known_kids)
        # Revoked and expired keys are dropped, CLI-made ones picked up, within seconds.
        app.ctx.key_watch = asyncio.get_running_loop().create_task(keyring.watch())
        app.ctx.auth = AuthState(settings=settings, keyring=keyring, sessions=checker,
                                 issuer=issuer,
                                 audience=settings.auth.audience or DEFAULT_AUDIENCE)
        app.ctx.session_check = checker
        await users.warm_up()

    @app.before_server_stop
    async def stop_key_watch(app: Sanic) -> None:
        task = getattr(app.ctx, "key_watch", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
