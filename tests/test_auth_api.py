"""The local Supabase Auth subset under /auth/v1 (issue 5): every endpoint's success shape
and errors, refresh-token reuse rules, rate limit, signup switch, disabled users, no user
enumeration, key rotation, session revocation seen by the case API, and the CLI."""

from __future__ import annotations

import io
import os
import stat
import statistics
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt

from medmitra.auth import users
from medmitra.auth.jwt import issue_token
from medmitra.auth.signing import KEYS_DIR_NAME
from medmitra.cli import main
from medmitra.db.auth_models import AuthSigningKey
from tests.conftest import TEST_SECRET, make_settings

EMAIL = "doctor@clinic.test"
PASSWORD = "correct horse battery"
TOKEN_KEYS = {"access_token", "token_type", "expires_in", "expires_at", "refresh_token", "user"}
REQUIRED_CLAIMS = {"iss", "aud", "exp", "iat", "sub", "role", "aal", "session_id", "email",
                   "phone", "is_anonymous", "app_metadata", "user_metadata"}
# supabase-js sends these on every call.
JS_HEADERS = {"apikey": "local-anon-key", "x-client-info": "supabase-js-node/2.109.0",
              "x-supabase-api-version": "2024-01-01"}


# --- helpers ------------------------------------------------------------------------------

def start(start_app: Any, tmp_path: Path, **auth: Any) -> Any:
    auth.setdefault("rate_limit_per_min", 100000)   # only the rate-limit test hits the limit
    return start_app(make_settings(tmp_path, auth=auth))


def add_user(server: Any, email: str = EMAIL, password: str = PASSWORD) -> Any:
    return server.run(users.create_user(email, password))


def sign_in(client: httpx.Client, email: str = EMAIL, password: str = PASSWORD) -> httpx.Response:
    return client.post("/auth/v1/token", params={"grant_type": "password"},
                       json={"email": email, "password": password}, headers=JS_HEADERS)


def tokens(client: httpx.Client, email: str = EMAIL, password: str = PASSWORD) -> dict:
    r = sign_in(client, email, password)
    assert r.status_code == 200, r.text
    return r.json()


def refresh(client: httpx.Client, refresh_token: str) -> httpx.Response:
    return client.post("/auth/v1/token", params={"grant_type": "refresh_token"},
                       json={"refresh_token": refresh_token}, headers=JS_HEADERS)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **JS_HEADERS}


def cases_status(client: httpx.Client, token: str) -> int:
    return client.get("/cases/all_cases", headers={"Authorization": f"Bearer {token}"}).status_code


def assert_auth_error(r: httpx.Response, status: int, error_code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == status and body["error_code"] == error_code, body
    assert isinstance(body["msg"], str) and body["msg"]
    return body


def decode(client: httpx.Client, token: str) -> tuple[dict, dict]:
    """Verify ``token`` against the published JWKS only; returns (header, claims)."""
    jwks = client.get("/auth/v1/.well-known/jwks.json").json()
    header = pyjwt.get_unverified_header(token)
    key = pyjwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    return header, pyjwt.decode(token, key.key, algorithms=["ES256"], audience="authenticated")


# --- sign-in and token shape --------------------------------------------------------------

def test_password_grant_returns_supabase_session_with_es256_token(start_app, tmp_path):
    server = start(start_app, tmp_path)
    user = add_user(server)
    with server.client() as c:
        before_s = int(time.time())
        body = tokens(c, email="  Doctor@CLINIC.test ", password=PASSWORD)
        assert set(body) == TOKEN_KEYS
        assert body["token_type"] == "bearer"
        assert body["expires_in"] == 3600
        assert before_s + 3600 <= body["expires_at"] <= int(time.time()) + 3600
        u = body["user"]
        assert u["id"] == user.id and u["email"] == EMAIL and u["aud"] == "authenticated"
        assert u["role"] == "authenticated" and u["phone"] == "" and u["is_anonymous"] is False
        assert u["app_metadata"]["provider"] == "email" and u["last_sign_in_at"]
        header, claims = decode(c, body["access_token"])
        assert header["alg"] == "ES256"
        assert REQUIRED_CLAIMS <= set(claims)
        assert claims["sub"] == user.id and claims["email"] == EMAIL
        assert claims["exp"] - claims["iat"] == 3600 and claims["aal"] == "aal1"
        # The case API accepts the token this server signed.
        assert cases_status(c, body["access_token"]) == 200


def test_wrong_password_and_unknown_email_get_identical_answers_in_similar_time(
        start_app, tmp_path):
    server = start(start_app, tmp_path)
    add_user(server)
    with server.client() as c:
        wrong = sign_in(c, password="not the password")
        unknown = sign_in(c, email="nobody@clinic.test")
        assert_auth_error(wrong, 400, "invalid_credentials")
        assert (wrong.status_code, wrong.content) == (unknown.status_code, unknown.content)
        # Unknown emails hash a dummy password: without it they would answer ~100x faster.
        wrong_s, unknown_s = [], []
        for _ in range(5):
            for email, password, out in ((EMAIL, "not the password", wrong_s),
                                         ("nobody@clinic.test", PASSWORD, unknown_s)):
                t0 = time.perf_counter()
                sign_in(c, email, password)
                out.append(time.perf_counter() - t0)
        ratio = statistics.median(unknown_s) / statistics.median(wrong_s)
        assert 1 / 3 < ratio < 3, (wrong_s, unknown_s)


def test_token_endpoint_validation_errors(start_app, tmp_path):
    server = start(start_app, tmp_path)
    with server.client() as c:
        assert_auth_error(c.post("/auth/v1/token?grant_type=password", json={"email": EMAIL}),
                          400, "validation_failed")
        assert_auth_error(c.post("/auth/v1/token?grant_type=password", content=b"{not json",
                                 headers={"content-type": "application/json"}),
                          400, "validation_failed")
        assert_auth_error(c.post("/auth/v1/token?grant_type=password", json=["a"]),
                          400, "validation_failed")
        assert_auth_error(c.post("/auth/v1/token?grant_type=password",
                                 json={"email": 5, "password": PASSWORD}),
                          400, "validation_failed")
        assert_auth_error(c.post("/auth/v1/token?grant_type=magic", json={}),
                          400, "validation_failed")
        assert_auth_error(refresh(c, "no-such-token"), 400, "refresh_token_not_found")
        assert_auth_error(c.post("/auth/v1/token?grant_type=refresh_token", json={}),
                          400, "validation_failed")


# --- refresh-token rotation ---------------------------------------------------------------

def test_refresh_rotates_and_allows_reuse_within_window(start_app, tmp_path):
    server = start(start_app, tmp_path, refresh_reuse_window_s=60)
    add_user(server)
    with server.client() as c:
        first = tokens(c)
        second = refresh(c, first["refresh_token"])
        assert second.status_code == 200 and set(second.json()) == TOKEN_KEYS
        second = second.json()
        assert second["refresh_token"] != first["refresh_token"]
        _, claims1 = decode(c, first["access_token"])
        _, claims2 = decode(c, second["access_token"])
        assert claims1["session_id"] == claims2["session_id"]
        # Replayed within the window (a lost response, two tabs): honoured.
        again = refresh(c, first["refresh_token"])
        assert again.status_code == 200, again.text
        # The session is intact: every token of it still works.
        assert refresh(c, second["refresh_token"]).status_code == 200
        assert cases_status(c, first["access_token"]) == 200


def test_refresh_replay_outside_window_revokes_the_whole_session(start_app, tmp_path):
    server = start(start_app, tmp_path, refresh_reuse_window_s=0)
    add_user(server)
    with server.client() as c:
        first = tokens(c)
        other = tokens(c)                       # another sign-in of the same user
        second = refresh(c, first["refresh_token"]).json()
        assert cases_status(c, second["access_token"]) == 200
        assert_auth_error(refresh(c, first["refresh_token"]), 400, "refresh_token_already_used")
        # Every token of that chain is dead, access tokens included ...
        assert_auth_error(refresh(c, second["refresh_token"]), 400, "refresh_token_not_found")
        assert cases_status(c, second["access_token"]) == 401
        assert cases_status(c, first["access_token"]) == 401
        # ... but only that session's chain.
        assert cases_status(c, other["access_token"]) == 200
        assert refresh(c, other["refresh_token"]).status_code == 200


# --- user endpoints -----------------------------------------------------------------------

def test_get_user_and_its_errors(start_app, tmp_path):
    server = start(start_app, tmp_path)
    user = add_user(server)
    with server.client() as c:
        body = tokens(c)
        r = c.get("/auth/v1/user", headers=bearer(body["access_token"]))
        assert r.status_code == 200 and r.json()["id"] == user.id
        assert r.json()["email"] == EMAIL and r.json()["created_at"]
        r = c.get("/auth/v1/user", headers=JS_HEADERS)
        assert_auth_error(r, 401, "no_authorization")
        assert_auth_error(c.get("/auth/v1/user", headers=bearer("a.b.c")), 403, "bad_jwt")
        # A valid HS256 token for a user this server does not know.
        stranger = issue_token(TEST_SECRET, user_id=str(uuid.uuid4()))
        assert_auth_error(c.get("/auth/v1/user", headers=bearer(stranger)),
                          403, "user_not_found")


def test_password_change_revokes_other_sessions(start_app, tmp_path):
    server = start(start_app, tmp_path)
    add_user(server)
    new_password = "a brand new passphrase"
    with server.client() as c:
        mine, other = tokens(c), tokens(c)
        put = lambda body: c.put("/auth/v1/user", json=body,   # noqa: E731
                                 headers=bearer(mine["access_token"]))
        assert_auth_error(put({"password": "short"}), 422, "weak_password")
        assert_auth_error(put({"password": PASSWORD}), 422, "same_password")
        assert_auth_error(put({"email": "new@clinic.test"}), 422, "validation_failed")
        r = put({"password": new_password, "data": {"full_name": "Dr Rao"}})
        assert r.status_code == 200, r.text
        assert r.json()["user_metadata"] == {"full_name": "Dr Rao"}
        # The other session is over; this one goes on.
        assert cases_status(c, other["access_token"]) == 401
        assert_auth_error(refresh(c, other["refresh_token"]), 400, "refresh_token_not_found")
        assert cases_status(c, mine["access_token"]) == 200
        assert refresh(c, mine["refresh_token"]).status_code == 200
        assert_auth_error(sign_in(c), 400, "invalid_credentials")
        assert tokens(c, password=new_password)["user"]["user_metadata"] == {
            "full_name": "Dr Rao"}


def test_logout_scopes(start_app, tmp_path):
    server = start(start_app, tmp_path)
    add_user(server)
    with server.client() as c:
        a, b, d = tokens(c), tokens(c), tokens(c)
        logout = lambda tok, scope: c.post(f"/auth/v1/logout?scope={scope}",  # noqa: E731
                                           headers=bearer(tok["access_token"]))
        assert_auth_error(logout(a, "everyone"), 400, "validation_failed")
        assert logout(a, "others").status_code == 204
        assert [cases_status(c, t["access_token"]) for t in (a, b, d)] == [200, 401, 401]
        e = tokens(c)
        assert logout(e, "local").status_code == 204
        assert [cases_status(c, t["access_token"]) for t in (a, e)] == [200, 401]
        assert_auth_error(refresh(c, e["refresh_token"]), 400, "refresh_token_not_found")
        # A revoked session's token cannot log out again or read the user.
        assert_auth_error(logout(e, "local"), 403, "session_not_found")
        assert logout(a, "global").status_code == 204
        assert cases_status(c, a["access_token"]) == 401
        r = c.post("/auth/v1/logout", headers=JS_HEADERS)
        assert_auth_error(r, 401, "no_authorization")


def test_disabled_user_cannot_sign_in_and_loses_sessions(start_app, tmp_path):
    server = start(start_app, tmp_path)
    user = add_user(server)
    with server.client() as c:
        held = tokens(c)
        assert cases_status(c, held["access_token"]) == 200
        server.run(users.set_disabled(user, True))
        # A disable from another process (the CLI) is seen once the short cache lapses;
        # drop it here rather than wait.
        server.app.ctx.session_check.forget_all()
        assert cases_status(c, held["access_token"]) == 401
        assert_auth_error(c.get("/auth/v1/user", headers=bearer(held["access_token"])),
                          403, "user_banned")
        assert_auth_error(refresh(c, held["refresh_token"]), 400, "user_banned")
        assert_auth_error(sign_in(c), 400, "user_banned")
        # Without the password nothing is revealed about the account.
        assert_auth_error(sign_in(c, password="guess"), 400, "invalid_credentials")


# --- signup, settings, health, CORS, rate limit -------------------------------------------

def test_signup_disabled_by_default(start_app, tmp_path):
    server = start(start_app, tmp_path)
    with server.client() as c:
        r = c.post("/auth/v1/signup", json={"email": EMAIL, "password": PASSWORD})
        assert_auth_error(r, 422, "signup_disabled")
        assert_auth_error(sign_in(c), 400, "invalid_credentials")   # nobody was created
        assert c.get("/auth/v1/settings").json()["disable_signup"] is True


def test_signup_when_enabled(start_app, tmp_path):
    server = start(start_app, tmp_path, signup_enabled=True)
    with server.client() as c:
        settings = c.get("/auth/v1/settings").json()
        assert settings["disable_signup"] is False and settings["external"]["email"] is True
        r = c.post("/auth/v1/signup", json={"email": EMAIL, "password": PASSWORD,
                                            "data": {"full_name": "Dr Rao"}})
        assert r.status_code == 200 and set(r.json()) == TOKEN_KEYS
        assert r.json()["user"]["user_metadata"] == {"full_name": "Dr Rao"}
        assert cases_status(c, r.json()["access_token"]) == 200
        r = c.post("/auth/v1/signup", json={"email": EMAIL.upper(), "password": PASSWORD})
        assert_auth_error(r, 422, "user_already_exists")
        r = c.post("/auth/v1/signup", json={"email": "b@clinic.test", "password": "short"})
        body = assert_auth_error(r, 422, "weak_password")
        assert body["weak_password"]["reasons"] == ["length"]
        r = c.post("/auth/v1/signup", json={"email": "not-an-email", "password": PASSWORD})
        assert_auth_error(r, 400, "validation_failed")


def test_health_and_cors_preflight_for_supabase_js(start_app, tmp_path):
    server = start(start_app, tmp_path)
    with server.client() as c:
        r = c.get("/auth/v1/health")
        assert r.status_code == 200 and r.json()["name"] == "GoTrue"
        r = c.options("/auth/v1/token?grant_type=password", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": ", ".join(JS_HEADERS) + ", authorization, "
                                                                      "content-type"})
        assert r.status_code == 204
        allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
        assert {"apikey", "authorization", "x-client-info", "content-type",
                "x-supabase-api-version"} <= allowed
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "PUT" in r.headers["access-control-allow-methods"]
        # The actual request from a browser carries Origin, and its answer (here an
        # error: no such user) allows it, so the page can read the error.
        r = c.post("/auth/v1/token", params={"grant_type": "password"},
                   json={"email": EMAIL, "password": PASSWORD},
                   headers={**JS_HEADERS, "Origin": "http://localhost:3000"})
        assert r.status_code == 400
        assert r.headers["access-control-allow-origin"] == "*"
        # A request without Origin (curl, node) gets no CORS headers: none are needed.
        assert "access-control-allow-origin" not in sign_in(c).headers


def test_rate_limit_answers_429_in_supabase_shape(start_app, tmp_path):
    # Only failed sign-ins count (tests/test_auth_ratelimit.py has the rules).
    server = start(start_app, tmp_path, rate_limit_per_min=3)
    add_user(server)
    with server.client() as c:
        assert [sign_in(c, password=f"guess{i}").status_code for i in range(3)] == [400] * 3
        r = sign_in(c)
        assert_auth_error(r, 429, "over_request_rate_limit")
        assert int(r.headers["retry-after"]) >= 1
        # Monitoring, key discovery and settings stay reachable.
        assert c.get("/auth/v1/health").status_code == 200
        assert c.get("/auth/v1/.well-known/jwks.json").status_code == 200
        assert c.get("/auth/v1/settings").status_code == 200


# --- sessions seen by the case API --------------------------------------------------------

def test_case_api_session_rules_for_local_and_foreign_tokens(start_app, tmp_path):
    server = start(start_app, tmp_path)
    user = add_user(server)
    with server.client() as c:
        # A real Supabase project's HS256 token: its session is not ours, so it is accepted.
        foreign = issue_token(TEST_SECRET, user_id=user.id, issuer="https://x.supabase.co/auth/v1",
                              session_id=str(uuid.uuid4()))
        assert cases_status(c, foreign) == 200
        # A token claiming to be ours with a session we never created is refused.
        forged = issue_token(TEST_SECRET, user_id=user.id, issuer="medmitra-edge",
                             session_id=str(uuid.uuid4()))
        assert cases_status(c, forged) == 401
        # A CLI token (no session) still works.
        assert cases_status(c, issue_token(TEST_SECRET, user_id=user.id)) == 200


# --- signing keys -------------------------------------------------------------------------

def test_key_file_and_rotation_keep_old_tokens_valid(start_app, tmp_path):
    server = start(start_app, tmp_path)
    add_user(server)
    keys_dir = server.settings.data_path / KEYS_DIR_NAME
    with server.client() as c:
        old = tokens(c)
        old_kid = pyjwt.get_unverified_header(old["access_token"])["kid"]
        pem = keys_dir / f"{old_kid}.pem"
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
        assert b"PRIVATE KEY" in pem.read_bytes()
        jwks = c.get("/auth/v1/.well-known/jwks.json").json()["keys"]
        assert [k["kid"] for k in jwks] == [old_kid]
        assert {"d"} & set(jwks[0]) == set()                  # never the private part

        new_kid, retired = server.run(server.app.ctx.auth.keyring.rotate())
        assert retired == [old_kid] and new_kid != old_kid
        assert not pem.exists()                               # a retired key never signs
        new = tokens(c)
        assert pyjwt.get_unverified_header(new["access_token"])["kid"] == new_kid
        kids = {k["kid"] for k in c.get("/auth/v1/.well-known/jwks.json").json()["keys"]}
        assert kids == {old_kid, new_kid}
        # Tokens signed before the rotation keep working until they expire.
        assert cases_status(c, old["access_token"]) == 200
        assert c.get("/auth/v1/user", headers=bearer(old["access_token"])).status_code == 200
        assert cases_status(c, new["access_token"]) == 200
        decode(c, old["access_token"])
        decode(c, new["access_token"])
        # Once its tokens have expired the old key is no longer published.
        past = datetime.now(timezone.utc) - timedelta(seconds=1)

        async def expire_old_key() -> None:
            await AuthSigningKey.filter(kid=old_kid).update(verify_until=past)

        server.run(expire_old_key())
        kids = [k["kid"] for k in c.get("/auth/v1/.well-known/jwks.json").json()["keys"]]
        assert kids == [new_kid]


# --- CLI ----------------------------------------------------------------------------------

def cli(tmp_path: Path, *args: str) -> int:
    config = tmp_path / "empty.toml"
    config.write_text("", encoding="utf-8")
    # The leaf subcommand takes the options (argparse: sub-parser defaults win).
    return main([*args, "--config", str(config), "--data-dir", str(tmp_path / "data")])


def test_cli_users_and_keys(start_app, tmp_path, capsys, monkeypatch):
    assert cli(tmp_path, "users", "add", "--email", "Doctor@Clinic.test",
               "--password", PASSWORD) == 0
    assert "doctor@clinic.test" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin passphrase\n"))
    assert cli(tmp_path, "users", "add", "--email", "nurse@clinic.test") == 0
    assert cli(tmp_path, "users", "add", "--email", "DOCTOR@clinic.test",
               "--password", PASSWORD) == 1                          # case-insensitive
    assert cli(tmp_path, "users", "add", "--email", "x@clinic.test", "--password", "short") == 1
    capsys.readouterr()
    assert cli(tmp_path, "users", "disable", "--email", "nurse@CLINIC.test") == 0
    assert cli(tmp_path, "users", "disable", "--email", "ghost@clinic.test") == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("reset via stdin ok\n"))
    assert cli(tmp_path, "users", "reset-password", "--email", "doctor@clinic.test",
               "--password", "-") == 0
    capsys.readouterr()
    assert cli(tmp_path, "users", "list") == 0
    listing = capsys.readouterr().out
    assert "2 user(s)" in listing
    assert [line.split()[1] for line in listing.splitlines() if "@" in line] == [
        "active", "disabled"]
    assert cli(tmp_path, "keys", "rotate") == 0     # first key
    assert cli(tmp_path, "keys", "rotate") == 0     # a rotation
    capsys.readouterr()
    assert cli(tmp_path, "keys", "list") == 0
    listing = capsys.readouterr().out
    assert "2 key(s)" in listing and listing.count("signing") == 1
    assert listing.count("retired, verifies until") == 1
    pems = list((tmp_path / "data" / KEYS_DIR_NAME).glob("*.pem"))
    assert len(pems) == 1 and stat.S_IMODE(pems[0].stat().st_mode) == 0o600
    if os.name == "posix":
        assert stat.S_IMODE(pems[0].parent.stat().st_mode) & 0o077 == 0

    # The server uses what the CLI wrote.
    server = start_app(make_settings(tmp_path, auth={"rate_limit_per_min": 100000}))
    with server.client() as c:
        assert_auth_error(sign_in(c, "doctor@clinic.test", PASSWORD), 400,
                          "invalid_credentials")
        body = tokens(c, "Doctor@clinic.test", "reset via stdin ok")
        assert pyjwt.get_unverified_header(body["access_token"])["kid"] == pems[0].stem
        assert len(c.get("/auth/v1/.well-known/jwks.json").json()["keys"]) == 2
        assert_auth_error(sign_in(c, "nurse@clinic.test", "from stdin passphrase"), 400,
                          "user_banned")
