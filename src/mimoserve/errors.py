"""One exception hierarchy for everything the API can refuse or fail at.

Each class carries the HTTP status and the contract's `type`/`code`, so the single
handler in `api/errors.py` renders any of them without looking at message text.
"""

from __future__ import annotations


class MimoError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}


class InvalidRequestError(MimoError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_value"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"

    def __init__(self, message: str, *, prompt_tokens: int, limit: int, param: str) -> None:
        super().__init__(message, param=param)
        self.prompt_tokens, self.limit = prompt_tokens, limit


class AuthenticationError(MimoError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(MimoError):
    status_code = 403
    error_type = "permission_error"
    default_code = "model_not_allowed"


class NotFoundError(MimoError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class PayloadTooLargeError(MimoError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class OverloadedError(MimoError):
    """The server is busy (queue full) or not ready; the client should retry later."""

    status_code = 503
    error_type = "server_error"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class StoreUnavailableError(OverloadedError):
    """The database behind keys or limits does not answer; clients retry, nothing is lost."""

    default_code = "store_unavailable"


class EngineError(MimoError):
    """The engine failed while generating."""

    status_code = 500
    error_type = "server_error"
    default_code = "engine_error"


class ClientDisconnected(Exception):
    """The client went away; the request's work is abandoned (not an API error)."""
