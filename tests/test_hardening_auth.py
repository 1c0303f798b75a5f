"""Issue 11, tokens and accounts: every token the server signs is revocable (CLI tokens,
sessions, keys), a local token without a session is refused, a Supabase project's own
tokens are not checked against local sessions, password change needs re-authentication,
user metadata is bounded, common passwords are refused.

The CLI runs as a real subprocess against the running server's data dir: in-process it
would share (and close) the server's database connections."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest

from medmitra.auth import users
from medmitra.auth.jwt import issue_token
from medmitra.db.auth_models import AuthSession
from tests.conftest import ROOT, TEST_SECRET, make_settings
from tests.test_auth_api import (JS_HEADERS, PASSWORD, add_user, assert_auth_error, bearer,
                                 cases_status, tokens)

pytestmark = [pytest.mark.e2e]

# The server re-reads sessions after SESSION_CACHE_TTL_S and keys every KEY_SYNC_S.
REFUSED_WITHIN_S = 8.0


def start(start_server: Any, tmp_path: Path, **auth: Any) -> Any:
    auth.setdefault("rate_limit_per_min", 100000)
    return start_server(make_settings(tmp_path, auth=auth))


def cli(server: Any, *args: str) -> subprocess.CompletedProcess:
    config = server.settings.data_path.parent / "empty.toml"
    config.write_text("", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMITRA_")}
    return subprocess.run(
        [sys.executable, "-m", "medmitra", *args, "--config", str(config),
         "--data-dir", str(server.settings.data_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        input="")


def token_create(server: Any, user_id: str, *extra: str) -> str:
    out = cli(server, "token", "create", "--user-id", user_id, *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def eventually_status(c: Any, token: str, status: int) -> float:
    """Seconds until the case API answers ``status`` for ``token`` (fails after a while)."""
    t0 = time.monotonic()
    while True:
        if cases_status(c, token) == status:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < REFUSED_WITHIN_S, f"still not {status}"
        time.sleep(0.2)


# -- 1. token create tokens are revocable -----------------------------------------------------

def test_cli_token_belongs_to_a_session_that_disable_and_revoke_end(start_server, tmp_path):
    # Before: `token create` printed an HS256 token without session_id, valid for up to a
    # year whatever happened to the account.
    server = start(start_server, tmp_path)
    user = add_user(server)
    token = token_create(server, user.id, "--label", "lab import script")
    claims = pyjwt.decode(token, options={"verify_signature": False})
    assert claims["session_id"] and claims["sub"] == user.id
    assert pyjwt.get_unverified_header(token)["alg"] == "ES256"
    with server.client() as c:
        assert cases_status(c, token) == 200
        assert c.get("/auth/v1/user", headers=bearer(token)).status_code == 200
        assert cli(server, "users", "disable", "--email", user.email).returncode == 0
        eventually_status(c, token, 401)
        assert c.get("/auth/v1/user", headers=bearer(token)).status_code == 403
        # Enabling the account again does not bring its revoked tokens back.
        assert cli(server, "users", "enable", "--email", user.email).returncode == 0
        time.sleep(2.5)
        assert cases_status(c, token) == 401

        second = token_create(server, user.id)
        assert cases_status(c, second) == 200
        out = cli(server, "users", "reset-password", "--email", user.email,
                  "--password", "a fresh clinic passphrase")
        assert out.returncode == 0, out.stderr
        eventually_status(c, second, 401)

        third = token_create(server, user.id)
        fourth = token_create(server, user.id)
        tid = pyjwt.decode(third, options={"verify_signature": False})["session_id"]
        listing = cli(server, "tokens", "list", "--user-id", user.id).stdout
        assert tid in listing and "active" in listing and "lab import script" in listing
        assert cli(server, "tokens", "revoke", "--id", tid).returncode == 0
        eventually_status(c, third, 401)
        assert cases_status(c, fourth) == 200           # only that one
        assert cli(server, "tokens", "revoke", "--id", tid).returncode == 1
        assert cli(server, "tokens", "revoke", "--user-id", user.id).returncode == 0
        eventually_status(c, fourth, 401)


def test_cli_token_for_a_user_without_local_account_is_revocable(start_server, tmp_path):
    server = start(start_server, tmp_path)
    uid = str(uuid.uuid4())          # e.g. a user of the clinic's Supabase project
    token = token_create(server, uid)
    with server.client() as c:
        assert cases_status(c, token) == 200
        assert cli(server, "tokens", "revoke", "--user-id", uid).returncode == 0
        eventually_status(c, token, 401)


def test_token_create_refuses_a_lifetime_over_a_year(start_server, tmp_path):
    server = start(start_server, tmp_path)
    out = cli(server, "token", "create", "--user-id", str(uuid.uuid4()),
              "--expires-in", str(367 * 86400))
    assert out.returncode == 2 and "expires-in" in out.stderr


# -- 2. a token of this server without session_id is refused ---------------------------------

def test_local_token_without_session_is_refused(start_server, tmp_path):
    # Before: leaving session_id out skipped the session check, even for an unknown sub.
    server = start(start_server, tmp_path)
    user = add_user(server)
    keyring = server.app.ctx.auth.keyring
    with server.client() as c:
        signed = tokens(c)["access_token"]
        claims = pyjwt.decode(signed, options={"verify_signature": False})
        assert cases_status(c, signed) == 200
        for sub in (user.id, str(uuid.uuid4())):
            no_session = {k: v for k, v in claims.items() if k != "session_id"}
            no_session["sub"] = sub
            token = server.run(keyring.sign(no_session))
            assert cases_status(c, token) == 401
            r = c.get("/cases/all_cases", headers={"Authorization": f"Bearer {token}"})
            assert "session" in r.json()["detail"]
            assert_auth_error(c.get("/auth/v1/user", headers=bearer(token)), 403,
                              "session_not_found")
        # Claiming the server's default issuer with its HS256 secret but no session: refused.
        claimed = issue_token(TEST_SECRET, user_id=user.id, issuer="medmitra-edge")
        assert cases_status(c, claimed) == 401


def test_hs256_tokens_of_the_generated_secret_need_a_session(start_server, tmp_path):
    # With no Supabase secret configured, the HS256 secret is one this server generated:
    # nobody else signs with it, so its tokens are local ones and need a session too.
    server = start(start_server, tmp_path, jwt_secret="")
    secret = (server.settings.data_path / "jwt_secret").read_text().strip()
    uid = str(uuid.uuid4())
    with server.client() as c:
        assert cases_status(c, issue_token(secret, user_id=uid)) == 401
        assert cases_status(c, token_create(server, uid)) == 200


# -- 3. a compromised key can be dropped without a restart -----------------------------------

def test_keys_revoke_refuses_every_token_of_that_key_within_seconds(start_server, tmp_path):
    server = start(start_server, tmp_path)
    add_user(server)
    with server.client() as c:
        held = tokens(c)
        kid = pyjwt.get_unverified_header(held["access_token"])["kid"]
        cli_token = token_create(server, str(uuid.uuid4()))
        assert pyjwt.get_unverified_header(cli_token)["kid"] == kid
        assert cases_status(c, held["access_token"]) == 200
        assert cases_status(c, cli_token) == 200
        out = cli(server, "keys", "revoke", kid)
        assert out.returncode == 0, out.stderr
        took = eventually_status(c, held["access_token"], 401)
        assert took < REFUSED_WITHIN_S
        assert cases_status(c, cli_token) == 401
        assert c.get("/auth/v1/user", headers=bearer(held["access_token"])).status_code == 403
        jwks = c.get("/auth/v1/.well-known/jwks.json").json()["keys"]
        assert kid not in {k["kid"] for k in jwks} and len(jwks) == 1
        # The server signs with the new key at once; its tokens work.
        fresh = tokens(c)["access_token"]
        assert pyjwt.get_unverified_header(fresh)["kid"] == jwks[0]["kid"]
        assert cases_status(c, fresh) == 200
        listing = cli(server, "keys", "list").stdout
        assert "REVOKED" in listing
        assert cli(server, "keys", "revoke", "no-such-kid").returncode == 1


def test_retired_key_is_dropped_after_verify_until_without_restart(start_server, tmp_path):
    # Before: a retired key stayed trusted by the running server until a restart.
    from datetime import datetime, timezone

    from medmitra.db.auth_models import AuthSigningKey

    server = start(start_server, tmp_path)
    add_user(server)
    with server.client() as c:
        old = tokens(c)["access_token"]
        old_kid = pyjwt.get_unverified_header(old)["kid"]
        assert cli(server, "keys", "rotate").returncode == 0
        time.sleep(2.5)
        assert cases_status(c, old) == 200          # routine rotation keeps it valid

        async def expire() -> None:
            await AuthSigningKey.filter(kid=old_kid).update(
                verify_until=datetime.now(timezone.utc) - timedelta(seconds=1))

        server.run(expire())
        eventually_status(c, old, 401)
        # A key the CLI made is picked up without a restart: tokens it signs work.
        assert cases_status(c, token_create(server, str(uuid.uuid4()))) == 200


# -- 4. changing a password needs the current one or a recent sign-in ----------------------

def _age_session(server: Any, token: str, minutes: int) -> None:
    sid = pyjwt.decode(token, options={"verify_signature": False})["session_id"]

    async def go() -> None:
        row = await AuthSession.get(id=sid)
        await AuthSession.filter(id=sid).update(
            created_at=row.created_at - timedelta(minutes=minutes))

    server.run(go())


def test_password_change_needs_current_password_or_recent_sign_in(start_server, tmp_path):
    # Before: a stolen access token alone changed the password.
    server = start(start_server, tmp_path)
    add_user(server)
    new_password = "another clinic passphrase"
    with server.client() as c:
        held = tokens(c)
        _age_session(server, held["access_token"], 30)
        put = lambda body: c.put("/auth/v1/user", json=body,   # noqa: E731
                                 headers=bearer(held["access_token"]))
        assert_auth_error(put({"password": new_password}), 400, "reauthentication_needed")
        assert_auth_error(put({"password": new_password, "current_password": "wrong guess 1"}),
                          400, "current_password_mismatch")
        assert_auth_error(put({"password": new_password, "data": {"x": 1},
                               "current_password": "wrong guess 1"}),
                          400, "current_password_mismatch")
        assert c.get("/auth/v1/user", headers=bearer(held["access_token"])).json()[
            "user_metadata"] == {}                     # nothing half-applied
        tokens(c)                                      # the old password still works
        r = put({"password": new_password, "current_password": PASSWORD})
        assert r.status_code == 200, r.text
        assert tokens(c, password=new_password)
        # A fresh sign-in may change it without repeating the password (Supabase's rule).
        recent = tokens(c, password=new_password)
        r = c.put("/auth/v1/user", json={"password": "yet another passphrase"},
                  headers=bearer(recent["access_token"]))
        assert r.status_code == 200, r.text


def test_cli_token_cannot_change_a_password_without_the_current_one(start_server, tmp_path):
    server = start(start_server, tmp_path)
    user = add_user(server)
    token = token_create(server, user.id)
    with server.client() as c:
        r = c.put("/auth/v1/user", json={"password": "attacker passphrase"},
                  headers=bearer(token))
        assert_auth_error(r, 400, "reauthentication_needed")


# -- 5. user metadata is bounded; an admin can clear it --------------------------------------

def test_user_metadata_is_bounded_so_tokens_always_fit(start_server, tmp_path):
    # Before: 8 KB of data was accepted and every later token was too large for the
    # server's own header limit: the user was locked out for good.
    server = start(start_server, tmp_path)
    add_user(server)
    with server.client() as c:
        held = tokens(c)
        put = lambda data: c.put("/auth/v1/user", json={"data": data},  # noqa: E731
                                 headers=bearer(held["access_token"]))
        assert_auth_error(put({"bio": "x" * 5000}), 400, "validation_failed")
        # Non-ASCII text is counted as it is written into the token (\\uXXXX).
        assert_auth_error(put({"bio": "\u0905" * 700}), 400, "validation_failed")
        limit = users.MAX_USER_METADATA_BYTES
        biggest = {"bio": "\u0905" * ((limit - 12) // 6)}
        assert users.metadata_size(biggest) <= limit
        r = put(biggest)
        assert r.status_code == 200, r.text
        fresh = tokens(c)
        assert len(fresh["access_token"]) < 8000
        assert cases_status(c, fresh["access_token"]) == 200
        assert c.get("/auth/v1/user", headers=bearer(fresh["access_token"])).status_code == 200


def test_cli_clears_user_metadata(start_server, tmp_path):
    server = start(start_server, tmp_path)
    user = add_user(server)

    async def bloat() -> None:
        # An install from before the limit may hold oversized metadata.
        await type(user).filter(id=user.id).update(user_metadata={"bio": "x" * 9000})

    server.run(bloat())
    with server.client() as c:
        assert cases_status(c, tokens(c)["access_token"]) != 200    # locked out
        out = cli(server, "users", "clear-metadata", "--email", user.email)
        size = users.metadata_size({"bio": "x" * 9000})
        assert out.returncode == 0 and f"{size} bytes" in out.stdout, out.stdout
        assert cases_status(c, tokens(c)["access_token"]) == 200
        assert cli(server, "users", "clear-metadata", "--email", "ghost@x.test").returncode == 1


# -- 6. a Supabase project's tokens are not checked against local sessions -----------------

def test_supabase_tokens_with_session_id_work_when_issuer_is_configured(start_server, tmp_path):
    # Before: with auth.issuer = the project's issuer, a genuine token of that project got
    # 401 "Session has ended" because the local session check applied to that issuer.
    issuer = "https://abcdefgh.supabase.co/auth/v1"
    server = start(start_server, tmp_path, issuer=issuer)
    user = add_user(server)
    with server.client() as c:
        genuine = issue_token(TEST_SECRET, user_id=str(uuid.uuid4()), issuer=issuer,
                              session_id=str(uuid.uuid4()))
        assert cases_status(c, genuine) == 200
        # This server's own tokens (same issuer, own key) still go through the check.
        held = tokens(c)
        assert pyjwt.decode(held["access_token"], options={"verify_signature": False})[
            "iss"] == issuer
        assert cases_status(c, held["access_token"]) == 200
        r = c.post("/auth/v1/logout?scope=local", headers=bearer(held["access_token"]))
        assert r.status_code == 204
        eventually_status(c, held["access_token"], 401)
        assert cases_status(c, issue_token(TEST_SECRET, user_id=user.id, issuer=issuer)) == 200


# -- 7. common passwords are refused ---------------------------------------------------------

@pytest.mark.parametrize("password", ["password", "12345678", "iloveyou", "Sunshine",
                                      "qwertyuiop", "PASSWORD1"])
def test_common_passwords_are_refused(start_server, tmp_path, password):
    # Before: any 8 characters passed, "password" and "12345678" included.
    with pytest.raises(users.WeakPassword) as err:
        users.check_password_rules(password)
    assert err.value.reason == "pwned"


def test_common_password_list_ships_with_the_package():
    common = users.common_passwords()
    assert len(common) == 10_000
    assert {"123456", "password", "dragon"} <= common
    users.check_password_rules("correct horse battery")    # long and uncommon: fine


def test_signup_and_password_change_refuse_common_passwords(start_server, tmp_path):
    server = start(start_server, tmp_path, signup_enabled=True)
    add_user(server)
    with server.client() as c:
        r = c.post("/auth/v1/signup", json={"email": "new@clinic.test", "password": "baseball1"},
                   headers=JS_HEADERS)
        body = assert_auth_error(r, 422, "weak_password")
        assert body["weak_password"]["reasons"] == ["pwned"]
        held = tokens(c)
        r = c.put("/auth/v1/user", json={"password": "football"},
                  headers=bearer(held["access_token"]))
        assert_auth_error(r, 422, "weak_password")
    out = cli(server, "users", "add", "--email", "n@clinic.test", "--password", "trustno1")
    assert out.returncode == 1 and "common" in out.stderr
