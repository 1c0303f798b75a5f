"""``GET/POST /auth/v1/authorize``: the server's own sign-in page for the PKCE flow.

A frontend that only knows "Sign in with <provider>" (supabase-js ``signInWithOAuth``, as
the original MedMitra frontend does with Google) is sent here; whatever the provider name,
the page asks for a local account's email and password (accounts made by
``medmitra users add``). On success the browser goes 302 to ``redirect_to?code=...``, and
the frontend exchanges the code with ``POST /auth/v1/token?grant_type=pkce``
(auth/pkce.py).

The page is plain HTML with its stylesheet inlined (allowed by a CSP hash): no script, no
font, no image, no byte from anywhere else. The form is CSRF-safe: a nonce in an HttpOnly
SameSite=Strict cookie with its HMAC in the form, and a cross-site ``Origin`` /
``Sec-Fetch-Site`` is refused. ``redirect_to`` must match ``auth.redirect_urls``; any other
gets a page that says so and never a redirect. Failed passwords count against the same
rate limits as the password grant.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.resources
import logging
from functools import lru_cache
from string import Template
from typing import Any
from urllib.parse import urlencode, urlsplit

from sanic import Blueprint, Request, Sanic
from sanic.response import HTTPResponse, html as html_response, redirect

from medmitra.auth import pkce, users
from medmitra.auth.pkce import CSRF_COOKIE, FORM_TTL_S, FormTokens
from medmitra.auth.ratelimit import retry_after_header
from medmitra.api.multipart import limit_body
from medmitra.api.supabase_auth import PREFIX, client_address, sign_in_account

log = logging.getLogger(__name__)

bp = Blueprint("auth_authorize", url_prefix=PREFIX)
# The form is an email, a password (both bounded) and a token: 16 KiB is plenty.
MAX_FORM_BYTES = 16 * 1024
FLOW_PARAMS = ("provider", "redirect_to", "code_challenge", "code_challenge_method", "scopes")


@lru_cache(maxsize=1)
def _assets() -> tuple[Template, str, str]:
    root = importlib.resources.files("medmitra") / "static" / "auth"
    page = Template((root / "authorize.html").read_text(encoding="utf-8"))
    css = (root / "signin.css").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii")
    return page, css, f"'sha256-{digest}'"


def _origin(url: str) -> str:
    split = urlsplit(url)
    return f"{split.scheme}://{split.netloc}"


def _page(status: int, title: str, body: str, *, form_target: str | None = None,
          headers: dict[str, str] | None = None) -> HTTPResponse:
    template, css, css_hash = _assets()
    # form-action: Chromium applies it to the redirect after the form is posted too.
    form_action = "'self'" + (f" {_origin(form_target)}" if form_target else "")
    csp = (f"default-src 'none'; style-src {css_hash}; img-src 'self'; "
           f"form-action {form_action}; frame-ancestors 'none'; base-uri 'none'")
    out = {"Content-Security-Policy": csp, "X-Frame-Options": "DENY",
           "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
           "X-Content-Type-Options": "nosniff", **(headers or {})}
    text = template.substitute(title=html.escape(title), css=css, body=body)
    return html_response(text, status=status, headers=out)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


class _Flow:
    """The flow parameters of one request (query string of GET and of the form's POST)."""

    def __init__(self, request: Request):
        args = request.args
        self.values = {k: args.get(k) for k in FLOW_PARAMS if args.get(k) is not None}
        self.provider = self.values.get("provider") or ""
        self.redirect_to = self.values.get("redirect_to") or ""
        self.challenge = self.values.get("code_challenge") or ""
        self.method = (self.values.get("code_challenge_method") or "").lower()

    @property
    def action(self) -> str:
        return f"{PREFIX}/authorize?{urlencode(self.values)}"

    def refusal(self, request: Request) -> HTTPResponse | None:
        """A page explaining why this link cannot be used, or None when it can."""
        settings = request.app.ctx.settings
        rules = request.app.ctx.redirect_rules
        if not self.redirect_to:
            return _page(400, "This sign-in link is incomplete", (
                "<p>The application that sent you here did not say where to return after "
                "signing in (<code>redirect_to</code> is missing). Go back to the "
                "application and try again.</p>"))
        if not pkce.redirect_allowed(rules, self.redirect_to):
            log.warning("sign-in page refused a redirect_to outside auth.redirect_urls")
            listed = ("This server has no allowed return addresses yet."
                      if not rules else "It is not one of the addresses this server may "
                                        "return to.")
            return _page(400, "This sign-in link is not allowed", (
                f"<p class=\"alert alert-error\" role=\"alert\">After signing in you would be "
                f"sent to <code>{_e(self.redirect_to[:300])}</code>. {listed}</p>"
                "<p>Nothing was sent there. If this is your clinic's application, ask the "
                "administrator to add its address to <code>auth.redirect_urls</code> in the "
                "server's configuration.</p>"))
        if not self.challenge:
            return _page(400, "This application's sign-in is not supported", (
                "<p>The application asked for a sign-in without a PKCE code challenge. This "
                "server only hands out one-time sign-in codes (the PKCE flow): the "
                "application must use <code>flowType: 'pkce'</code> "
                "(as <code>@supabase/ssr</code> does).</p>"))
        if self.method not in ("s256", "plain") or (
                self.method == "plain" and not settings.auth.pkce_allow_plain):
            extra = (" The browser sent <code>plain</code>: it has no WebCrypto because the "
                     "application is served over plain http from a name other than "
                     "localhost. Serve it over https, or let the administrator set "
                     "<code>auth.pkce_allow_plain = true</code>." if self.method == "plain"
                     else "")
            return _page(400, "This application's sign-in is not supported", (
                "<p>The code challenge method must be <code>S256</code>." f"{extra}</p>"))
        if not pkce.valid_pkce_string(self.challenge):
            return _page(400, "This sign-in link is damaged", (
                "<p>The code challenge in the link is not valid. Go back to the application "
                "and try again.</p>"))
        return None


def _form_page(request: Request, flow: _Flow, *, status: int = 200, email: str = "",
               error: str | None = None, headers: dict[str, str] | None = None
               ) -> HTTPResponse:
    tokens = FormTokens(request.app.ctx.jwt_secret)
    # The browser's nonce is kept while it is valid, so two tabs' forms both work.
    nonce = request.cookies.get(CSRF_COOKIE) or ""
    if not pkce.valid_nonce(nonce):
        nonce = tokens.new_nonce()
    target = urlsplit(flow.redirect_to)
    parts = []
    if error:
        parts.append(f'<p class="alert alert-error" role="alert" id="form-error">{error}</p>')
    parts.append(f"<p>Sign in with your clinic account to continue to "
                 f"<strong>{_e(target.netloc)}</strong>.</p>")
    provider = flow.provider.strip()
    if provider and provider.lower() != "email":
        name = _e(provider[:40].capitalize())
        parts.append(f'<p class="alert alert-info">Sign-in with {name} is not '
                     "available on this offline server; use the email and password your "
                     "clinic's administrator gave you.</p>")
    invalid = ' aria-invalid="true" aria-describedby="form-error"' if error else ""
    focus_email = "" if email else " autofocus"
    focus_password = " autofocus" if email else ""
    parts.append(
        f'<form method="post" action="{_e(flow.action)}">'
        f'<input type="hidden" name="csrf_token" value="{_e(tokens.token(nonce))}">'
        '<div class="field"><label for="email">Email</label>'
        f'<input id="email" name="email" type="email" autocomplete="username" required '
        f'maxlength="{users.MAX_EMAIL_CHARS}" value="{_e(email)}"{focus_email}{invalid}></div>'
        '<div class="field"><label for="password">Password</label>'
        '<input id="password" name="password" type="password" '
        f'autocomplete="current-password" required maxlength="{users.MAX_PASSWORD_CHARS}"'
        f'{focus_password}{invalid}></div>'
        '<button type="submit">Sign in</button></form>'
        '<p class="hint">No account? Accounts are created by the clinic\'s administrator '
        '(<code>medmitra users add</code>).</p>')
    cookie = (f"{CSRF_COOKIE}={nonce}; Path={PREFIX}/authorize; Max-Age={FORM_TTL_S}; "
              "HttpOnly; SameSite=Strict")
    return _page(status, "Sign in", "".join(parts), form_target=flow.redirect_to,
                 headers={"Set-Cookie": cookie, **(headers or {})})


def _cross_site(request: Request) -> bool:
    """True when the browser says the form was posted from another site."""
    site = request.headers.get("sec-fetch-site")
    if site and site not in ("same-origin", "none"):
        return True
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = (request.headers.get("host") or "").lower()
        return urlsplit(origin).netloc.lower() != host
    return False


def _minutes(wait_s: float) -> str:
    minutes = max(1, round(wait_s / 60))
    return "a minute" if minutes == 1 else f"{minutes} minutes"


@bp.get("/authorize")
async def authorize_page(request: Request) -> HTTPResponse:
    flow = _Flow(request)
    return flow.refusal(request) or _form_page(request, flow)


@bp.post("/authorize", stream=True)
async def authorize_submit(request: Request) -> HTTPResponse:
    # Anonymous: at most MAX_FORM_BYTES of body is ever read (413 beyond).
    limit_body(request, MAX_FORM_BYTES)
    flow = _Flow(request)
    refused = flow.refusal(request)
    if refused is not None:
        return refused
    await request.receive_body()
    form = request.form if request.content_type.startswith(
        "application/x-www-form-urlencoded") else {}
    email = (form.get("email") or "").strip()[:users.MAX_EMAIL_CHARS]
    password = form.get("password") or ""
    tokens = FormTokens(request.app.ctx.jwt_secret)
    if _cross_site(request) or not tokens.check(request.cookies.get(CSRF_COOKIE),
                                                form.get("csrf_token")):
        return _form_page(request, flow, status=403, email=email, error=(
            "This form had expired or was not sent from this page, so nothing was checked. "
            "Enter your password again. (Your browser must accept cookies from this "
            "server.)"))
    if not email or not password:
        return _form_page(request, flow, status=400, email=email,
                          error="Enter your email address and your password.")
    guard, address, account = (request.app.ctx.sign_in_guard, client_address(request),
                               sign_in_account(email))
    wait_s = guard.wait(address, account)
    if wait_s > 0:
        return _form_page(request, flow, status=429, email=email, error=(
            f"Too many failed sign-ins. For your account's safety, try again in about "
            f"{_minutes(wait_s)}."), headers={"Retry-After": retry_after_header(wait_s)})
    user = await users.authenticate(email, password)
    if user is None:
        guard.failed(address, account)
        return _form_page(request, flow, status=400, email=email,
                          error="Wrong email or password. Check both and try again.")
    if user.disabled_at is not None:
        return _form_page(request, flow, status=403, email=email, error=(
            "This account is disabled. Ask your clinic's administrator to enable it."))
    guard.succeeded(address, account)
    user.last_sign_in_at = users.utcnow()
    await user.save(update_fields=["last_sign_in_at"])
    code = await pkce.issue_code(user, flow.challenge, flow.method)
    return redirect(pkce.with_code(flow.redirect_to, code), status=302, headers={
        "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


def register_authorize(app: Sanic) -> None:
    """Add the sign-in page; a malformed ``auth.redirect_urls`` stops start-up here."""
    app.ctx.redirect_rules = pkce.parse_redirect_urls(app.ctx.settings.auth.redirect_urls)
    app.blueprint(bp)
