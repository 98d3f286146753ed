"""OpenAI-format error responses: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse


def openai_error(status: HTTPStatus, message: str, param: str | None = None, type_: str | None = None) -> JSONResponse:
    error = {
        "message": message,
        "type": type_ or ("BadRequestError" if status == HTTPStatus.BAD_REQUEST else status.phrase.replace(" ", "")),
        "param": param,
        "code": status.value,
    }
    return JSONResponse({"error": error}, status_code=status.value)


class APIError(Exception):
    """Raised from a route or dependency; answered in OpenAI's error format (see `api_error_handler`)."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.param, self.type_ = status, param, type_


async def api_error_handler(request, exc: APIError) -> JSONResponse:
    return openai_error(exc.status, str(exc), exc.param, exc.type_)


def field_path(loc: tuple) -> str:
    """pydantic's ('features', 0, 'mode') as 'features[0].mode', the form steering errors use."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path
