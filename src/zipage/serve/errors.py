"""Errors in OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, with the right status.

Bad input is a 400 naming the field (pydantic's validation errors included: FastAPI's default
would be a 422), a missing or wrong key a 401, an unknown model a 404, a full waiting queue a
429. Only a fault of the server itself is a 500.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("zipage.serve")

# OpenAI's error types: a wrong key and an unknown model are invalid requests too (their codes tell them apart)
TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error to answer with OpenAI's body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def _encodable(text: str | None) -> str | None:
    """``text`` with what UTF-8 cannot encode (lone surrogates a client sent as JSON escapes) escaped: the
    error's body must still be written."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=_encodable(message), type=TYPES.get(status, "invalid_request_error"),
                                         param=_encodable(param), code=code)).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


_FIELD = re.compile(r"SamplingParams\.(\w+)")


def bad_request(e: Exception, prompt_field: str) -> APIError:
    """A 400 for what the engine refused (``ValueError``/``TypeError`` of ``LLM.add_request``), naming
    the field its message names."""
    message = str(e)
    m = _FIELD.search(message)
    if m:
        param = m.group(1)
    elif "pages" in message or "max_tokens" in message:
        param = "max_tokens"
    else:
        param = prompt_field
    return APIError(400, message, param=param)


def _validation_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc[1:]] if loc and loc[0] == "body" else [str(p) for p in loc]
    return parts[0] if parts else None


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return error_response(e.status, e.message, e.param, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg', '')}", None, "json_invalid")
        param = _validation_param(loc)
        where = ".".join(str(p) for p in loc[1:]) or "body"
        message = f"{where}: {first.get('msg', 'invalid value')}"
        if "input" in first and param is not None and not isinstance(first["input"], dict):
            message += f" (got {str(first['input'])[:80]!r})"
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else HTTPStatus(e.status_code).phrase
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))  # (a 405's Allow)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, f"internal server error: {type(e).__name__}")
