"""Readiness, graceful shutdown and engine death: vLLM's own machinery, and what it leaves out.

vLLM 0.32 already aborts a request in the engine when its client goes away (`with_cancellation`
for whole responses, the cancelled body iterator for streams), drains in-flight requests on
SIGTERM for `--shutdown-timeout` seconds, answers /health with 503 once the engine is dead, and
then stops the HTTP server (its watchdog, or the first request that meets the dead engine).

What it leaves out, added here:
- during the drain /health still answers 200 and a new request gets 500 (vLLM shuts its
  renderer down first); here both answer 503 from the moment SIGTERM arrives, so a load
  balancer stops sending and a client retries elsewhere;
- a request still running when the drain times out is never answered, and uvicorn waits for
  its connection forever; here a whole-response request is answered 503 a second before the
  engine is stopped, and uvicorn's graceful-shutdown timeout closes what is left (a stream, whose
  200 was sent long ago; uvicorn's own cancellation would have answered the others 500);
- when the engine dies, in-flight requests get 500 and the process exits 0; here they get 503
  and `steerserve serve` exits 1, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from http import HTTPStatus
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import State
from vllm.engine.protocol import EngineClient
from vllm.entrypoints.serve.exception_handling.handlers.vllm_error import engine_error_handler
from vllm.entrypoints.serve.instrumentator.health import health as vllm_health
from vllm.v1.engine.exceptions import EngineDeadError

from core import vllm_internals
from server.errors import openai_error

GRACE_S = 5  # after the engine has stopped, how long uvicorn waits for responses still open
R = TypeVar("R")

router = APIRouter()


class Lifecycle:
    current: Lifecycle | None = None  # this process's API server, for `steerserve serve`'s exit status

    def __init__(self, engine: EngineClient):
        self.engine = engine
        self.draining = False
        self.drain_over = False
        self._handlers: set[asyncio.Future] = set()
        self._takeover: asyncio.Task | None = None
        Lifecycle.current = self

    def start(self, state: State) -> None:
        self._takeover = asyncio.get_running_loop().create_task(self._take_over_sigterm(state))

    def refusal(self) -> JSONResponse | None:
        """The 503 a new completion request gets while the server cannot serve it, else None."""
        if self.draining:
            return _unavailable("the server is shutting down; retry on another instance")
        if self.engine.errored:
            return _unavailable("the engine has stopped; the server is restarting")
        return None

    async def within_drain(self, handler: Awaitable[R]) -> R | JSONResponse:
        """Await a vLLM route handler, or answer 503 if the drain runs out before it does."""
        task = asyncio.ensure_future(handler)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        try:
            return await task
        except asyncio.CancelledError:
            if self.drain_over and task.cancelled():
                return _unavailable("the server shut down before this request finished; retry on another instance")
            raise

    def engine_died(self) -> bool:
        return vllm_internals.engine_failed(self.engine)

    async def _take_over_sigterm(self, state: State) -> None:
        # vLLM's serve_http sets `app.state.server` and installs its SIGTERM handler in one
        # synchronous run, after this plugin's init_state: once the server is there, so is the
        # handler, and installing ours replaces it.
        while getattr(state, "server", None) is None:
            await asyncio.sleep(0.05)
        state.server.config.timeout_graceful_shutdown = GRACE_S
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self) -> None:
        self.draining = True  # not ready from now on
        # A second before vLLM stops the engine, those still running cannot finish any more.
        drain = vllm_internals.drain_seconds(self.engine)
        asyncio.get_running_loop().call_later(max(0, drain - 1), self._end_drain)
        # vLLM handles SIGINT exactly as it handled SIGTERM (drain, then stop): hand over to it.
        signal.raise_signal(signal.SIGINT)

    def _end_drain(self) -> None:
        self.drain_over = True
        for task in list(self._handlers):
            task.cancel()


def _unavailable(message: str) -> JSONResponse:
    return openai_error(HTTPStatus.SERVICE_UNAVAILABLE, message, None, "ServiceUnavailableError")


def lifecycle(raw_request: Request) -> Lifecycle:
    return raw_request.app.state.lifecycle


@router.get("/health", response_class=Response)
async def health(raw_request: Request) -> Response:
    """Readiness: 503 while draining, else vLLM's own check (503 once the engine is dead)."""
    if lifecycle(raw_request).draining:
        return Response(status_code=HTTPStatus.SERVICE_UNAVAILABLE)
    return await vllm_health(raw_request)


async def engine_dead(raw_request: Request, exc: EngineDeadError) -> JSONResponse:
    """vLLM's handler (it stops the HTTP server when the engine is gone), answering 503, not 500."""
    await engine_error_handler(raw_request, exc)
    return _unavailable(str(exc))
