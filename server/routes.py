"""HTTP routes: vLLM's own OpenAI handlers, with a validated `steering` field in front.

The protocol (streaming, n, logprobs, errors, ...) is vLLM's; what this module adds is
request -> validated spec -> `extra_args` for the worker + a prefix-cache salt, and the
resolved steering echoed back in the response.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from vllm.entrypoints.openai.chat_completion.api_router import create_chat_completion as vllm_chat_completion
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.api_router import create_completion as vllm_completion
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.utils.api_utils import validate_json_request

from server.errors import openai_error
from server.state import SteeringState
from steering.spec import ResolvedSteering, SteeringError, SteeringSpec
from steering.worker import CONFIG_KEY

router = APIRouter()


class SteeredChatCompletionRequest(ChatCompletionRequest):
    steering: SteeringSpec | None = None


class SteeredCompletionRequest(CompletionRequest):
    steering: SteeringSpec | None = None


VLLMRoute = Callable[[ChatCompletionRequest | CompletionRequest, Request], Awaitable[Response | None]]


def steering_state(raw_request: Request) -> SteeringState:
    return raw_request.app.state.steering


@router.post("/v1/chat/completions", dependencies=[Depends(validate_json_request)])
async def create_chat_completion(request: SteeredChatCompletionRequest, raw_request: Request):
    return await _serve_steered(request, raw_request, vllm_chat_completion, sequences=request.n or 1)


@router.post("/v1/completions", dependencies=[Depends(validate_json_request)])
async def create_completion(request: SteeredCompletionRequest, raw_request: Request):
    prompt = request.prompt
    prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
    return await _serve_steered(request, raw_request, vllm_completion, sequences=(request.n or 1) * prompts)


@router.get("/v1/saes")
async def list_saes(raw_request: Request) -> dict:
    saes = steering_state(raw_request).saes.values()
    return {
        "object": "list",
        "data": [
            {
                "id": sae.id,
                "object": "sae",
                "owned_by": "steerserve",
                "hook_name": sae.cfg.hook_name,
                "layer": sae.cfg.layer,
                "d_in": sae.cfg.d_in,
                "d_sae": sae.cfg.d_sae,
                "architecture": sae.cfg.architecture,
                "has_statistics": sae.has_statistics,
            }
            for sae in saes
        ],
    }


async def _serve_steered(
    request: SteeredChatCompletionRequest | SteeredCompletionRequest,
    raw_request: Request,
    vllm_route: VLLMRoute,
    sequences: int,
) -> Response | None:
    if request.vllm_xargs and CONFIG_KEY in request.vllm_xargs:
        return openai_error(
            HTTPStatus.BAD_REQUEST, f"vllm_xargs.{CONFIG_KEY} is reserved; use the 'steering' field", f"vllm_xargs.{CONFIG_KEY}"
        )
    state = steering_state(raw_request)
    try:
        resolved = state.resolve(request.steering)
    except SteeringError as exc:
        return openai_error(HTTPStatus.BAD_REQUEST, str(exc), exc.param)
    if resolved is None:
        return await vllm_route(request, raw_request)
    if not state.gate.try_acquire(sequences):
        return openai_error(
            HTTPStatus.TOO_MANY_REQUESTS,
            f"all {state.gate.capacity} steering slots are in use; retry shortly",
            "steering",
            "RateLimitError",
        )
    release = _once(lambda: state.gate.release(sequences))
    try:
        _attach(request, resolved)
        response = await vllm_route(request, raw_request)
    except BaseException:
        release()
        raise
    if isinstance(response, StreamingResponse):
        # Released when the stream ends or breaks off; the background task covers a stream never started.
        response.body_iterator = _echo_stream(response.body_iterator, resolved, release)
        response.background = _chain(response.background, release)
    else:
        release()
        if isinstance(response, JSONResponse) and response.status_code == HTTPStatus.OK:
            body = json.loads(response.body)
            body["steering"] = resolved.echo()
            headers = {k: v for k, v in response.headers.items() if k != "content-length"}
            response = JSONResponse(body, headers=headers, background=response.background)
    if response is not None:
        response.headers["x-steering-hash"] = resolved.digest()
    return response


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return call


def _chain(background: BackgroundTask | None, fn: Callable[[], None]) -> BackgroundTask:
    async def run() -> None:
        try:
            if background is not None:
                await background()
        finally:
            fn()

    return BackgroundTask(run)


def _attach(request: SteeredChatCompletionRequest | SteeredCompletionRequest, resolved: ResolvedSteering) -> None:
    """Hand the spec to the worker and keep its KV cache apart from differently steered requests."""
    request.vllm_xargs = {**(request.vllm_xargs or {}), CONFIG_KEY: resolved.wire()}
    salt = resolved.digest()
    request.cache_salt = f"{salt}:{request.cache_salt}" if request.cache_salt else salt


async def _echo_stream(
    chunks: AsyncIterator[str | bytes], resolved: ResolvedSteering, release: Callable[[], None]
) -> AsyncIterator[str | bytes]:
    """Pass the SSE stream through, adding the resolved steering to its first event."""
    echoed = False
    try:
        async for chunk in chunks:
            text = chunk.decode() if isinstance(chunk, bytes) else chunk
            if not echoed and text.startswith("data: {"):
                event = json.loads(text[len("data: ") :])
                event["steering"] = resolved.echo()
                chunk, echoed = f"data: {json.dumps(event)}\n\n", True
            yield chunk
    finally:
        release()
