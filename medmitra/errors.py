"""Exceptions that carry their HTTP status, rendered by one handler (see app.py).

Every error body is ``{"detail": msg, "error": msg}`` (+ optional ``errors`` list),
as the contract's section 1 requires.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 500
    default_message = "Internal server error"

    def __init__(self, message: str | None = None, *, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None):
        self.message = message or self.default_message
        self.errors = errors
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.message, "error": self.message}
        if self.errors:
            out["errors"] = self.errors
        return out


class BadRequest(ApiError):
    status = 400
    default_message = "Bad request"


class Unauthorized(ApiError):
    status = 401
    default_message = "Not authenticated"

    def __init__(self, message: str | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.headers.setdefault("WWW-Authenticate", "Bearer")


class Forbidden(ApiError):
    status = 403
    default_message = "Forbidden"


class NotFound(ApiError):
    status = 404
    default_message = "Not found"


class MethodNotAllowed(ApiError):
    status = 405
    default_message = "Method not allowed"


class PayloadTooLarge(ApiError):
    status = 413
    default_message = "Request body too large"


class UnsupportedMediaType(ApiError):
    status = 415
    default_message = "Unsupported file type"


class TooManyRequests(ApiError):
    status = 429
    default_message = "Too many requests"


class InsufficientStorage(ApiError):
    # 507 is the honest answer to "the disk is full"; clients treat it as a server-side
    # condition that a retry later may fix.
    status = 507
    default_message = "Not enough storage space on the server"


class ServiceUnavailable(ApiError):
    status = 503
    default_message = "Service not ready"


def field_error(field: str, msg: str, where: str = "form") -> BadRequest:
    return BadRequest(f"{field}: {msg}", errors=[{"loc": [where, field], "msg": msg}])
