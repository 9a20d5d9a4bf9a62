"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable", 504: "timeout"}

_BODY_UNPARSEABLE = "There was an error parsing the body"


class OpenAIError(Exception):
    """An error the client sees as-is; raised anywhere in the request path."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param, code)


def validation_error(exc: RequestValidationError) -> OpenAIError:
    """pydantic/FastAPI's 422 becomes a 400 naming the first offending parameter, as vLLM does."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}",
                           code="invalid_json")
    if kind == "missing" and not loc:
        return bad_request("the request needs a JSON object body")
    if kind == "extra_forbidden":
        return bad_request(f"unknown or unsupported option '{param}'", param=param, code="unsupported_parameter")
    if kind == "missing":
        return bad_request(f"'{param}' is required", param=param)
    if not loc and kind.endswith("_type"):
        return bad_request("the request body must be a JSON object")
    return bad_request(f"invalid value for '{param}': {err.get('msg')}" if param else str(err.get("msg")),
                       param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _BODY_UNPARSEABLE:  # FastAPI's words for bytes json refuses
            return bad_request("malformed JSON body: not valid UTF-8 JSON", code="invalid_json").response()
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return OpenAIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in the proxy")
        return OpenAIError(500, f"internal error: {type(exc).__name__}").response()
