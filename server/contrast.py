"""`POST /v1/vectors/contrast`: a steering vector derived from two sets of examples, through the
serving engine itself (features/contrast.py has the math).

Each example runs as its own one-token request with a residual readout (steering/wire.py's
`WireResidual`) at the layer asked for: the worker sums its stream over the example's positions
past the prefix every example shares (a chat template's system prompt, which says nothing about
either set) and never position 0 (an attention sink, whose stream dwarfs the rest), and keeps
its last position's. Its own prefix-cache salt makes every position computed, not found cached.
The result may be kept under a name, in this API process, and steered with at once as
`{"vector": NAME}`: it is sent to the worker as the request's own (inline) vector.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform

from features.contrast import Method, contrast
from features.vectors import PREFIX, inline_layers
from server.auth import caller
from server.errors import APIError
from server.lifecycle import lifecycle
from server.policy import KeyPolicy, PolicyDenied, authorize
from server.readout import ResidualSum
from server.state import SavedVector, SteeringState
from steering.spec import SteeringError
from steering.wire import READOUT_KEY, ReadoutRequest, WireResidual

router = APIRouter()
MAX_EXAMPLES = 256  # per set
MAX_EXAMPLE_TOKENS = 2048
IN_FLIGHT = 64  # examples sent to the engine at once


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=20_000)


Example = Annotated[str, Field(min_length=1, max_length=20_000)] | Annotated[list[Message], Field(min_length=1, max_length=64)]


class ContrastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="the served model (its presets do not apply)")
    positive: list[Example] = Field(min_length=1, max_length=MAX_EXAMPLES, description="examples of the concept: texts, or chats")
    negative: list[Example] = Field(min_length=1, max_length=MAX_EXAMPLES, description="examples without it")
    layer: int = Field(ge=0, description="the decoder layer whose output is read (and later steered)")
    method: Method = Field(default="mean_diff", description="mean_diff, or pca (the examples paired in order)")
    positions: Literal["mean", "last"] = Field(
        default="mean", description="each example's stream averaged over its positions, or taken at its last"
    )
    name: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.\-]{1,64}$", description="keep the vector under this name, to steer with as {'vector': name}"
    )


@router.post("/v1/vectors/contrast", response_model=None)
async def derive_vector(
    body: ContrastRequest, raw_request: Request, key: Annotated[KeyPolicy | None, Depends(caller)]
) -> dict | JSONResponse:
    state: SteeringState = raw_request.app.state.steering
    _check(body, state, key)
    if (refusal := lifecycle(raw_request).refusal()) is not None:
        return refusal
    engine = raw_request.app.state.engine_client
    longest = min(MAX_EXAMPLE_TOKENS, engine.model_config.max_model_len - 1)  # one token is generated
    named = [(f"{side}[{n}]", example) for side in ("positive", "negative") for n, example in enumerate(getattr(body, side))]
    examples = await asyncio.to_thread(lambda: [chat_tokens(state, example, where, longest) for where, example in named])
    shared = _common_prefix(examples)
    limit = asyncio.Semaphore(IN_FLIGHT)

    async def read(ids: list[int]) -> torch.Tensor:
        async with limit:
            return await _residual(state, engine, ids, body.layer, min(max(1, shared), len(ids) - 1), body.positions)

    async def read_all() -> list[torch.Tensor]:
        # One example failing (503) cancels the rest rather than leaving them to run for nobody.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(read(ids)) for ids in examples]
        except* Exception as failed:
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    result = await lifecycle(raw_request).within_drain(read_all())
    if not isinstance(result, list):
        return result  # the drain ran out: 503
    streams = torch.stack(result)
    try:
        derived = contrast(streams[: len(body.positive)], streams[len(body.positive) :], body.method)
    except ValueError as exc:
        raise APIError(HTTPStatus.BAD_REQUEST, str(exc), "method" if body.method == "pca" else "negative") from exc
    if body.name is not None:
        state.saved.put(body.name, SavedVector(body.layer, derived.vector, derived.stream_norm, key.name if key else None))
    return {
        "object": "vector",
        "id": body.name,
        "layer": body.layer,
        "method": body.method,
        "positions": body.positions,
        "examples": {"positive": len(body.positive), "negative": len(body.negative), "shared_prefix_tokens": shared},
        "norm": float(derived.vector.norm()),
        "stream_norm": derived.stream_norm,
        "accuracy": derived.accuracy,
        "vector": derived.vector.tolist(),
    }


def _check(body: ContrastRequest, state: SteeringState, key: KeyPolicy | None) -> None:
    """Refuse (400, 403) what cannot be derived here or by this key."""
    model = body.model or next(iter(sorted(state.served_models)))
    if model not in state.served_models:
        raise APIError(HTTPStatus.NOT_FOUND, f"no model {model!r}; served: {sorted(state.served_models)}", "model", "NotFoundError")
    try:
        authorize(key, model, None, raw_features=True)
        if key is not None and key.protected:
            raise PolicyDenied("protected", f"key {key.name!r} has protected features, so it may not derive vectors")
    except PolicyDenied as exc:
        raise APIError(HTTPStatus.FORBIDDEN, str(exc), exc.rule, "PermissionDeniedError") from exc
    if not current_platform.is_cpu():
        raise APIError(HTTPStatus.BAD_REQUEST, "contrast reads the stream in the CPU op; it runs on CPU engines only, not yet on this device", "layer")
    taking = inline_layers(state.saes.values())
    if body.layer not in taking:
        message = f"contrast reads and steers where requests may send vectors of their own: layers {taking} (--inline-vector-layers), not {body.layer}"
        raise APIError(HTTPStatus.BAD_REQUEST, message, "layer")
    if body.method == "pca" and len(body.positive) != len(body.negative):
        raise APIError(HTTPStatus.BAD_REQUEST, f"pca pairs the examples in order: give as many negative as positive ({len(body.positive)})", "negative")
    if body.name is not None:
        try:
            state.saved.check_name(body.name, state.saes, state.gate.shared, key.name if key else None)
        except SteeringError as exc:
            raise APIError(HTTPStatus.BAD_REQUEST, str(exc), exc.param) from exc


def chat_tokens(state: SteeringState, example: str | list[Message], where: str, longest: int) -> list[int]:
    """An example as the model reads it: a text as /v1/completions tokenizes it, a chat through
    the model's chat template (with the assistant's turn opened unless the chat ends in one)."""
    tokenizer = state.tokenizer
    try:
        if isinstance(example, str):
            ids = tokenizer(example).input_ids
        else:
            messages = [m.model_dump() for m in example]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=example[-1].role != "assistant", tokenize=True, return_dict=False)
    except (TemplateError, ValueError) as exc:  # the model's template refuses this chat (roles, or no template)
        raise APIError(HTTPStatus.BAD_REQUEST, f"the model's chat template refuses it: {exc}", where) from exc
    if len(ids) > longest:
        raise APIError(HTTPStatus.BAD_REQUEST, f"{len(ids)} tokens; an example may have at most {longest}", where)
    if len(ids) < 2:
        raise APIError(HTTPStatus.BAD_REQUEST, "an example needs at least 2 tokens (position 0 is never read)", where)
    return list(ids)


def _common_prefix(examples: list[list[int]]) -> int:
    """How many leading tokens every example shares."""
    n = min(len(ids) for ids in examples)
    for i in range(n):
        if any(ids[i] != examples[0][i] for ids in examples):
            return i
    return n


async def _residual(state: SteeringState, engine, ids: list[int], layer: int, first: int, positions: str) -> torch.Tensor:
    """One example's stream at `layer`: its mean over positions `first`.. or its last position's."""
    summed = ResidualSum()
    readout_id = state.readouts.add(summed)
    try:
        request = ReadoutRequest(id=readout_id, to=state.readouts.address, residual=WireResidual(sae=f"{PREFIX}{layer}", first=first))
        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={READOUT_KEY: request.model_dump_json()})
        async for _ in engine.generate(TokensPrompt(prompt_token_ids=ids, cache_salt=readout_id), params, f"contrast-{readout_id}"):
            pass
        if not await summed.until_ended() or summed.total is None or summed.last is None:
            raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, "the engine did not report the example's stream; retry", "layer", "ServiceUnavailableError")
        return summed.total / summed.count if positions == "mean" else summed.last
    finally:
        state.readouts.close(readout_id)
