"""The PKCE sign-in flow of Supabase Auth, for a frontend that signs in with an OAuth
provider (``supabase.auth.signInWithOAuth``) and cannot change.

1. The browser opens ``GET /auth/v1/authorize?provider=...&redirect_to=...&code_challenge=
   ...&code_challenge_method=s256``; whatever the provider, this server shows its own
   sign-in page for local accounts (api/authorize.py).
2. After a correct password it redirects to ``redirect_to?code=<code>``; ``redirect_to``
   must match ``auth.redirect_urls``. The code is random (256 bits), stored as its SHA-256
   with the challenge, lives ``CODE_TTL_S`` and is spent once.
3. The frontend posts ``{auth_code, code_verifier}`` to ``/token?grant_type=pkce``;
   ``exchange_code`` spends the code (a conditional update: of two concurrent exchanges
   one wins) and checks that SHA-256(verifier) is the challenge. A wrong verifier spends
   the code too: whoever intercepted a code gets one try, and the real client starts over.

Also here: the allow-list rules and the sign-in form's CSRF token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from medmitra.config import ConfigError
from medmitra.db.auth_models import AuthUser
from medmitra.db.flow_models import AuthFlowCode

# Supabase's flow states live 5 minutes; a code here is used within a second of the redirect,
# two minutes leave room for a slow network and nothing more.
CODE_TTL_S = 120
CODE_BYTES = 32
# Spent and expired codes are deleted this long after they expire (they prove nothing then).
SWEEP_AFTER_S = 3600
# RFC 7636 section 4.1: 43-128 characters of the unreserved set.
_PKCE_RE = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")
MAX_REDIRECT_CHARS = 2048
# The sign-in form: its token is valid this long after the page was served.
FORM_TTL_S = 1800
CSRF_COOKIE = "medmitra_signin"
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class FlowError(Exception):
    """A refused code exchange, in Supabase's terms (status, error_code, message)."""

    def __init__(self, status: int, error_code: str, msg: str):
        super().__init__(msg)
        self.status = status
        self.error_code = error_code
        self.msg = msg


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


# --- redirect allow-list --------------------------------------------------------------------

@dataclass(frozen=True)
class RedirectRule:
    scheme: str
    host: str
    port: int
    path: str
    below: bool          # "/**": every path below ``path`` too

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        if (scheme, host, port) != (self.scheme, self.host, self.port):
            return False
        if not self.below:
            return path == self.path
        base = self.path.rstrip("/")
        return path == base or path.startswith(base + "/")


def _parts(url: str) -> tuple[str, str, int, str, str] | None:
    """(scheme, host, port, path, query) of an absolute http(s) URL that is safe to
    redirect to, else None: no user info, no fragment, no backslash or control character."""
    if not url or len(url) > MAX_REDIRECT_CHARS or any(
            c == "\\" or ord(c) < 0x21 or ord(c) == 0x7f for c in url):
        return None
    try:
        split = urlsplit(url)
        port = split.port
    except ValueError:
        return None
    scheme = split.scheme.lower()
    if scheme not in ("http", "https") or not split.hostname or split.username is not None \
            or split.password is not None or split.fragment or "#" in url:
        return None
    if any(seg in (".", "..") for seg in unquote(split.path).split("/")):
        return None      # a browser would resolve it to another path
    port = port or (443 if scheme == "https" else 80)
    return scheme, split.hostname.lower(), port, split.path or "/", split.query


def parse_redirect_urls(raw: str) -> tuple[RedirectRule, ...]:
    """``auth.redirect_urls`` -> rules; a ConfigError names a malformed entry."""
    rules = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        below = entry.endswith("/**")
        parts = _parts(entry[:-2] if below else entry)
        if parts is None or parts[4] or "*" in (entry[:-3] if below else entry):
            raise ConfigError(f"auth.redirect_urls: {entry!r} is not an absolute http(s) URL "
                              "without query or fragment (a trailing /** allows the paths "
                              "below it)")
        scheme, host, port, path, _ = parts
        rules.append(RedirectRule(scheme, host, port, path, below))
    return tuple(rules)


def redirect_allowed(rules: tuple[RedirectRule, ...], url: str) -> bool:
    parts = _parts(url)
    return parts is not None and any(r.matches(*parts[:4]) for r in rules)


def with_code(redirect_to: str, code: str) -> str:
    """``redirect_to`` with ``code=<code>`` added to its query (replacing any ``code``)."""
    split = urlsplit(redirect_to)
    query = [(k, v) for k, v in parse_qsl(split.query, keep_blank_values=True) if k != "code"]
    query.append(("code", code))
    return urlunsplit((split.scheme, split.netloc, split.path or "/", urlencode(query), ""))


# --- challenge ------------------------------------------------------------------------------

def valid_pkce_string(value: str | None) -> bool:
    return bool(value) and bool(_PKCE_RE.match(value or ""))


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def challenge_matches(method: str, challenge: str, verifier: str) -> bool:
    if not valid_pkce_string(verifier):
        return False
    expected = s256(verifier) if method == "s256" else verifier
    return hmac.compare_digest(expected, challenge)


# --- codes ----------------------------------------------------------------------------------

async def issue_code(user: AuthUser, challenge: str, method: str) -> str:
    """A new one-time code for ``user`` (plain text returned once; its hash is stored)."""
    now = _utcnow()
    code = secrets.token_urlsafe(CODE_BYTES)
    await AuthFlowCode.filter(expires_at__lt=now - timedelta(seconds=SWEEP_AFTER_S)).delete()
    await AuthFlowCode.create(code_hash=_hash(code), user=user, code_challenge=challenge,
                              challenge_method=method, created_at=now,
                              expires_at=now + timedelta(seconds=CODE_TTL_S))
    return code


async def exchange_code(code: str | None, verifier: str | None) -> AuthUser:
    """Spend ``code``; the user it was issued to, or FlowError (GoTrue's codes)."""
    if not code or not verifier or not isinstance(code, str) or not isinstance(verifier, str):
        raise FlowError(400, "validation_failed",
                        "invalid request: both auth code and code verifier should be non-empty")
    now = _utcnow()
    code_hash = _hash(code)
    spent = await AuthFlowCode.filter(code_hash=code_hash, used_at=None).update(used_at=now)
    row = await AuthFlowCode.get_or_none(code_hash=code_hash).select_related("user") \
        if spent else None
    if row is None:
        raise FlowError(404, "flow_state_not_found",
                        "invalid flow state, no valid flow state found")
    if row.expires_at <= now:
        raise FlowError(422, "flow_state_expired", "invalid flow state, flow state has expired")
    if not challenge_matches(row.challenge_method, row.code_challenge, verifier):
        raise FlowError(400, "bad_code_verifier",
                        "code challenge does not match previously saved code verifier")
    if row.user.disabled_at is not None:
        raise FlowError(400, "user_banned", "User is banned")
    return row.user


# --- the sign-in form's CSRF token ----------------------------------------------------------

def valid_nonce(nonce: str | None) -> bool:
    return bool(nonce) and bool(_NONCE_RE.match(nonce or ""))


class FormTokens:
    """A random nonce in an HttpOnly SameSite=Strict cookie and, in the form, the nonce's
    HMAC with a time stamp: a page of another site can neither read the cookie nor make
    the matching token (the key is derived from the server's secret)."""

    def __init__(self, secret: str, *, clock=time.time):
        self._key = hmac.new(secret.encode("utf-8"), b"medmitra sign-in form",
                             hashlib.sha256).digest()
        self._clock = clock

    def _mac(self, nonce: str, issued: int) -> str:
        mac = hmac.new(self._key, f"{nonce}.{issued}".encode("ascii"), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode("ascii")

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(18)

    def token(self, nonce: str) -> str:
        issued = int(self._clock())
        return f"{issued}.{self._mac(nonce, issued)}"

    def check(self, nonce: str | None, token: str | None) -> bool:
        if not valid_nonce(nonce) or not token:
            return False
        issued_s, _, mac = token.partition(".")
        if not issued_s.isdigit() or len(issued_s) > 12:
            return False
        issued = int(issued_s)
        if not 0 <= self._clock() - issued <= FORM_TTL_S:
            return False
        return hmac.compare_digest(mac, self._mac(nonce, issued))
