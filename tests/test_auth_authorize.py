"""The sign-in page (GET/POST /auth/v1/authorize) and the PKCE code exchange
(POST /auth/v1/token?grant_type=pkce), driven by plain HTTP form posts against a real server
(issue 10 section 2). tests/test_auth_pkce_js.py drives the same flow with supabase-js and
headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from medmitra.auth import pkce, users
from medmitra.config import ConfigError
from medmitra.db.flow_models import AuthFlowCode
from tests.conftest import make_settings
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

EMAIL = "doctor@clinic.test"
PASSWORD = "correct horse battery"
CALLBACK = "http://localhost:3000/auth/callback"
ALLOWED = "http://localhost:3000/auth/callback, http://clinic-app.test:3000/**"
TOKEN_KEYS = {"access_token", "token_type", "expires_in", "expires_at", "refresh_token", "user"}

pytestmark = pytest.mark.e2e


def verifier_and_challenge() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def start(start_server: Any, tmp_path: Any, database: dict | None = None, **auth: Any) -> Any:
    auth.setdefault("redirect_urls", ALLOWED)
    server = start_server(make_settings(tmp_path, auth=auth, database=database or {}))
    server.run(users.create_user(EMAIL, PASSWORD))
    return server


def open_page(c: httpx.Client, challenge: str, redirect_to: str = CALLBACK,
              **extra: str) -> httpx.Response:
    params = {"provider": "google", "redirect_to": redirect_to, "code_challenge": challenge,
              "code_challenge_method": "s256", **extra}
    return c.get("/auth/v1/authorize", params=params)


def form_of(page: httpx.Response) -> tuple[str, str]:
    action = re.search(r'<form method="post" action="([^"]+)"', page.text)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert action and token, page.text
    return html.unescape(action.group(1)), html.unescape(token.group(1))


def submit(c: httpx.Client, page: httpx.Response, email: str = EMAIL,
           password: str = PASSWORD, **headers: str) -> httpx.Response:
    action, token = form_of(page)
    return c.post(action, data={"csrf_token": token, "email": email, "password": password},
                  headers=headers)


def code_from(r: httpx.Response, redirect_to: str = CALLBACK) -> str:
    assert r.status_code == 302, r.text
    location = r.headers["location"]
    assert location.startswith(redirect_to + "?code=")
    return parse_qs(urlsplit(location).query)["code"][0]


def exchange(c: httpx.Client, code: str, verifier: str) -> httpx.Response:
    return c.post("/auth/v1/token", params={"grant_type": "pkce"},
                  json={"auth_code": code, "code_verifier": verifier})


def count_codes(server: Any) -> int:
    async def count() -> int:
        return await AuthFlowCode.all().count()

    return server.run(count())


def assert_auth_error(r: httpx.Response, status: int, error_code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error_code"] == error_code, r.json()


def test_sign_in_page_code_and_pkce_exchange(start_server, tmp_path):
    server = start(start_server, tmp_path)
    verifier, challenge = verifier_and_challenge()
    with server.client() as c:
        page = open_page(c, challenge)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "Sign in" in page.text and "google" in page.text   # names the provider
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "form-action 'self' http://localhost:3000" in csp
        assert "script" not in page.text.lower()
        cookie = page.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["x-frame-options"] == "DENY"

        r = submit(c, page)
        code = code_from(r)
        assert len(code) >= 40
        session = exchange(c, code, verifier)
        assert session.status_code == 200, session.text
        body = session.json()
        assert set(body) == TOKEN_KEYS and body["user"]["email"] == EMAIL
        # The same session as the password grant: it works on the case API and /user.
        auth = {"Authorization": f"Bearer {body['access_token']}"}
        assert c.get("/cases/all_cases", headers=auth).status_code == 200
        assert c.get("/auth/v1/user", headers=auth).json()["email"] == EMAIL
        r = c.post("/auth/v1/token", params={"grant_type": "refresh_token"},
                   json={"refresh_token": body["refresh_token"]})
        assert r.status_code == 200

        # Each code is accepted once.
        assert_auth_error(exchange(c, code, verifier), 404, "flow_state_not_found")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_exchanges_of_one_code_one_wins(request, start_server, tmp_path, backend):
    database = {"url": request.getfixturevalue("pg_url")} if backend == "postgres" else None
    server = start(start_server, tmp_path, database=database)
    assert server.settings.is_sqlite == (backend == "sqlite")
    verifier, challenge = verifier_and_challenge()
    with server.client() as c:
        code = code_from(submit(c, open_page(c, challenge)))
    clients = [server.client() for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            answers = list(pool.map(lambda cl: exchange(cl, code, verifier), clients))
    finally:
        for cl in clients:
            cl.close()
    assert sorted(a.status_code for a in answers) == [200, 404, 404, 404], \
        [a.text for a in answers]


def test_existing_query_of_redirect_to_is_kept_and_paths_below_a_star_rule(start_server,
                                                                          tmp_path):
    server = start(start_server, tmp_path)
    verifier, challenge = verifier_and_challenge()
    target = "http://clinic-app.test:3000/auth/callback?next=%2Fdashboard"
    with server.client() as c:
        r = submit(c, open_page(c, challenge, redirect_to=target))
        assert r.status_code == 302
        query = parse_qs(urlsplit(r.headers["location"]).query)
        assert query["next"] == ["/dashboard"] and len(query["code"]) == 1
        assert exchange(c, query["code"][0], verifier).status_code == 200


@pytest.mark.parametrize("redirect_to", [
    "http://evil.example/auth/callback",
    "http://localhost:3000/auth/callback/../../elsewhere",
    "http://localhost:3000/auth/callbackX",
    "http://localhost:3001/auth/callback",
    "https://localhost:3000/auth/callback",
    "http://user@localhost:3000/auth/callback",
    "http://localhost:3000/auth/callback#x",
    "javascript:alert(1)//localhost:3000/auth/callback",
    "//localhost:3000/auth/callback",
    "http://clinic-app.test:3000.evil.example/x",
    "",
])
def test_refused_redirect_to_gets_a_clear_page_and_no_redirect(start_server, tmp_path,
                                                              redirect_to):
    server = start(start_server, tmp_path)
    _, challenge = verifier_and_challenge()
    with server.client() as c:
        page = open_page(c, challenge, redirect_to=redirect_to)
        assert page.status_code == 400
        assert "location" not in page.headers
        assert "<form" not in page.text
        assert "auth.redirect_urls" in page.text or "redirect_to" in page.text
        # A hand-made POST to it is refused the same way: no code is ever issued.
        r = c.post("/auth/v1/authorize", params={
            "redirect_to": redirect_to, "code_challenge": challenge,
            "code_challenge_method": "s256"}, data={"email": EMAIL, "password": PASSWORD})
        assert r.status_code == 400 and "location" not in r.headers
    assert count_codes(server) == 0


def test_no_redirect_urls_configured_refuses_everything(start_server, tmp_path):
    server = start(start_server, tmp_path, redirect_urls="")
    _, challenge = verifier_and_challenge()
    with server.client() as c:
        page = open_page(c, challenge)
        assert page.status_code == 400 and "no allowed return addresses" in page.text


def test_wrong_verifier_spends_the_code_and_expired_codes_are_refused(start_server, tmp_path):
    server = start(start_server, tmp_path)
    verifier, challenge = verifier_and_challenge()
    with server.client() as c:
        code = code_from(submit(c, open_page(c, challenge)))
        assert_auth_error(exchange(c, code, verifier_and_challenge()[0]), 400,
                          "bad_code_verifier")
        assert_auth_error(exchange(c, code, verifier), 404, "flow_state_not_found")

        code = code_from(submit(c, open_page(c, challenge)))
        assert_auth_error(exchange(c, code, "short"), 400, "bad_code_verifier")

        code = code_from(submit(c, open_page(c, challenge)))

        async def age_codes() -> None:
            for row in await AuthFlowCode.filter(used_at=None):
                row.expires_at = row.created_at - timedelta(seconds=1)
                await row.save(update_fields=["expires_at"])

        server.run(age_codes())
        assert_auth_error(exchange(c, code, verifier), 422, "flow_state_expired")

        assert_auth_error(exchange(c, "", verifier), 400, "validation_failed")
        assert_auth_error(exchange(c, "no-such-code", verifier), 404, "flow_state_not_found")
        r = c.post("/auth/v1/token", params={"grant_type": "pkce"},
                   json={"auth_code": 5, "code_verifier": ["x"]})
        assert_auth_error(r, 400, "validation_failed")
    # Only hashes are stored.
    async def stored() -> list[str]:
        return await AuthFlowCode.all().values_list("code_hash", flat=True)

    hashes = server.run(stored())
    assert code not in hashes and hashlib.sha256(code.encode()).hexdigest() in hashes


def test_wrong_password_disabled_account_and_rate_limit_messages(start_server, tmp_path):
    server = start(start_server, tmp_path, account_address_failures_per_hour=2,
                   account_failures_per_hour=5)
    _, challenge = verifier_and_challenge()
    with server.client() as c:
        page = open_page(c, challenge)
        r = submit(c, page, password="wrong password")
        assert r.status_code == 400 and "Wrong email or password" in r.text
        assert 'role="alert"' in r.text and 'aria-invalid="true"' in r.text
        assert f'value="{EMAIL}"' in r.text                     # the email is kept
        r = submit(c, r, email="nobody@clinic.test")            # same answer: no enumeration
        assert r.status_code == 400 and "Wrong email or password" in r.text
        r = submit(c, r, password="again wrong")
        r = submit(c, r, password="and again")
        assert r.status_code == 429 and "Too many failed sign-ins" in r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "<form" in r.text                                # can retry later

    server.run(users.create_user("nurse@clinic.test", PASSWORD))
    user = server.run(users.find_by_email("nurse@clinic.test"))
    server.run(users.set_disabled(user, True))
    with server.client() as other:
        r = submit(other, open_page(other, challenge), email="nurse@clinic.test")
        assert r.status_code == 403 and "disabled" in r.text and "location" not in r.headers
        r = submit(other, r, email="nurse@clinic.test", password="wrong password")
        assert r.status_code == 400 and "disabled" not in r.text   # says nothing without it


def test_form_is_csrf_safe(start_server, tmp_path):
    server = start(start_server, tmp_path)
    _, challenge = verifier_and_challenge()
    with server.client() as c:
        page = open_page(c, challenge)
        action, token = form_of(page)
        # A cross-site page posting the form: refused even with a valid token and cookie.
        r = c.post(action, data={"csrf_token": token, "email": EMAIL, "password": PASSWORD},
                   headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "location" not in r.headers
        r = c.post(action, data={"csrf_token": token, "email": EMAIL, "password": PASSWORD},
                   headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403 and "location" not in r.headers
        # No token, or a token of another browser's cookie.
        r = c.post(action, data={"email": EMAIL, "password": PASSWORD})
        assert r.status_code == 403
        with server.client() as other:
            _, foreign = form_of(open_page(other, challenge))
        r = c.post(action, data={"csrf_token": foreign, "email": EMAIL,
                                 "password": PASSWORD})
        assert r.status_code == 403
    with server.client() as no_cookie:
        r = no_cookie.post(action, data={"csrf_token": token, "email": EMAIL,
                                         "password": PASSWORD})
        assert r.status_code == 403 and "cookies" in r.text
    assert count_codes(server) == 0
    with server.client() as c:     # the same-origin post of the page itself works
        page = open_page(c, challenge)
        origin = server.url
        assert submit(c, page, Origin=origin, **{"Sec-Fetch-Site": "same-origin"}) \
            .status_code == 302


def test_two_tabs_of_one_browser_both_sign_in(start_server, tmp_path):
    server = start(start_server, tmp_path)
    verifier, challenge = verifier_and_challenge()
    with server.client() as c:
        first, second = open_page(c, challenge), open_page(c, challenge)
        assert exchange(c, code_from(submit(c, first)), verifier).status_code == 200
        assert exchange(c, code_from(submit(c, second)), verifier).status_code == 200


def test_old_codes_are_swept(start_server, tmp_path):
    server = start(start_server, tmp_path)
    _, challenge = verifier_and_challenge()
    with server.client() as c:
        code_from(submit(c, open_page(c, challenge)))

        async def age_codes() -> None:
            past = timedelta(seconds=pkce.SWEEP_AFTER_S + pkce.CODE_TTL_S + 1)
            for row in await AuthFlowCode.all():
                row.created_at -= past
                row.expires_at -= past
                await row.save(update_fields=["created_at", "expires_at"])

        server.run(age_codes())
        assert count_codes(server) == 1
        code_from(submit(c, open_page(c, challenge)))
        assert count_codes(server) == 1          # the old one went, the new one stays


def test_oversized_form_is_refused_unread(start_server, tmp_path):
    server = start(start_server, tmp_path)
    _, challenge = verifier_and_challenge()
    with server.client() as c:
        page = open_page(c, challenge)
        action, token = form_of(page)
        r = c.post(action, data={"csrf_token": token, "email": EMAIL,
                                 "password": "x" * (64 * 1024)})
        assert r.status_code == 413
        assert submit(c, open_page(c, challenge)).status_code == 302   # the server is fine


@pytest.mark.parametrize("params, text", [
    ({"code_challenge": ""}, "flowType: 'pkce'"),
    ({"code_challenge_method": "plain"}, "auth.pkce_allow_plain"),
    ({"code_challenge_method": "md5"}, "S256"),
    ({"code_challenge": "short"}, "not valid"),
    ({"code_challenge": "x" * 129}, "not valid"),
])
def test_unsupported_challenges_get_a_clear_page(start_server, tmp_path, params, text):
    server = start(start_server, tmp_path)
    _, challenge = verifier_and_challenge()
    params = dict(params)
    with server.client() as c:
        page = open_page(c, params.pop("code_challenge", challenge), **params)
        assert page.status_code == 400 and text in page.text, page.text


def test_plain_challenge_when_allowed(start_server, tmp_path):
    server = start(start_server, tmp_path, pkce_allow_plain=True)
    verifier = secrets.token_urlsafe(48)
    with server.client() as c:
        page = open_page(c, verifier, code_challenge_method="plain")
        code = code_from(submit(c, page))
        assert_auth_error(exchange(c, code, verifier + "x"), 400, "bad_code_verifier")
        code = code_from(submit(c, open_page(c, verifier, code_challenge_method="plain")))
        assert exchange(c, code, verifier).status_code == 200


def test_malformed_redirect_urls_stop_start_up(tmp_path):
    from medmitra.app import create_app

    for bad in ("localhost:3000/cb", "http://x.test/cb?a=1", "ftp://x.test/", "http://x.test/*"):
        with pytest.raises(ConfigError, match="auth.redirect_urls"):
            create_app(make_settings(tmp_path, auth={"redirect_urls": bad}))


def test_redirect_rules_unit():
    rules = pkce.parse_redirect_urls(ALLOWED)
    ok = pkce.redirect_allowed
    assert ok(rules, CALLBACK) and ok(rules, CALLBACK + "?next=/x")
    assert ok(rules, "http://LOCALHOST:3000/auth/callback")
    assert ok(rules, "http://clinic-app.test:3000/")
    assert ok(rules, "http://clinic-app.test:3000/a/b")
    # Dot segments a browser would resolve elsewhere are refused, encoded ones too.
    assert not ok(rules, "http://clinic-app.test:3000/a/../b")
    assert not ok(rules, "http://localhost:3000/auth/callback/%2e%2e")
    assert not ok(rules, "http://clinic-app.test/a")         # default port 80 is another origin
    assert not ok(rules, "http://clinic-app.test:3000\\@evil.example/")
    assert pkce.with_code("http://a.test/cb?code=old&x=1", "new") == "http://a.test/cb?x=1&code=new"
