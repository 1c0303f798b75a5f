"""Verify Supabase-style access tokens and issue tokens of the same shape (api.md section 2).

Accepted: HS256 with the configured secret, and ES256 / RS256 with public keys from a JWKS
chosen by the header ``kid``. Each JWKS key is pinned to the one algorithm its type allows
(EC P-256 -> ES256, RSA -> RS256), and the HS256 path only ever uses the configured secret,
so ``none`` and algorithm confusion (an HS256 token "signed" with a public key) fail.

Rejection messages are short and never echo the token: they end up in 401 bodies.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from medmitra.config import ConfigError
from medmitra.errors import Unauthorized

if TYPE_CHECKING:
    from medmitra.config import AuthSettings, Settings

log = logging.getLogger(__name__)

# Supabase tokens are ~1 KiB; anything this large is junk or an attack on the parser.
MAX_TOKEN_CHARS = 8 * 1024
# RSA keys shorter than this are breakable; a JWKS offering one is misconfigured.
MIN_RSA_KEY_BITS = 2048
# RFC 7518 3.2: an HS256 key must be at least as long as the hash (Supabase enforces 32 too).
MIN_HS256_SECRET_BYTES = 32
# Verified tokens remembered (token -> principal until exp); cleared wholesale when full.
VERIFIED_CACHE_SIZE = 10_000

HS256 = "HS256"
ES256 = "ES256"
RS256 = "RS256"

# Canonical 8-4-4-4-12 form only: one spelling per user, so ownership checks compare strings.
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@dataclass(frozen=True)
class Principal:
    user_id: str            # the token's ``sub``, lower-case canonical UUID
    email: str | None
    role: str | None
    session_id: str | None  # ``session_id`` claim if present
    claims: dict
    kid: str | None = None  # the JWKS / key-ring key that verified it (None for HS256)
    alg: str | None = None  # the algorithm it was verified with


@dataclass(frozen=True)
class _PublicKey:
    kid: str
    alg: str                # the only algorithm this key may verify
    key: Any                # cryptography public key object


def _pinned_alg(jwk: Mapping[str, Any]) -> str | None:
    """The one algorithm a JWK may verify, or None when we do not support its type."""
    kty = jwk.get("kty")
    if kty == "EC":
        return ES256 if jwk.get("crv") == "P-256" else None
    if kty == "RSA":
        return RS256
    return None


def _load_public_key(jwk: Mapping[str, Any], index: int) -> _PublicKey | None:
    """Parse one JWK. None = a key type we skip; ValueError = a broken key."""
    if not isinstance(jwk, Mapping):
        raise ValueError(f"key #{index} is not a JSON object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError(f"key #{index} has no kid (keys are chosen by kid)")
    if jwk.get("use", "sig") != "sig":
        log.warning("JWKS key %r is not a signing key (use=%r); ignored", kid, jwk.get("use"))
        return None
    alg = _pinned_alg(jwk)
    if alg is None:
        # Symmetric keys never belong in a JWKS (it is public); other curves are unsupported.
        log.warning("JWKS key %r has an unsupported type (kty=%r crv=%r); ignored",
                    kid, jwk.get("kty"), jwk.get("crv"))
        return None
    declared = jwk.get("alg")
    if declared is not None and declared != alg:
        raise ValueError(f"key {kid!r}: alg {declared!r} does not fit its key type ({alg} only)")
    loader = ECAlgorithm if alg == ES256 else RSAAlgorithm
    try:
        key = loader.from_jwk(dict(jwk))
    except (pyjwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"key {kid!r}: invalid {jwk.get('kty')} key ({exc})") from None
    if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        # A JWKS carrying private parts still only needs the public half here.
        key = key.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_KEY_BITS:
        raise ValueError(f"key {kid!r}: RSA key of {key.key_size} bits is too short "
                         f"(minimum {MIN_RSA_KEY_BITS})")
    return _PublicKey(kid=kid, alg=alg, key=key)


def _same_key(a: Any, b: Any) -> bool:
    return a.public_numbers() == b.public_numbers()


class TokenVerifier:
    """Checks bearer tokens; thread-safe (key set is replaced, never mutated in place)."""

    def __init__(self, auth: "AuthSettings", *, hs256_secret: str | None,
                 jwks: dict | None = None):
        self._audience = auth.audience or None
        self._issuer = auth.issuer or None
        self._leeway_s = auth.leeway_s
        # Empty string counts as "no secret": an empty HMAC key would accept forgeries.
        self._secret = hs256_secret or None
        if self._secret is not None:
            _check_secret_length(self._secret)
        self._keys: dict[str, _PublicKey] = {}
        self._verified: dict[str, tuple[Principal, float]] = {}
        if jwks is not None:
            self.add_jwks(jwks)

    @classmethod
    def from_settings(cls, settings: "Settings", hs256_secret: str) -> "TokenVerifier":
        """Build from config; the JWKS file (if any) is read once here."""
        verifier = cls(settings.auth, hs256_secret=hs256_secret)
        path = settings.auth.jwks_file
        if path:
            try:
                verifier.add_jwks(_read_jwks_file(path))
            except ValueError as exc:
                raise ConfigError(f"auth.jwks_file: {path}: {exc}") from None
        return verifier

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def add_jwks(self, jwks: dict) -> None:
        """Add public keys (a JWKS ``{"keys": [...]}`` or one JWK). ValueError if malformed.

        Re-adding an identical key is a no-op; a different key under a known kid is refused,
        because silently swapping keys would let one key source override another.
        """
        if isinstance(jwks, Mapping) and "kty" in jwks and "keys" not in jwks:
            entries: Any = [jwks]
        elif isinstance(jwks, Mapping) and isinstance(jwks.get("keys"), list):
            entries = jwks["keys"]
        else:
            raise ValueError('expected a JWKS object {"keys": [...]}')
        merged = dict(self._keys)
        added: set[str] = set()
        for index, jwk in enumerate(entries):
            parsed = _load_public_key(jwk, index)
            if parsed is None:
                continue
            old = merged.get(parsed.kid)
            if old is not None:
                if parsed.kid in added:
                    raise ValueError(f"key {parsed.kid!r} appears twice")
                if old.alg != parsed.alg or not _same_key(old.key, parsed.key):
                    raise ValueError(f"key {parsed.kid!r} is already registered "
                                     "with different key material")
            merged[parsed.kid] = parsed
            added.add(parsed.kid)
        self._keys = merged

    def verify(self, token: str) -> Principal:
        """The token's user, or Unauthorized with a short reason.

        A token that verified once is remembered until it expires: every request of a
        client carries the same token, and the signature check is the costliest part of
        a cheap read."""
        hit = self._verified.get(token) if isinstance(token, str) else None
        if hit is not None:
            principal, exp = hit
            if time.time() <= exp + self._leeway_s:
                return principal
            del self._verified[token]
        principal = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (principal, float(principal.claims["exp"]))
        return principal

    def _verify(self, token: str) -> Principal:
        if not isinstance(token, str) or not token:
            raise Unauthorized("Missing token")
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("Token is too large")
        if not token.isascii():
            raise Unauthorized("Malformed token")
        try:
            header = pyjwt.get_unverified_header(token)
        except (pyjwt.PyJWTError, ValueError, TypeError, RecursionError):
            raise Unauthorized("Malformed token") from None
        key, alg = self._select_key(header)
        kid = header.get("kid") if alg != HS256 else None
        try:
            claims = pyjwt.decode(
                token, key, algorithms=[alg], audience=self._audience, issuer=self._issuer,
                leeway=self._leeway_s,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except pyjwt.PyJWTError as exc:
            log.debug("token rejected: %s", type(exc).__name__)
            raise Unauthorized(_reason(exc)) from None
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise Unauthorized("Malformed token") from None
        return _principal(claims, kid=kid, alg=alg)

    def remove_keys(self, kids: Iterable[str]) -> list[str]:
        """Stop trusting these public keys at once (a revoked or expired signing key).
        Remembered verifications are dropped too, so no token of theirs passes from the
        cache. Returns the kids that were removed."""
        gone = [k for k in kids if k in self._keys]
        if gone:
            self._keys = {k: v for k, v in self._keys.items() if k not in gone}
            self._verified = {}
        return gone

    def _select_key(self, header: dict[str, Any]) -> tuple[Any, str]:
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str):
            raise Unauthorized("Malformed token")
        pinned = self._keys.get(kid) if isinstance(kid, str) else None
        if pinned is not None:
            # The key decides the algorithm, never the header: this is what stops
            # "HS256 signed with the public key" and cross-algorithm tricks.
            if alg != pinned.alg:
                raise Unauthorized("Token algorithm does not match its key")
            return pinned.key, pinned.alg
        if alg.lower() == "none":
            raise Unauthorized("Unsigned tokens are not accepted")
        if alg == HS256:
            if self._secret is None:
                raise Unauthorized("HS256 tokens are not accepted")
            # Any kid here is not one of our public keys (checked above), so the HS256
            # path can only ever use the configured secret.
            return self._secret, HS256
        if alg in (ES256, RS256):
            raise Unauthorized("Unknown signing key" if kid else "Token has no key id")
        raise Unauthorized("Token algorithm is not accepted")


def _reason(exc: pyjwt.PyJWTError) -> str:
    # Order matters: several of these subclass each other (e.g. Expired < InvalidToken).
    if isinstance(exc, pyjwt.ExpiredSignatureError):
        return "Token has expired"
    if isinstance(exc, pyjwt.ImmatureSignatureError):
        return "Token is not yet valid"
    if isinstance(exc, pyjwt.InvalidAudienceError):
        return "Token audience is not accepted"
    if isinstance(exc, pyjwt.InvalidIssuerError):
        return "Token issuer is not accepted"
    if isinstance(exc, pyjwt.MissingRequiredClaimError):
        if exc.claim == "sub":
            return "Token has no user (sub); anon and service keys cannot be used here"
        return f"Token is missing the {exc.claim!r} claim"
    if isinstance(exc, pyjwt.exceptions.InvalidSubjectError):
        return "Token subject is not a user id"
    if isinstance(exc, pyjwt.InvalidSignatureError):
        return "Token signature is invalid"
    if isinstance(exc, pyjwt.InvalidAlgorithmError):
        return "Token algorithm is not accepted"
    if isinstance(exc, pyjwt.DecodeError):
        return "Malformed token"
    return "Invalid token"


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _principal(claims: dict[str, Any], *, kid: str | None = None,
               alg: str | None = None) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not _UUID_RE.match(sub):
        raise Unauthorized("Token subject is not a user id")
    return Principal(
        user_id=str(uuid.UUID(sub)),
        email=_opt_str(claims.get("email")),
        role=_opt_str(claims.get("role")),
        session_id=_opt_str(claims.get("session_id")),
        claims=claims,
        kid=kid,
        alg=alg,
    )


def _check_secret_length(secret: str, error: type[Exception] = ConfigError) -> None:
    # Short keys are guessable, and PyJWT would warn on every use of one.
    if len(secret.encode("utf-8")) < MIN_HS256_SECRET_BYTES:
        raise error(f"auth.jwt_secret: the HS256 secret must be at least "
                    f"{MIN_HS256_SECRET_BYTES} bytes long")


def _read_jwks_file(path: str) -> dict:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"auth.jwks_file: cannot read {p}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"auth.jwks_file: {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f'auth.jwks_file: {p} must hold a JSON object {{"keys": [...]}}')
    return data


def issue_token(secret: str, *, user_id: str, email: str | None = None,
                expires_in_s: int = 3600, audience: str = "authenticated",
                issuer: str | None = None, session_id: str | None = None,
                role: str = "authenticated", now: float | None = None,
                app_metadata: dict | None = None, user_metadata: dict | None = None) -> str:
    """An HS256 access token with the claims a Supabase Auth server puts in one.

    ``session_id`` is only included when given, so a later session-revocation check never
    meets a session id that no session row backs.
    """
    if not secret:
        raise ValueError("secret must not be empty")
    _check_secret_length(secret, error=ValueError)
    if not isinstance(user_id, str) or not _UUID_RE.match(user_id):
        raise ValueError("user_id must be a UUID")
    if expires_in_s <= 0:
        raise ValueError("expires_in_s must be positive")
    iat_s = int(time.time() if now is None else now)
    claims: dict[str, Any] = {}
    if issuer:
        claims["iss"] = issuer
    claims.update({
        "aud": audience,
        "exp": iat_s + int(expires_in_s),
        "iat": iat_s,
        "sub": str(uuid.UUID(user_id)),
        "email": email or "",
        "phone": "",
        "app_metadata": app_metadata if app_metadata is not None
        else {"provider": "email", "providers": ["email"]},
        "user_metadata": user_metadata if user_metadata is not None else {},
        "role": role,
        "aal": "aal1",
        "is_anonymous": False,
    })
    if session_id is not None:
        claims["session_id"] = session_id
    return pyjwt.encode(claims, secret, algorithm=HS256)
