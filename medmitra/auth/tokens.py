"""Revocable access tokens made by the CLI (``medmitra token create``).

Every such token is an ES256 token signed by the server's own key ring (so the server knows
it signed it, by its ``kid``) and carries a ``session_id`` that names a row in
``auth_api_tokens``. The case API checks that row like a sign-in session: ``tokens revoke``,
``users disable`` and ``users reset-password`` refuse the token at once (within the session
cache's few seconds when done from another process).
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from medmitra.db.auth_models import AuthApiToken

if TYPE_CHECKING:
    from medmitra.auth.signing import KeyRing

# The longest lifetime ``token create`` grants. Every token is revocable, but a short life is
# still the better default for a token an operator pastes into scripts.
MAX_API_TOKEN_TTL_S = 366 * 86400
MAX_LABEL_CHARS = 200


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


async def create_api_token(keyring: "KeyRing", *, user_id: str, email: str | None,
                           expires_in_s: int, audience: str, issuer: str,
                           label: str | None = None) -> tuple[str, AuthApiToken]:
    """Record a token row, then sign a token naming it. Returns (token, row)."""
    if not 1 <= expires_in_s <= MAX_API_TOKEN_TTL_S:
        raise ValueError(f"expires_in_s must be between 1 and {MAX_API_TOKEN_TTL_S}")
    user_id = str(uuid.UUID(user_id))
    now_s = int(time.time())
    now = datetime.fromtimestamp(now_s, timezone.utc)
    key = await keyring.current()
    row = await AuthApiToken.create(
        id=str(uuid.uuid4()), user_id=user_id, label=(label or None) and label[:MAX_LABEL_CHARS],
        kid=key.kid, created_at=now, expires_at=now + timedelta(seconds=expires_in_s))
    claims = {
        "iss": issuer,
        "aud": audience,
        "exp": now_s + expires_in_s,
        "iat": now_s,
        "sub": user_id,
        "email": email or "",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {},
        "role": "authenticated",
        "aal": "aal1",
        "amr": [{"method": "token", "timestamp": now_s}],
        "session_id": row.id,
        "is_anonymous": False,
    }
    return await keyring.sign(claims), row


async def revoke_api_tokens(*, user_id: str | None = None, token_id: str | None = None,
                            reason: str) -> int:
    """Revoke one token (by id) or every token of a user. Returns how many were revoked."""
    if user_id is None and token_id is None:
        raise ValueError("name a user or a token")
    query = AuthApiToken.filter(revoked_at=None)
    if user_id is not None:
        query = query.filter(user_id=user_id)
    if token_id is not None:
        query = query.filter(id=token_id)
    return await query.update(revoked_at=_utcnow(), revoke_reason=reason[:32])


async def list_api_tokens(user_id: str | None = None) -> list[AuthApiToken]:
    query = AuthApiToken.all()
    if user_id is not None:
        query = query.filter(user_id=user_id)
    return list(await query.order_by("created_at"))
