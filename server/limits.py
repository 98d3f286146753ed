"""Bounds on what a request may cost before any of it is parsed or run.

- request bodies are capped (`--max-body-bytes`): FastAPI reads and parses a whole body before
  any validator sees it, so a bounded body is what bounds parsing time, memory and the number
  of interventions a spec can list;
- errors Starlette raises itself (a body that is not JSON, nested too deep to parse, an unknown
  route) come back in OpenAI's error format like every other error;
- a steering spec is checked for what steering/spec.py's resolution leaves open: a `scale` or
  `prompt_scale` that carries a strength past `--max-strength`, a feature steered twice, and
  unit `norm` on a feature whose decoder direction is zero (a division by zero there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from http import HTTPStatus

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from features.sae import SAE
from server.errors import openai_error
from steering.spec import SteeringError, SteeringLimits, SteeringSpec

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


def check_spec(spec: SteeringSpec, saes: Mapping[str, SAE], limits: SteeringLimits) -> None:
    """Raises SteeringError (400) for what resolution would accept or crash on; features with an
    unknown SAE or index are left to resolution, which names them."""
    if len(spec.features) > limits.max_features:
        return  # resolution refuses it by its count, whatever else is wrong with it
    seen: dict[tuple[str, int], int] = {}
    for n, feature in enumerate(spec.features):
        where = f"steering.features[{n}]"
        key = (feature.sae, feature.index)
        if key in seen:
            raise SteeringError(
                where, f"feature {feature.sae}:{feature.index} is already steered by features[{seen[key]}]; give it once"
            )
        seen[key] = n
        scaled = feature.strength * spec.scale
        if abs(feature.strength) <= limits.max_strength < abs(scaled):
            raise SteeringError(
                "steering.scale",
                f"scale {spec.scale} takes features[{n}].strength to {scaled}; "
                f"|strength x scale| must be at most {limits.max_strength}",
            )
        if abs(scaled) <= limits.max_strength < abs(scaled * spec.prompt_scale):
            raise SteeringError(
                "steering.prompt_scale",
                f"prompt_scale {spec.prompt_scale} takes features[{n}].strength to {scaled * spec.prompt_scale} on the "
                f"prompt; |strength x scale x prompt_scale| must be at most {limits.max_strength}",
            )
        sae = saes.get(feature.sae)
        if feature.unit == "norm" and sae is not None and feature.index < sae.cfg.d_sae:
            if not float(sae.W_dec[feature.index].norm()) > 0:
                raise SteeringError(
                    f"{where}.unit", f"feature {feature.index} of SAE {sae.id!r} has no decoder direction; unit 'norm' is undefined"
                )
