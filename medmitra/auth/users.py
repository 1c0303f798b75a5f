"""Users of the local auth subset: argon2id password hashes, case-insensitive unique email.

Hashing is memory-hard on purpose (argon2id with OWASP's recommended minimum: 19 MiB,
2 passes, 1 lane -- about 0.1 s on a small clinic box), so it runs in a worker thread, and at
most ``HASH_CONCURRENCY`` hashes run at once: a burst of sign-ins must not pin every core or
allocate unbounded memory.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
import weakref
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from tortoise.exceptions import IntegrityError

from medmitra.db.auth_models import AuthUser

# Supabase's own minimum is 6; a clinic server holding patient data asks for a little more.
MIN_PASSWORD_CHARS = 8
# argon2 input is bounded so one request cannot make the server hash megabytes.
MAX_PASSWORD_CHARS = 1024
MAX_EMAIL_CHARS = 320
# user_metadata is free-form client data copied into every access token: bounded so a token
# always fits the server's 8 KiB request-header limit (4 KiB of JSON is ~5.5 KiB in base64).
MAX_USER_METADATA_BYTES = 4 * 1024
HASH_CONCURRENCY = 2
COMMON_PASSWORDS_FILE = "common_passwords.txt"

# No control characters or lone surrogates either: PostgreSQL cannot store them in text
# (and refuses the query), SQLite cannot encode surrogates.
_EMAIL_CHAR = r"[^@\s\x00-\x1f\x7f\ud800-\udfff]"
_EMAIL_RE = re.compile(rf"^{_EMAIL_CHAR}+@{_EMAIL_CHAR}+\.{_EMAIL_CHAR}+$")
ARGON2_MEMORY_KIB = 19 * 1024
ARGON2_TIME_COST = 2
ARGON2_LANES = 1
_hasher = PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB,
                         parallelism=ARGON2_LANES)   # argon2id is argon2-cffi's default type
# One semaphore per event loop (tests run several servers, each on its own loop).
_hash_slots: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = (
    weakref.WeakKeyDictionary())


class UserExists(Exception):
    """A user with this email is already registered."""


class WeakPassword(ValueError):
    """The password does not meet the rules (length, not a common password). ``reason`` is
    GoTrue's word for the rule: "length" or "pwned"."""

    def __init__(self, message: str, *, reason: str = "length"):
        super().__init__(message)
        self.reason = reason


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def normalize_email(email: str) -> str:
    """The stored form: trimmed and lower-cased, so uniqueness ignores case."""
    return email.strip().lower()


def valid_email(email: str) -> bool:
    return len(email) <= MAX_EMAIL_CHARS and bool(_EMAIL_RE.match(email))


def metadata_size(metadata: Any) -> int:
    """Bytes of the metadata as it is written into a token (compact, ASCII-escaped JSON)."""
    return len(json.dumps(metadata, separators=(",", ":")))


async def clear_metadata(user: AuthUser) -> None:
    user.user_metadata = {}
    user.updated_at = utcnow()
    await user.save(update_fields=["user_metadata", "updated_at"])


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The 10,000 most common passwords (list file shipped in the package; source and
    licence in its header)."""
    text = (Path(__file__).resolve().parent / COMMON_PASSWORDS_FILE).read_text("utf-8")
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise WeakPassword(f"Password should be at least {MIN_PASSWORD_CHARS} characters.")
    if len(password) > MAX_PASSWORD_CHARS:
        raise WeakPassword(f"Password should be at most {MAX_PASSWORD_CHARS} characters.")
    if password.lower() in common_passwords():
        raise WeakPassword("Password is one of the most commonly used passwords; "
                           "choose another.", reason="pwned")


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    # Verified against for unknown emails so they cost the same time as a wrong password.
    return _hasher.hash(uuid.uuid4().hex)


def _verify_sync(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


async def _in_thread(fn: Any, *args: Any) -> Any:
    loop = asyncio.get_running_loop()
    slots = _hash_slots.get(loop)
    if slots is None:
        slots = _hash_slots[loop] = asyncio.Semaphore(HASH_CONCURRENCY)
    async with slots:
        return await loop.run_in_executor(None, fn, *args)


async def hash_password(password: str) -> str:
    return await _in_thread(_hasher.hash, password)


async def warm_up() -> None:
    """Compute the dummy hash before the first sign-in, so that one is not slower."""
    await _in_thread(_dummy_hash)


async def authenticate(email: str, password: str) -> AuthUser | None:
    """The user if the password matches, else None. Unknown emails cost one hash too, so
    the answer and its timing do not reveal which emails exist. Disabled users are returned
    (the caller says "banned" only to someone who knows the password)."""
    user = None
    if valid_email(normalize_email(email)) and len(password) <= MAX_PASSWORD_CHARS:
        user = await AuthUser.get_or_none(email=normalize_email(email))
    ok = await _in_thread(_verify_sync, user.password_hash if user else None,
                          password[:MAX_PASSWORD_CHARS])
    if not ok or user is None:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        # Hash parameters were raised since this password was set: upgrade it now that we
        # know the plain text.
        user.password_hash = await hash_password(password)
        await user.save(update_fields=["password_hash"])
    return user


async def create_user(email: str, password: str, *, role: str = "authenticated",
                      user_metadata: dict | None = None) -> AuthUser:
    norm = normalize_email(email)
    if not valid_email(norm):
        raise ValueError("Unable to validate email address: invalid format")
    check_password_rules(password)
    if await AuthUser.exists(email=norm):
        raise UserExists("User already registered")
    password_hash = await hash_password(password)
    now = utcnow()
    try:
        return await AuthUser.create(
            id=str(uuid.uuid4()), email=norm, password_hash=password_hash, role=role,
            app_metadata={}, user_metadata=user_metadata or {},
            email_confirmed_at=now, created_at=now, updated_at=now)
    except IntegrityError:   # a concurrent create of the same email won the race
        raise UserExists("User already registered") from None


async def set_password(user: AuthUser, password: str) -> None:
    check_password_rules(password)
    user.password_hash = await hash_password(password)
    user.updated_at = utcnow()
    await user.save(update_fields=["password_hash", "updated_at"])


async def password_matches(user: AuthUser, password: str) -> bool:
    return await _in_thread(_verify_sync, user.password_hash, password[:MAX_PASSWORD_CHARS])


async def find_by_email(email: str) -> AuthUser | None:
    return await AuthUser.get_or_none(email=normalize_email(email))


async def set_disabled(user: AuthUser, disabled: bool) -> None:
    user.disabled_at = utcnow() if disabled else None
    user.updated_at = utcnow()
    await user.save(update_fields=["disabled_at", "updated_at"])


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(timezone.utc).isoformat() if value else None


def user_json(user: AuthUser, audience: str) -> dict[str, Any]:
    """The user object supabase-js expects (``User`` in auth-js types)."""
    app_metadata = {"provider": "email", "providers": ["email"], **(user.app_metadata or {})}
    return {
        "id": user.id,
        "aud": audience,
        "role": user.role,
        "email": user.email,
        "email_confirmed_at": _iso(user.email_confirmed_at),
        "phone": "",
        "confirmed_at": _iso(user.email_confirmed_at),
        "last_sign_in_at": _iso(user.last_sign_in_at),
        "app_metadata": app_metadata,
        "user_metadata": user.user_metadata or {},
        "identities": [],
        "created_at": _iso(user.created_at),
        "updated_at": _iso(user.updated_at),
        "is_anonymous": False,
    }
