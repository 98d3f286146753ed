"""HTTP routes: vLLM's own OpenAI handlers, with steering, presets and policy in front.

The protocol (streaming, n, logprobs, errors, ...) is vLLM's. What this module adds is
request -> plan (preset expanded, policy applied, spec validated) -> `extra_args` for the
worker + a prefix-cache salt, the resolved steering echoed back, and the preset routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, TypeAdapter, ValidationError, model_validator
from starlette.background import BackgroundTask
from vllm.entrypoints.openai.chat_completion.api_router import create_chat_completion as vllm_chat_completion
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.api_router import create_completion as vllm_completion
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.models.api_router import show_available_models as vllm_models
from vllm.entrypoints.serve.utils.api_utils import validate_json_request

from features.vectors import DirectionSAE, saes_only
from server import metrics
from server.auth import caller
from server.errors import openai_error
from server.lifecycle import lifecycle
from server.policy import KeyPolicy, PolicyDenied
from server.readout import Collector
from server.state import Plan, SteeringState
from steering.spec import MonitorSpec, ReadoutSpec, SteeringError, SteeringSpec
from steering.wire import CONFIG_KEY, READOUT_KEY, ReadoutRequest

router = APIRouter()
request_log = logging.getLogger("steerserve.requests")


class _TypedBeforeChecks(BaseModel):
    """vLLM's request checks run before field validation and assume each field has its declared
    type: `"structured_outputs": true` raised AttributeError inside one, a 500. Such a request is
    refused as invalid (400), naming the field whose value has the wrong type."""

    @model_validator(mode="wrap")
    @classmethod
    def _typed_before_checks(cls, data: Any, handler: Callable[[Any], Any]) -> Any:
        own = ("steering", "readout", "monitors")  # validated field by field, and never sent to the engine as they are
        if isinstance(data, dict) and (where := _outside_msgpack({k: v for k, v in data.items() if k not in own})) is not None:
            # The engine's wire (msgpack) holds integers in [-2**63, 2**64 - 1]; vLLM checks that
            # for vllm_xargs only, and an integer past it in structured_outputs was a bare 500.
            raise ValueError(f"{where}: integers must be between -2**63 and 2**64 - 1")
        try:
            return handler(data)
        except (AttributeError, TypeError) as exc:
            raise ValueError(_mistyped(cls, data) or f"malformed request ({exc})") from exc


def _outside_msgpack(data: Any, path: str = "") -> str | None:
    """The path of the first integer in `data` that msgpack cannot hold, or None."""
    if isinstance(data, int) and not isinstance(data, bool):
        return path or "body" if not -(2**63) <= data < 2**64 else None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if (found := _outside_msgpack(value, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip("."))) is not None:
            return found
    return None


def _mistyped(cls: type[BaseModel], data: Any) -> str | None:
    """'<field>: <what is wrong>' for the first field of `data` whose value fails its own type."""
    for name, value in data.items() if isinstance(data, dict) else ():
        field = cls.model_fields.get(name)
        try:
            if field is not None:
                TypeAdapter(field.annotation).validate_python(value)
        except ValidationError as exc:
            return f"{name}: {exc.errors()[0]['msg']}"
    return None


class SteeredChatCompletionRequest(_TypedBeforeChecks, ChatCompletionRequest):
    steering: SteeringSpec | None = None
    readout: ReadoutSpec | None = None
    monitors: list[MonitorSpec] | None = None


class SteeredCompletionRequest(_TypedBeforeChecks, CompletionRequest):
    steering: SteeringSpec | None = None
    readout: ReadoutSpec | None = None
    monitors: list[MonitorSpec] | None = None


SteeredRequest = SteeredChatCompletionRequest | SteeredCompletionRequest
VLLMRoute = Callable[[ChatCompletionRequest | CompletionRequest, Request], Awaitable[Response | None]]


def steering_state(raw_request: Request) -> SteeringState:
    return raw_request.app.state.steering


@router.post("/v1/chat/completions", dependencies=[Depends(validate_json_request)])
async def create_chat_completion(
    request: SteeredChatCompletionRequest, raw_request: Request, key: KeyPolicy | None = Depends(caller)
):
    return await _serve(request, raw_request, key, vllm_chat_completion, sequences=request.n or 1)


@router.post("/v1/completions", dependencies=[Depends(validate_json_request)])
async def create_completion(
    request: SteeredCompletionRequest, raw_request: Request, key: KeyPolicy | None = Depends(caller)
):
    prompt = request.prompt
    prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
    return await _serve(request, raw_request, key, vllm_completion, sequences=(request.n or 1) * prompts)


@router.get("/v1/models")
async def list_models(raw_request: Request) -> JSONResponse:
    """vLLM's model list, plus each preset as a model whose parent is its base (as vLLM lists LoRAs)."""
    listing = json.loads((await vllm_models(raw_request)).body)
    base = {card["id"]: card for card in listing["data"]}
    for preset in steering_state(raw_request).presets.presets.values():
        card = {**base[preset.model], "id": preset.name, "owned_by": "steerserve", "parent": preset.model}
        listing["data"].append({**card, "description": preset.description})
    return JSONResponse(listing)


@router.get("/v1/presets")
async def list_presets(raw_request: Request) -> dict:
    presets = steering_state(raw_request).presets.presets.values()
    return {"object": "list", "data": [p.file_form() for p in presets]}


@router.get("/v1/presets/{name}", response_model=None)
async def get_preset(name: str, raw_request: Request) -> dict | JSONResponse:
    preset = steering_state(raw_request).presets.get(name)
    if preset is None:
        return openai_error(HTTPStatus.NOT_FOUND, f"no preset {name!r}", "name", "NotFoundError")
    return preset.file_form()


@router.get("/v1/saes")
async def list_saes(raw_request: Request) -> dict:
    state = steering_state(raw_request)
    saes = saes_only(state.saes).values()
    # Off the event loop: a catalogue rewritten on disk is read again here (SteeringState.catalogue).
    catalogued = {sae.id for sae in saes if await asyncio.to_thread(state.catalogue, sae.id) is not None}
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
                "architecture": sae.architecture,
                "format": sae.source.partition(":")[0],  # the files it came from (features/formats.py)
                "has_statistics": sae.has_statistics,
                "has_catalogue": sae.id in catalogued,
            }
            for sae in saes
        ],
    }


@router.get("/v1/vectors")
async def list_vectors(raw_request: Request) -> dict:
    """The steering vectors: loaded at start-up, or derived and kept (`"source": "contrast"`);
    where each has a direction, and its norm there; a kept one its calibration, once calibrated."""
    state = steering_state(raw_request)
    layers: dict[str, dict[int, float]] = {}
    for sae in state.saes.values():
        if isinstance(sae, DirectionSAE):
            for vector, j in sae.vectors.items():
                layers.setdefault(vector, {})[sae.cfg.layer] = float(sae.W_dec[2 * j].norm())
    kept = {name: {saved.layer: float(saved.vector.norm())} for name, saved in state.saved.vectors.items()}
    return {
        "object": "list",
        "data": [
            {"id": vector, "object": "vector", "owned_by": "steerserve", "source": source, "layers": sorted(norms),
             "norms": {str(k): round(v, 6) for k, v in sorted(norms.items())}}
            | ({"calibration": calibration.summary()} if source == "contrast" and (calibration := state.saved.vectors[vector].calibration) else {})
            for source, found in (("file", layers), ("contrast", kept)) for vector, norms in sorted(found.items())
        ],
    }  # fmt: skip


async def _serve(
    request: SteeredRequest, raw_request: Request, key: KeyPolicy | None, vllm_route: VLLMRoute, sequences: int
) -> Response | None:
    if (refusal := lifecycle(raw_request).refusal()) is not None:
        return refusal  # draining or engine gone: 503
    state = steering_state(raw_request)
    for reserved, field in ((CONFIG_KEY, "steering"), (READOUT_KEY, "readout")):
        if request.vllm_xargs and reserved in request.vllm_xargs:
            param = f"vllm_xargs.{reserved}"
            metrics.VALIDATION_ERRORS.labels(param).inc()
            return openai_error(HTTPStatus.BAD_REQUEST, f"{param} is reserved; use the '{field}' field", param)
    try:
        plan = state.plan(request.model, request.steering, key, request.readout, request.monitors)
        if (plan.readout or plan.monitors) and sequences != (request.n or 1):
            field = "readout" if plan.readout else "monitors"
            raise SteeringError(field, "readout and monitors follow one prompt per request; send the prompts separately")
        if any(m.action == "stop" for m in plan.monitors) and request.min_tokens:
            raise SteeringError("min_tokens", "a stop monitor may end an answer at any token; min_tokens must be 0")
        if plan.resolved is not None and (n := plan.resolved.sticky()) is not None and sequences > 1:
            # Sequences of one request share its cache salt, so one could take from the prefix
            # cache the prompt tokens where another's sticky condition fired, and never see it.
            raise SteeringError(f"steering.features[{n}].when.scope", "a sticky condition follows one sequence: send one prompt with n = 1")
    except SteeringError as exc:
        metrics.VALIDATION_ERRORS.labels(metrics.field_label(exc.param)).inc()
        return openai_error(HTTPStatus.BAD_REQUEST, str(exc), exc.param)
    except PolicyDenied as exc:
        metrics.POLICY_DENIALS.labels(exc.rule).inc()
        _log(state, request, key, None, status=403, rule=exc.rule)
        return openai_error(HTTPStatus.FORBIDDEN, str(exc), exc.rule, "PermissionDeniedError")
    resolved = plan.resolved
    if resolved is not None and not state.gate.try_acquire(sequences):
        metrics.CAPACITY_REFUSALS.inc()
        share = " of this API process (its share of --max-steered-requests)" if state.gate.shared else ""
        message = f"all {state.gate.capacity} steering slots{share} are in use; retry shortly"
        return openai_error(HTTPStatus.TOO_MANY_REQUESTS, message, "steering", "RateLimitError")
    metrics.REQUESTS.labels(str(resolved is not None).lower(), plan.preset.name if plan.preset else "").inc()
    _log(state, request, key, plan, status=200)
    _apply_preset(request, plan)
    if resolved is None and plan.readout is None and not plan.monitors:
        return await lifecycle(raw_request).within_drain(vllm_route(request, raw_request))
    release_slots = (lambda: state.gate.release(sequences)) if resolved is not None else (lambda: None)
    return await _serve_steered(request, raw_request, vllm_route, plan, release_slots, state)


async def _serve_steered(
    request: SteeredRequest,
    raw_request: Request,
    vllm_route: VLLMRoute,
    plan: Plan,
    release_slots: Callable[[], None],
    state: SteeringState,
) -> Response | None:
    """Run a request that steers, reads, or both: the spec and readout request to the worker, the
    steering echoed and the readout joined to the response."""
    echo = None
    if plan.resolved is not None:
        assert plan.wire is not None and plan.salt is not None
        echo = {"hash": plan.salt, **plan.resolved.echo(), **({"preset": plan.preset.name} if plan.preset else {})}
        _attach(request, plan.wire, plan.salt, private=plan.resolved.private())
    collector, readout_id = None, None
    if plan.readout is not None or plan.monitors:
        readout_id, collector = state.readouts.open(plan.readout, plan.monitors, request.n or 1, state.token_text)
        stop = state.stop_token() if any(m.action == "stop" for m in plan.monitors) else None
        _attach_readout(request, ReadoutRequest.of(readout_id, state.readouts.address, plan.readout, plan.monitors, stop))

    def finish() -> None:
        release_slots()
        if readout_id is not None:
            state.readouts.close(readout_id)

    release = _once(finish)
    try:
        response = await lifecycle(raw_request).within_drain(vllm_route(request, raw_request))
    except BaseException:
        release()
        raise
    if isinstance(response, StreamingResponse):
        # Released when the stream ends or breaks off; the background task covers a stream never started.
        response.body_iterator = _decorate_stream(response.body_iterator, echo, collector, release)
        response.background = _chain(response.background, release)
    else:
        try:
            if isinstance(response, JSONResponse) and response.status_code == HTTPStatus.OK:
                body = json.loads(response.body)
                if echo is not None:
                    body["steering"] = echo
                if collector is not None:
                    await collector.until_ended()
                    for choice in body["choices"]:
                        collector.decorate(choice, collector.take(choice["index"]), final=True)
                headers = {k: v for k, v in response.headers.items() if k != "content-length"}
                response = JSONResponse(body, headers=headers, background=response.background)
        finally:
            release()
    if response is not None and plan.salt is not None:
        response.headers["x-steering-hash"] = plan.salt
    return response


def _apply_preset(request: SteeredRequest, plan: Plan) -> None:
    """Run the preset's base model, with the preset's sampling defaults where the request set none."""
    request.model = plan.model
    if plan.preset is None or plan.preset.sampling is None:
        return
    given = request.model_fields_set
    for field, value in plan.preset.sampling.model_dump(exclude_none=True).items():
        if field in given or (field == "max_tokens" and "max_completion_tokens" in given):
            continue
        setattr(request, field, value)


def _attach(request: SteeredRequest, wire: str, salt: str, private: bool) -> None:
    """Hand the spec to the worker and keep its KV cache apart from differently steered requests,
    or (`private`, see ResolvedSteering.private) from every other request."""
    request.vllm_xargs = {**(request.vllm_xargs or {}), CONFIG_KEY: wire}
    if private:
        salt = f"{uuid.uuid4().hex}:{salt}"
    request.cache_salt = f"{salt}:{request.cache_salt}" if request.cache_salt else salt


def _attach_readout(request: SteeredRequest, readout: ReadoutRequest) -> None:
    """Ask the worker for the readout and monitors. Prompt positions read or watched must be
    computed, not found in the prefix cache: their own salt. A stop monitor's forced token must
    end the answer, even where the request ignores end of sequence: a stop token of its own."""
    request.vllm_xargs = {**(request.vllm_xargs or {}), READOUT_KEY: readout.model_dump_json()}
    if (readout.readout and readout.readout.prompt) or any(m.scope != "completion" for m in readout.monitors):
        request.cache_salt = f"{readout.id}:{request.cache_salt}" if request.cache_salt else readout.id
    if readout.stop_token is not None:
        request.stop_token_ids = [*(request.stop_token_ids or []), readout.stop_token]


def _log(state: SteeringState, request: SteeredRequest, key: KeyPolicy | None, plan: Plan | None, **fields) -> None:
    """One structured line per request: its steering hash and preset, never the prompt unless asked for."""
    line = {
        "model": request.model,
        "key": key.name if key else None,
        "preset": plan.preset.name if plan and plan.preset else None,
        "steering_hash": plan.salt if plan else None,
        **fields,
    }
    if state.api.log_prompts:
        line["prompt"] = getattr(request, "messages", None) or getattr(request, "prompt", None)
    request_log.info(json.dumps(line, default=str))


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


async def _decorate_stream(
    chunks: AsyncIterator[str | bytes], echo: dict | None, collector: Collector | None, release: Callable[[], None]
) -> AsyncIterator[str | bytes]:
    """Pass the SSE stream through, adding the resolved steering to its first event and to each
    choice's events the readout entries that became ready since its last one (all the rest on
    its last event, once complete)."""
    echoed = echo is None
    try:
        async for chunk in chunks:
            text = chunk.decode() if isinstance(chunk, bytes) else chunk
            # An event with nothing to add passes as it is: no choice finishes in it (no
            # finish_reason string) and no readout entry waits.
            idle = echoed and (collector is None or (not collector.pending and '"finish_reason":"' not in text))
            if text.startswith("data: {") and not idle:
                event = json.loads(text[len("data: ") :])
                if not echoed:
                    event["steering"], echoed = echo, True
                for choice in event.get("choices", []) if collector is not None else []:
                    final = choice.get("finish_reason") is not None
                    if final:
                        await collector.until_ended(choice["index"])
                    collector.decorate(choice, collector.take(choice["index"]), final)
                chunk = f"data: {json.dumps(event)}\n\n"
            yield chunk
    finally:
        release()
