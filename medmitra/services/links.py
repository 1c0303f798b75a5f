"""Signed, expiring download links for ``file_url``.

The original frontend opens ``file_url`` in a new tab, without an Authorization header, so
the link itself carries the permission: an HMAC-signed token naming one file and its owner,
valid for ``limits.file_url_ttl_s``. A token for one file never opens another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import time
import uuid

# Token layout (url-safe base64, no padding): 16 bytes file UUID | 16 bytes owner UUID |
# 8 bytes expiry (unix seconds, big-endian) | 16 bytes truncated HMAC-SHA256.
_BODY = struct.Struct(">16s16sQ")
_MAC_BYTES = 16


class LinkSigner:
    def __init__(self, secret: str, ttl_s: int):
        # A key of its own, derived from the server secret, so a file link can never be
        # replayed as an access token or vice versa.
        self._key = hmac.new(secret.encode(), b"medmitra-file-url-v1", hashlib.sha256).digest()
        self.ttl_s = ttl_s

    def sign(self, file_id: str, user_id: str, *, now: float | None = None) -> str:
        exp = int((now or time.time()) + self.ttl_s)
        body = _BODY.pack(uuid.UUID(file_id).bytes, uuid.UUID(user_id).bytes, exp)
        mac = hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode()

    def verify(self, token: str, *, now: float | None = None) -> tuple[str, str] | None:
        """(file_id, user_id) for a valid unexpired token, else None."""
        if not token or len(token) > 128 or not token.isascii():
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) != _BODY.size + _MAC_BYTES:
            return None
        body, mac = raw[:_BODY.size], raw[_BODY.size:]
        if not hmac.compare_digest(hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES], mac):
            return None
        fid, uid, exp = _BODY.unpack(body)
        if exp < (now or time.time()):
            return None
        return str(uuid.UUID(bytes=fid)), str(uuid.UUID(bytes=uid))
