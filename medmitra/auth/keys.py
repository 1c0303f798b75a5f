"""The HS256 secret: the configured one, else a random one kept in the data dir.

An offline clinic has no Supabase project, so on first start we create a secret and keep it
in ``<data_dir>/jwt_secret`` (mode 0600) so tokens survive restarts. The secret is never
logged.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from medmitra.atomicfile import write_atomic
from medmitra.config import ConfigError

log = logging.getLogger(__name__)

SECRET_FILE_NAME = "jwt_secret"
SECRET_RANDOM_BYTES = 64
SECRET_FILE_MODE = 0o600


def load_or_create_secret(data_dir: Path, configured: str) -> str:
    """``configured`` if non-empty, else the secret in ``data_dir/jwt_secret`` (created once)."""
    if configured:
        return configured
    data_dir = Path(data_dir)
    path = data_dir / SECRET_FILE_NAME
    existing = _read_secret(path)
    if existing is not None:
        return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(SECRET_RANDOM_BYTES)
    if _write_new(path, secret):
        log.info("created a new local JWT secret in %s", path)
        return secret
    # Another process created the file between our read and our write: use theirs, so
    # every process signs with the same secret.
    existing = _read_secret(path)
    if existing is None:
        raise ConfigError(f"auth.jwt_secret: {path} vanished while being created")
    return existing


def _read_secret(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"auth.jwt_secret: cannot read {path}: {exc}") from None
    secret = text.strip()
    if not secret:
        # Never silently replace it: tokens may exist that a new secret would invalidate.
        raise ConfigError(f"auth.jwt_secret: {path} is empty; delete it to create a new one")
    if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("%s is readable by other users; chmod 600 it", path)
    return secret


def _write_new(path: Path, secret: str) -> bool:
    """Atomically create ``path`` holding ``secret`` (mode 0600 from the first byte);
    False if it already exists (a concurrent process created it first)."""
    try:
        write_atomic(path, secret, mode=SECRET_FILE_MODE, exclusive=True)
    except FileExistsError:
        return False
    return True
