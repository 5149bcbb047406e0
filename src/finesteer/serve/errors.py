"""Errors the server answers with, in the OpenAI error shape, so clients show the message."""

from __future__ import annotations

from typing import Any

from finesteer.errors import FinesteerError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
}


class ServeError(FinesteerError, ValueError):
    """A request the server refuses: HTTP status plus OpenAI's `code` and `param` fields."""

    def __init__(self, message: str, status: int = 400, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param


def error_body(
    message: str, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}` as OpenAI returns it."""
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
