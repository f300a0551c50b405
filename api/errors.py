"""One JSON error shape for every failure, so clients never parse HTML or a stack trace."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, json
from werkzeug.exceptions import HTTPException


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with its HTTP status."""

    status = 400
    code = "invalid_parameter"

    def __init__(
        self,
        message: str,
        *,
        parameter: str | None = None,
        status: int | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.parameter = parameter
        self.headers = headers or {}
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class InvalidParameter(ApiError):
    """A query parameter is missing, malformed or out of range (400)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}", parameter=parameter)


class InvalidQueryString(ApiError):
    """Raw bytes in the query string that are not UTF-8 (400): no parameter can be read."""

    code = "invalid_query_string"

    def __init__(self) -> None:
        super().__init__("the query string is not UTF-8: percent-encode its non-ASCII "
                         "characters as UTF-8 bytes (%C3%A9 for \u00e9)")


def error_body(status: int, code: str, message: str, parameter: str | None = None) -> bytes:
    err: dict[str, Any] = {"status": status, "code": code, "message": message}
    if parameter is not None:
        err["parameter"] = parameter
    rid = g.get("request_id") if g else None
    if rid:
        err["request_id"] = rid
    return json.dumps({"error": err}).encode()


def error_response(
    status: int,
    code: str,
    message: str,
    parameter: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    resp = Response(error_body(status, code, message, parameter), status=status,
                    mimetype="application/json")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    429: "rate_limited",
}


def register(app: Flask) -> None:
    """JSON for ApiError, for werkzeug's HTTP errors, and a bare 500 for anything else."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.parameter, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = exc.description or exc.name
        if status == 429:
            message = f"rate limit exceeded ({exc.description})"
        resp = error_response(status, code, message)
        if status == 405 and exc.response is None:
            allow = getattr(exc, "valid_methods", None)
            if allow:
                resp.headers["Allow"] = ", ".join(allow)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        logging.getLogger("aicrm.api").error("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error")
