"""Mayak's error hierarchy and the one flat error shape every API answers with.

Every refusal is ``{"type", "code", "message", "param"}`` (the Agentic Commerce Protocol's shape):
``type`` groups errors, ``code`` is stable and documented in ``docs/errors.md``, ``param`` is a JSON
path to the offending field (``$.batch[3].timestamp``) or null.
"""

from __future__ import annotations

from typing import Any


class MayakError(Exception):
    """Base of every error Mayak raises on purpose."""

    type = "api_error"
    status = 500

    def __init__(self, code: str, message: str, param: str | None = None, *, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "code": self.code, "message": self.message, "param": self.param}


class InvalidRequest(MayakError):
    """The request (or one event in it) is malformed; fix it before retrying."""

    type = "invalid_request"
    status = 400


class PayloadTooLarge(InvalidRequest):
    status = 413


class UnsupportedMediaType(InvalidRequest):
    status = 415


class AuthenticationError(MayakError):
    """No key, an unknown key or a revoked key."""

    type = "authentication_error"
    status = 401


class PermissionDenied(MayakError):
    """A valid key used where it is not allowed (a secret key for ingestion, a write key for admin)."""

    type = "permission_error"
    status = 403


class NotFound(MayakError):
    type = "invalid_request"
    status = 404

    def __init__(self, what: str, param: str | None = None):
        super().__init__("not_found", f"{what} not found", param)


class Conflict(MayakError):
    type = "invalid_request"
    status = 409


class StorageError(MayakError):
    """The database failed; the request may be retried."""

    type = "api_error"
    status = 503


class EventRejected(Exception):
    """One event of a batch is invalid; carries the code and path within that event."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
