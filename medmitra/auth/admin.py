"""Administration of users and signing keys: the operations behind ``medmitra users ...``
and ``medmitra keys ...`` (the command line itself is medmitra/cli_auth.py).

Each operation runs with the database open. The server sees new users and rotated keys at
once (revocations within the session cache's few seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from medmitra.auth import sessions, users
from medmitra.config import Settings
from medmitra.db.auth_models import AuthUser


class NoSuchUser(LookupError):
    """No account has this email."""

    def __init__(self, email: str):
        super().__init__(f"no user with email {users.normalize_email(email)}")


async def _find(email: str) -> AuthUser:
    user = await users.find_by_email(email)
    if user is None:
        raise NoSuchUser(email)
    return user


async def list_users() -> list[AuthUser]:
    return list(await AuthUser.all().order_by("created_at"))


def user_status(user: AuthUser) -> str:
    return "disabled" if user.disabled_at else "active"


async def disable_user(email: str) -> tuple[AuthUser, int]:
    """Stop a user signing in and end their sessions: (user, sessions ended)."""
    user = await _find(email)
    await users.set_disabled(user, True)
    return user, await sessions.revoke_user_sessions(user.id, "user_disabled")


async def enable_user(email: str) -> AuthUser:
    user = await _find(email)
    await users.set_disabled(user, False)
    return user


async def reset_password(email: str, password: str) -> tuple[AuthUser, int]:
    """Set a new password (``users.WeakPassword`` if refused) and end every session:
    (user, sessions ended)."""
    user = await _find(email)
    await users.set_password(user, password)
    return user, await sessions.revoke_user_sessions(user.id, "password_reset")


async def clear_metadata(email: str) -> tuple[AuthUser, int]:
    """Empty a user's user_metadata (bytes it had): for metadata that made every token too
    large to send, e.g. set before the size limit existed."""
    user = await _find(email)
    size = users.metadata_size(user.user_metadata or {})
    await users.clear_metadata(user)
    return user, size


def keyring(settings: Settings) -> Any:
    from medmitra.auth.signing import KeyRing

    settings.data_path.mkdir(parents=True, exist_ok=True)
    return KeyRing(settings.data_path, token_ttl_s=settings.auth.access_token_ttl_s,
                   leeway_s=settings.auth.leeway_s)


async def rotate_keys(settings: Settings) -> tuple[str, list[str]]:
    """Sign with a new key: (new kid, kids retired; they verify until their tokens expire)."""
    return await keyring(settings).rotate()


async def revoke_key(settings: Settings, kid: str) -> tuple[bool, str | None]:
    """A compromised key: every token it signed is refused from now on (a running server
    within seconds). (found, new signing kid if it was the signing key)."""
    return await keyring(settings).revoke(kid)


@dataclass
class KeyState:
    kid: str
    alg: str
    created_at: datetime
    state: str   # signing | retired, verifies until <time> | expired | REVOKED <time>


async def key_states(settings: Settings) -> list[KeyState]:
    now = datetime.now(timezone.utc)
    out = []
    for k in await keyring(settings).list_keys():
        if k.revoked_at is not None:
            state = f"REVOKED {k.revoked_at.isoformat(timespec='seconds')}"
        elif k.retired_at is None:
            state = "signing"
        elif k.verify_until and k.verify_until > now:
            state = f"retired, verifies until {k.verify_until.isoformat(timespec='seconds')}"
        else:
            state = "expired"
        out.append(KeyState(k.kid, k.alg, k.created_at, state))
    return out
