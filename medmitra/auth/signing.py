"""ES256 signing keys for the tokens this server issues.

A key is generated at first start: its private half is a PEM file in
``<data_dir>/auth_keys/<kid>.pem`` (mode 0600, written atomically), its public half a row in
``auth_signing_keys``, published at ``/auth/v1/.well-known/jwks.json``. Rotation makes a new
key the signer; the old one stops signing at once (its private file is deleted) but stays
published and accepted until every token it signed has expired (``verify_until``).

The server looks up the current key on every token issue (one indexed query), so a rotation
done by the CLI while the server runs takes effect without a restart.

Revocation (``keys revoke KID``) is for a compromised key: the key stops being published and
the running server stops trusting it within ``KEY_SYNC_S`` (``watch`` re-reads the key table),
so every token it signed is refused at once. The same re-read drops retired keys whose
``verify_until`` has passed, and picks up keys a CLI process created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from medmitra.auth.jwt import ES256
from medmitra.auth.keys import _write_new   # atomic 0600 create (shared with the HS256 secret)
from medmitra.db.auth_models import AuthSigningKey

log = logging.getLogger(__name__)

KEYS_DIR_NAME = "auth_keys"
KEYS_DIR_MODE = 0o700
# How often the server re-reads the key table (new, revoked and expired keys).
KEY_SYNC_S = 2.0


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey
    public_jwk: dict


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def public_jwk(private_key: ec.EllipticCurvePrivateKey, kid: str) -> dict:
    jwk = ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    # key_ops/alg/use let WebCrypto (supabase-js getClaims) import it for verify only.
    jwk.update({"kid": kid, "alg": ES256, "use": "sig", "key_ops": ["verify"]})
    return jwk


class KeyRing:
    def __init__(self, data_dir: Path, *, token_ttl_s: int, leeway_s: int,
                 verifier: Any = None):
        self.keys_dir = Path(data_dir) / KEYS_DIR_NAME
        self._token_ttl_s = token_ttl_s
        self._leeway_s = leeway_s
        self._verifier = verifier      # TokenVerifier of the case API, kept in sync
        self._current: SigningKey | None = None
        # Every kid of the key table (revoked ones too): a token naming one was signed here.
        self.known_kids: frozenset[str] = frozenset()

    def _pem_path(self, kid: str) -> Path:
        return self.keys_dir / f"{kid}.pem"

    async def _create_key(self) -> SigningKey:
        kid = str(uuid.uuid4())
        private_key = ec.generate_private_key(ec.SECP256R1())
        pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode("ascii")
        self.keys_dir.mkdir(mode=KEYS_DIR_MODE, parents=True, exist_ok=True)
        # The file first, then the row: a row never names a key that cannot sign.
        if not _write_new(self._pem_path(kid), pem):
            raise RuntimeError(f"signing key file for {kid} already exists")
        jwk = public_jwk(private_key, kid)
        await AuthSigningKey.create(kid=kid, alg=ES256, public_jwk=jwk, created_at=_utcnow())
        log.info("created ES256 signing key %s", kid)
        return SigningKey(kid, private_key, jwk)

    def _load(self, row: AuthSigningKey) -> SigningKey | None:
        try:
            data = self._pem_path(row.kid).read_bytes()
            key = serialization.load_pem_private_key(data, password=None)
        except (OSError, ValueError) as exc:
            log.warning("signing key %s cannot be loaded (%s)", row.kid, type(exc).__name__)
            return None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            log.warning("signing key %s is not an EC key", row.kid)
            return None
        return SigningKey(row.kid, key, row.public_jwk)

    async def current(self) -> SigningKey:
        """The key that signs now (created on first use)."""
        row = await AuthSigningKey.filter(retired_at=None, revoked_at=None) \
            .order_by("-created_at").first()
        if row is not None and self._current is not None and self._current.kid == row.kid:
            return self._current
        key = self._load(row) if row is not None else None
        if key is None:
            if row is not None:
                # The private file is gone (partial restore?): retire the row, start afresh.
                await self._retire([row.kid])
            key = await self._create_key()
        self._current = key
        self.known_kids = self.known_kids | {key.kid}
        self._sync_verifier()
        return key

    async def _retire(self, kids: list[str]) -> None:
        now = _utcnow()
        until = now + timedelta(seconds=self._token_ttl_s + self._leeway_s)
        await AuthSigningKey.filter(kid__in=kids, retired_at=None).update(
            retired_at=now, verify_until=until)
        for kid in kids:
            # A retired key never signs again, so its private half has no use left.
            with contextlib.suppress(FileNotFoundError):
                self._pem_path(kid).unlink()

    async def rotate(self) -> tuple[str, list[str]]:
        """Make a new signing key; returns (new kid, retired kids)."""
        old = list(await AuthSigningKey.filter(retired_at=None).values_list("kid", flat=True))
        key = await self._create_key()
        await self._retire([k for k in old if k != key.kid])
        self._current = key
        self.known_kids = self.known_kids | {key.kid}
        self._sync_verifier()
        return key.kid, old

    async def revoke(self, kid: str) -> tuple[bool, str | None]:
        """Refuse every token ``kid`` signed, from now on (a compromised key). If it was the
        signing key, a new one signs from now. Returns (found, new signing kid or None)."""
        row = await AuthSigningKey.get_or_none(kid=kid)
        if row is None:
            return False, None
        new_kid = None
        if row.retired_at is None and row.revoked_at is None:
            new_kid, _ = await self.rotate()
        now = _utcnow()
        await AuthSigningKey.filter(kid=kid, revoked_at=None).update(revoked_at=now)
        await AuthSigningKey.filter(kid=kid, retired_at=None).update(retired_at=now)
        with contextlib.suppress(FileNotFoundError):
            self._pem_path(kid).unlink()
        if self._verifier is not None:
            self._verifier.remove_keys([kid])
        log.warning("signing key %s revoked: every token it signed is refused", kid)
        return True, new_kid

    async def sync(self) -> list[str]:
        """Make the verifier trust exactly the published keys: add new ones (a CLI made
        them), drop revoked and expired ones. Returns the kids dropped."""
        rows = await AuthSigningKey.all()
        self.known_kids = frozenset(r.kid for r in rows)
        published = await self.published(rows)
        if self._verifier is None:
            return []
        keep = {r.kid for r in published}
        dropped = self._verifier.remove_keys(k for k in self.known_kids if k not in keep)
        if published:
            self._verifier.add_jwks({"keys": [dict(r.public_jwk) for r in published]})
        for kid in dropped:
            log.info("signing key %s is no longer accepted", kid)
        return dropped

    async def watch(self, interval_s: float = KEY_SYNC_S) -> None:
        """Run ``sync`` every ``interval_s`` until cancelled (the server's background task)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # a database hiccup: try again at the next tick
                log.warning("signing key sync failed: %s", type(exc).__name__)

    async def published(self, rows: list[AuthSigningKey] | None = None
                        ) -> list[AuthSigningKey]:
        """Keys whose tokens may still be valid: current ones and recently retired ones,
        never revoked ones."""
        now = _utcnow()
        if rows is None:
            rows = list(await AuthSigningKey.all())
        rows = sorted(rows, key=lambda r: r.created_at, reverse=True)
        return [r for r in rows if r.revoked_at is None and (
            r.retired_at is None or (r.verify_until is not None and r.verify_until > now))]

    async def jwks(self) -> dict:
        return {"keys": [dict(r.public_jwk) for r in await self.published()]}

    def _sync_verifier(self) -> None:
        if self._verifier is not None and self._current is not None:
            self._verifier.add_jwks({"keys": [self._current.public_jwk]})

    async def start(self) -> str:
        """At server start: make sure a key exists and the case API trusts every published
        key (tokens signed before a rotation or a restart stay valid)."""
        key = await self.current()
        await self.sync()
        return key.kid

    async def sign(self, claims: dict) -> str:
        key = await self.current()
        return pyjwt.encode(claims, key.private_key, algorithm=ES256,
                            headers={"kid": key.kid, "typ": "JWT"})

    async def list_keys(self) -> list[AuthSigningKey]:
        return list(await AuthSigningKey.all().order_by("created_at"))
