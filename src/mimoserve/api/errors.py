"""The one place errors become HTTP responses, all in the contract's error body."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mimoserve.errors import ClientDisconnected, MimoError, StoreUnavailableError
from mimoserve.protocol.chat import ErrorBody, ErrorDetail
from mimoserve.store.base import StoreError

log = logging.getLogger(__name__)

_HTTP_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}


def error_body(error: MimoError) -> dict[str, object]:
    detail = ErrorDetail(
        message=error.message, type=error.error_type, param=error.param, code=error.code
    )
    return ErrorBody(error=detail).model_dump()


def error_response(error: MimoError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status_code, headers=error.headers)


async def _on_mimo_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MimoError)
    if exc.status_code >= 500:
        log.warning("request failed: %s (%s)", exc.message, exc.code)
    return error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = (
        f"Unknown route: {request.method} {request.url.path}"
        if exc.status_code == 404
        else str(exc.detail)
    )
    body = ErrorBody(
        error=ErrorDetail(
            message=message,
            type=_HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error"),
            code="not_found" if exc.status_code == 404 else None,
        )
    )
    return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)


async def _on_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"][1:]) or None
    body = ErrorBody(
        error=ErrorDetail(
            message=f"{param}: {first['msg']}" if param else str(first["msg"]),
            type="invalid_request_error",
            param=param,
            code="invalid_value",
        )
    )
    return JSONResponse(body.model_dump(), status_code=400)


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    # Details go to the log, never to the client.
    log.exception("unhandled error", exc_info=exc)
    body = ErrorBody(
        error=ErrorDetail(
            message="Internal server error.", type="server_error", code="internal_error"
        )
    )
    return JSONResponse(body.model_dump(), status_code=500)


def store_unavailable(exc: Exception) -> StoreUnavailableError:
    """What a client is told when the store fails: the driver's message may name hosts or
    queries, so it goes to the log, not the client."""
    log.warning("store unavailable: %s", exc)
    return StoreUnavailableError("The store is unavailable; retry shortly.", retry_after_s=2)


async def _on_store_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(store_unavailable(exc))


async def _on_client_gone(_: Request, exc: Exception) -> Response:
    # Nobody reads this answer; 499 (nginx's "client closed request") keeps access logs honest.
    return Response(status_code=499)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ClientDisconnected, _on_client_gone)
    app.add_exception_handler(MimoError, _on_mimo_error)
    app.add_exception_handler(StoreError, _on_store_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
