"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}``, as vLLM sends them.

``type`` is vLLM's (``BadRequestError``, ``NotFoundError``, ...) and ``code`` the HTTP status.
Every failure the server answers (bad JSON, validation, unknown route, overload, engine
error) goes through ``error_response`` so clients always get the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answered to the client as it is (status, message naming the problem, param)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, err_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.err_type = (
            err_type or ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
        )


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def error_body(
    status: int, message: str, param: str | None = None, err_type: str | None = None
) -> dict[str, Any]:
    err_type = err_type or ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    err_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, param, err_type), status_code=status, headers=headers
    )


def validation_error(errors: Sequence[Any]) -> APIError:
    """A pydantic error list as one 400 naming the first field at fault."""
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return bad_request(f"invalid JSON body: {first.get('msg', '')}")
    if not loc:
        if first.get("type") == "missing":
            return bad_request("the request body is missing (send a JSON object)")
        return bad_request(f"the request body must be a JSON object: {first.get('msg', '')}")
    field = loc[0]
    hint = _UNION_HINTS.get(field)
    if hint is not None and len(loc) > 1:
        return bad_request(f"{field}: {hint}", param=field)
    path = ".".join(loc)
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return bad_request(f"{path}: {first.get('msg', 'invalid value')}{shown}", param=field)


_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "must be a string or a list of strings",
    "messages": "must be a list of {role, content} objects whose content is a string or a list of text parts",
    "tool_choice": 'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
}


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure with the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.err_type)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc.errors())
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError) -> JSONResponse:
        err = validation_error(exc.errors())
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {exc!r}")
