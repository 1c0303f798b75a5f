"""The original frontend's sign-in, for real: a supabase-js client (flowType 'pkce', as
@supabase/ssr) calls signInWithOAuth({provider: 'google', skipBrowserRedirect}); the sign-in
page it points to is filled in by a form post or by headless Chromium; the code the page
redirects with goes back to supabase-js's exchangeCodeForSession. Also: a refused
redirect_to, a replayed code, a wrong verifier, and the page making no request beyond this
server (issue 10 section 3)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from medmitra.auth import users
from tests.conftest import AXE, CHROMIUM, chromium, make_settings
from tests.test_auth_authorize import form_of
from tests.test_web_app import axe_check
from tests.test_supabase_js import JS_DIR, node  # noqa: F401  (fixture)

SCRIPT = JS_DIR / "pkce_flow.mjs"
EMAIL = "dr.rao@clinic.test"
PASSWORD = "a long clinic passphrase"
SCRIPT_TIMEOUT_S = 60
ARTIFACTS = Path(os.environ.get("MEDMITRA_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[1] / "test-artifacts")) / "auth"

pytestmark = pytest.mark.e2e


class Frontend:
    """One supabase-js client of the original frontend, its storage in a state file."""

    def __init__(self, node_bin: str, server_url: str, state: Path):
        self.node, self.server_url, self.state = node_bin, server_url, state

    def _run(self, *args: str) -> dict[str, Any]:
        proc = subprocess.run([self.node, str(SCRIPT), *args[:1], self.server_url, *args[1:],
                               str(self.state)], cwd=JS_DIR, capture_output=True, text=True,
                              timeout=SCRIPT_TIMEOUT_S)
        assert proc.returncode == 0, f"node failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def begin(self, redirect_to: str) -> str:
        out = self._run("begin", redirect_to)
        assert out["error"] is None and out["url"], out
        return out["url"]

    def exchange(self, code: str) -> dict[str, Any]:
        return self._run("exchange", code)

    @property
    def verifier(self) -> str | None:
        saved = json.loads(self.state.read_text()) if self.state.exists() else {}
        return next((v for k, v in saved.items() if k.endswith("-code-verifier")), None)

    @verifier.setter
    def verifier(self, value: str) -> None:
        saved = json.loads(self.state.read_text())
        key = next(k for k in saved if k.endswith("-code-verifier")) if any(
            k.endswith("-code-verifier") for k in saved) else "sb-127-auth-token-code-verifier"
        saved[key] = value
        self.state.write_text(json.dumps(saved))


@pytest.fixture
def frontend_callback() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server standing in for the frontend's /auth/callback route: records the
    paths it was asked for. (Playwright cannot intercept the target of a redirect.)"""
    landed: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            landed.append(self.path)
            body = b"<!doctype html><title>signed in</title><p>signed in</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/auth/callback", landed
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
def setup(start_server, tmp_path, node, frontend_callback):  # noqa: F811  (node fixture)
    callback, _ = frontend_callback
    server = start_server(make_settings(tmp_path, auth={"redirect_urls": callback}))
    user = server.run(users.create_user(EMAIL, PASSWORD))
    frontend = Frontend(node, server.url, tmp_path / "supabase-storage.json")
    return server, user, frontend, callback


def post_form(server: Any, url: str, password: str = PASSWORD) -> str:
    """Fill in the sign-in page with a plain form post; the code of the redirect."""
    with server.client() as c:
        page = c.get(url)
        assert page.status_code == 200, page.text
        action, token = form_of(page)
        r = c.post(action, data={"csrf_token": token, "email": EMAIL, "password": password})
        assert r.status_code == 302, r.text
        return parse_qs(urlsplit(r.headers["location"]).query)["code"][0]


def test_supabase_js_pkce_sign_in_replay_and_wrong_verifier(setup):
    server, user, frontend, callback = setup
    url = frontend.begin(callback)
    parts = urlsplit(url)
    assert parts.path == "/auth/v1/authorize" and url.startswith(server.url)
    query = parse_qs(parts.query)
    assert query["provider"] == ["google"] and query["code_challenge_method"] == ["s256"]
    assert query["redirect_to"] == [callback]

    code = post_form(server, url)
    verifier = frontend.verifier
    assert verifier
    out = frontend.exchange(code)
    assert out["error"] is None, out
    assert out["session"] == {"user_id": user.id, "email": EMAIL, "token_type": "bearer",
                              "has_access_token": True, "has_refresh_token": True}
    assert out["get_user"] == {"id": user.id, "error": None}
    assert out["all_cases_status"] == 200

    # A replayed code: supabase-js again with the same code and verifier.
    frontend.verifier = verifier
    out = frontend.exchange(code)
    assert out["session"] is None
    assert out["error"]["name"] == "AuthApiError" and out["error"]["status"] == 404
    assert out["error"]["code"] == "flow_state_not_found"

    # A wrong verifier (another sign-in's), for a fresh code.
    url = frontend.begin(callback)
    code = post_form(server, url)
    frontend.verifier = verifier
    out = frontend.exchange(code)
    assert out["session"] is None
    assert (out["error"]["name"], out["error"]["status"], out["error"]["code"]) == \
        ("AuthApiError", 400, "bad_code_verifier")


def test_supabase_js_refused_redirect_to(setup):
    server, _, frontend, _ = setup
    url = frontend.begin("http://evil.example/auth/callback")
    with server.client() as c:
        page = c.get(url)
        assert page.status_code == 400 and "location" not in page.headers
        assert "not allowed" in page.text and "<form" not in page.text


# --- the page in headless Chromium ----------------------------------------------------------

@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    if not AXE.is_file():
        pytest.skip("axe-core missing: run scripts/setup-test-tools.sh (npm in tests/js)")
    with chromium() as b:
        yield b


def test_sign_in_page_in_chromium_keyboard_only_and_local_only(setup, browser,
                                                              frontend_callback):
    server, user, frontend, callback = setup
    _, landed = frontend_callback
    url = frontend.begin(callback)
    origin = urlsplit(server.url)
    requests: list[str] = []
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    page.on("request", lambda r: requests.append(r.url))
    page.on("requestfailed", lambda r: problems.append(f"{r.url} {r.failure}"))
    page.on("pageerror", lambda e: problems.append(str(e)))
    # An answer's status is checked below; Chromium also logs every 4xx as a console error.
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" and not
            m.text.startswith("Failed to load resource: the server responded") else None)
    answers: list[tuple[str, int]] = []
    page.on("response", lambda r: answers.append((urlsplit(r.url).path, r.status)))

    try:
        page.goto(url)
        assert page.title().startswith("Sign in")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "signin.png"), full_page=True)
        # Keyboard only: the email field has focus, Tab reaches the password and the button.
        assert page.evaluate("document.activeElement.id") == "email"
        axe_check(page, "sign-in page")
        page.focus("#email")
        page.keyboard.type(EMAIL)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "password"
        page.keyboard.type("not the password")
        page.keyboard.press("Enter")
        page.wait_for_selector("[role=alert]")
        assert "Wrong email or password" in page.inner_text("[role=alert]")
        assert page.evaluate("document.activeElement.id") == "password"
        page.screenshot(path=str(ARTIFACTS / "signin-wrong-password.png"), full_page=True)
        axe_check(page, "sign-in page with an error")
        page.focus("#password")
        page.keyboard.type(PASSWORD)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.tagName") == "BUTTON"
        with page.expect_navigation(url=lambda u: u.startswith(callback)):
            page.keyboard.press("Enter")
        assert page.inner_text("p") == "signed in"
    finally:
        page.close()

    calls = [p for p in landed if p.startswith("/auth/callback")]   # not its favicon
    assert len(calls) == 1 and calls[0].startswith("/auth/callback?code="), landed
    code = parse_qs(urlsplit(calls[0]).query)["code"][0]
    out = frontend.exchange(code)
    assert out["error"] is None and out["session"]["user_id"] == user.id, out

    # Every request the sign-in page made went to this server (the callback is the
    # frontend's own route); nothing failed, nothing was blocked.
    assert requests
    for seen in requests:
        if seen.startswith(callback):
            continue
        parts = urlsplit(seen)
        assert (parts.scheme, parts.hostname, parts.port) == \
            (origin.scheme, origin.hostname, origin.port), seen
    assert not problems, problems
    # The wrong password's page (400) and the browser's own favicon guess (404) only.
    assert {a for a in answers if a[1] >= 400} <= {("/auth/v1/authorize", 400),
                                                   ("/favicon.ico", 404)}, answers
    assert ("/auth/v1/authorize", 302) in answers


# --- the original frontend's server side, with @supabase/ssr --------------------------------

SSR_SCRIPT = JS_DIR / "ssr_frontend.mjs"
PAGE_VIEWS = 20


def test_original_frontend_signs_in_and_20_quick_page_views_stay_signed_in(
        start_server, tmp_path, node, frontend_callback):  # noqa: F811  (node fixture)
    """@supabase/ssr as the original frontend uses it: sign in through the sign-in page,
    then 20 page views, each asking GET /auth/v1/user 2-4 times from the one address of
    the Next.js server, with the shipped rate limits. The case list call sends no token
    (?user_id=...), so it needs trust mode (docs/original-frontend.md)."""
    if not (JS_DIR / "node_modules" / "@supabase" / "ssr").is_dir():
        # node_modules from before package-lock.json pinned @supabase/ssr
        proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"npm ci failed:\n{proc.stderr[-3000:]}"
    callback, _ = frontend_callback
    origin = callback.removesuffix("/auth/callback")
    server = start_server(make_settings(tmp_path, auth={
        "redirect_urls": callback, "trust_user_id": True},
        server={"cors_origins": origin}))
    assert server.settings.auth.rate_limit_per_min == 30       # the shipped default
    user = server.run(users.create_user(EMAIL, PASSWORD))
    proc = subprocess.run([node, str(SSR_SCRIPT), server.url, callback, EMAIL, PASSWORD,
                           str(PAGE_VIEWS)], cwd=JS_DIR, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S * 2)
    assert proc.returncode == 0, f"node failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["verifier_cookie"] is True        # @supabase/ssr chose the PKCE flow
    assert out["redirected_to"] == callback and out["user_id"] == user.id
    assert out["signed_in_views"] == PAGE_VIEWS, out
    user_calls = out["requests"]["GET /auth/v1/user"]
    assert user_calls == sum(2 + view % 3 for view in range(PAGE_VIEWS)) == 59   # old limit: 30/min
    assert out["statuses"] == {"POST /auth/v1/token 200": 1,
                               "GET /auth/v1/user 200": user_calls}, out["statuses"]
    assert out["case_list_statuses"] == [200] * PAGE_VIEWS
