"""Bounds on what a request may cost before any of it is parsed or run.

- request bodies are capped (`--max-body-bytes`): FastAPI reads and parses a whole body before
  any validator sees it, so a bounded body is what bounds parsing time, memory and the number
  of interventions a spec can list;
- errors Starlette raises itself (a body that is not JSON, nested too deep to parse, an unknown
  route) come back in OpenAI's error format like every other error.

What a steering spec may ask is checked in one place, steering/spec.py's `resolve`.
"""

from __future__ import annotations

import os
from http import HTTPStatus

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import openai_error

MAX_BODY_ENV = "STEERSERVE_MAX_BODY_BYTES"  # set by `steerserve serve --max-body-bytes`
DEFAULT_MAX_BODY = 4 << 20  # ~250x the JSON of the longest prompt --max-model-len 4096 allows


def max_body_bytes() -> int:
    return int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY))


class BodyLimit:
    """Refuses (413) a request body over `max_bytes`, by its Content-Length or, when it is sent
    chunked, once that many bytes have arrived; the app gets the body replayed otherwise."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        body: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            body.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            # The body as it came, then the real channel (vLLM listens there for disconnects).
            return body.pop(0) if body else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body over {self.max_bytes} bytes"
        response = openai_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message, "body", "RequestTooLargeError")
        await response(scope, receive, send)


async def http_error(raw_request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors ({"detail": ...} by default) in OpenAI's error format."""
    param = "body" if exc.status_code == HTTPStatus.BAD_REQUEST else None
    return openai_error(HTTPStatus(exc.status_code), str(exc.detail), param)
