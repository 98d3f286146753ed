"""Bearer-key authentication for every /v1 route, vLLM's included, in OpenAI's error format.

The middleware identifies the caller once and leaves its key policy on the request scope;
steerserve's routes take it through the `caller` dependency.
"""

from __future__ import annotations

import json

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.policy import KeyPolicy, Policy

GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/tokenize", "/detokenize")
SCOPE_KEY = "steerserve_key"


class BearerAuth:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        policy: Policy = scope["app"].state.steering.policy  # loaded at start-up, after this is installed
        if policy.open:
            return await self.app(scope, receive, send)
        if not scope["path"].removeprefix(scope.get("root_path", "")).startswith(GUARDED_PREFIXES):
            return await self.app(scope, receive, send)  # /health, /metrics
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        key = policy.identify(token) if scheme.lower() == "bearer" else None
        if key is None:
            body = {"error": {"message": "missing or invalid API key", "type": "AuthenticationError", "param": None, "code": 401}}
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": json.dumps(body).encode()})
        scope.setdefault("state", {})[SCOPE_KEY] = key
        return await self.app(scope, receive, send)


def caller(request: Request) -> KeyPolicy | None:
    """The authenticated key's policy; None on an open server."""
    return request.scope.get("state", {}).get(SCOPE_KEY)
