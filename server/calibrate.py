"""`POST /v1/saes/{sae}/features/{index}/calibrate` and `POST /v1/vectors/{name}/calibrate`: a
feature's or kept vector's steering strength, measured through the serving engine
(features/calibration.py has the measures and the choice).

Every prompt is answered unsteered and at each setting of the sweep, all sent at once so that the
engine batches them, a feature's each with a readout of the feature (its activation before
steering, on every generated token). Each answer is then read back by the same engine, unsteered, for its prompt
logprobs: its perplexity under the unsteered model, with no second model in memory. The answers
are embedded to judge them against the concept and against their prompts. A feature's
recommendation is kept beside the SAE's catalogue, a kept vector's with the vector (in this API
process, as the vector is), where `unit: "calibrated"` finds it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from features.calibration import (
    DEFAULT_SETTINGS,
    PROMPTS,
    VECTOR_SETTINGS,
    Answer,
    Calibration,
    Measured,
    Setting,
    perplexity,
    recommend,
)
from features.embedding import embedder
from features.vectors import DirectionSAE, saes_only
from server.auth import caller
from server.contrast import Message, chat_tokens
from server.errors import APIError, openai_error
from server.lifecycle import lifecycle
from server.policy import KeyPolicy, PolicyDenied
from server.state import Plan, SteeringState
from steering.spec import FeatureIntervention, ReadoutSpec, SteeringError, SteeringSpec
from steering.wire import CONFIG_KEY, READOUT_KEY, ReadoutRequest

router = APIRouter()
IN_FLIGHT = 64  # generations sent to the engine at once, at most (and at most half the steering slots)
MAX_SETTINGS = 24
MAX_PROMPTS = 64


class SettingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strength: float = Field(gt=0, le=100, description="in multiples of the feature's max activation")
    prompt_scale: float = Field(default=1.0, ge=0, le=100)


class CalibrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="the served model (its presets do not apply)")
    prompts: list[Annotated[str, Field(min_length=1, max_length=2000)]] | None = Field(
        default=None, min_length=2, max_length=MAX_PROMPTS, description="what to answer (default: 12 neutral requests)"
    )
    mode: Literal["clamp", "add"] = "clamp"
    fluency_budget: float = Field(default=2.0, gt=1, le=100, description="the most perplexity a recommendation may cost, x unsteered")
    settings: list[SettingSpec] | None = Field(default=None, min_length=1, max_length=MAX_SETTINGS, description="the sweep (default: 10)")
    concept: str | None = Field(
        default=None, min_length=1, max_length=2000, description="what the embedding judge compares answers with (default: the feature's label)"
    )
    max_tokens: int = Field(default=48, ge=8, le=256)
    temperature: float = Field(default=0.7, ge=0, le=2)
    seed: int = Field(default=0, ge=0)
    store: bool = Field(default=True, description="keep the recommendation for unit 'calibrated'")
    stream: bool = Field(default=False, description="server-sent progress events, then the result")


class VectorCalibrateRequest(CalibrateRequest):
    mode: Literal["add"] = "add"
    settings: list[SettingSpec] | None = Field(
        default=None, min_length=1, max_length=MAX_SETTINGS,
        description="the sweep, each strength a share of the stream's mean norm at the vector's layer (default: 11)",
    )  # fmt: skip
    concept: str = Field(min_length=1, max_length=2000, description="what the embedding judge compares answers with: a vector has no label")


@router.post("/v1/saes/{sae_id}/features/{index}/calibrate", response_model=None)
async def calibrate(
    sae_id: str, index: int, body: CalibrateRequest, raw_request: Request, key: Annotated[KeyPolicy | None, Depends(caller)]
) -> dict | JSONResponse | StreamingResponse:
    state: SteeringState = raw_request.app.state.steering
    sae = saes_only(state.saes).get(sae_id)
    if sae is None:
        raise APIError(HTTPStatus.NOT_FOUND, f"no SAE {sae_id!r}; loaded SAEs: {sorted(saes_only(state.saes))}", "sae", "NotFoundError")
    if not 0 <= index < sae.cfg.d_sae:
        raise APIError(HTTPStatus.NOT_FOUND, f"index {index} out of range for SAE {sae_id!r}: 0 <= index < {sae.cfg.d_sae}", "index", "NotFoundError")
    if sae.calibrations is None:
        message = f"SAE {sae_id!r} has no feature statistics; strengths are calibrated in multiples of max_act (steerserve features build)"
        raise APIError(HTTPStatus.BAD_REQUEST, message, "sae")
    model = _model(state, body)
    settings = _settings(body, DEFAULT_SETTINGS)
    steerings = [
        SteeringSpec(features=[FeatureIntervention(sae=sae_id, index=index, mode=body.mode, strength=s.strength, unit="max_act")], prompt_scale=s.prompt_scale)
        for s in settings
    ]  # fmt: skip
    plans = [_plan(state, model, key, steering, ReadoutSpec(sae=sae_id, top_k=0, features=[index])) for steering in [None, *steerings]]
    concept = body.concept or _label(state, sae_id, index)

    def keep(calibration: Calibration) -> bool:
        sae.calibrations.put(index, calibration)
        return True

    head = {"object": "sae.feature.calibration", "sae": sae_id, "index": index, "mode": body.mode, "unit": "max_act"}
    return await _sweep(raw_request, state, body, plans, settings, index, concept, head, 1.0, "max_act", keep)


@router.post("/v1/vectors/{name}/calibrate", response_model=None)
async def calibrate_vector(
    name: str, body: VectorCalibrateRequest, raw_request: Request, key: Annotated[KeyPolicy | None, Depends(caller)]
) -> dict | JSONResponse | StreamingResponse:
    """A kept vector's calibration: strengths swept as shares of the stream's norm it was derived from."""
    state: SteeringState = raw_request.app.state.steering
    kept = state.saved.vectors.get(name)
    if kept is None:
        if any(isinstance(sae, DirectionSAE) and name in sae.vectors for sae in state.saes.values()):
            message = (f"vector {name!r} was loaded from a file, with no stream norm to scale its strengths by; calibrate a vector "
                       "derived and kept by POST /v1/vectors/contrast (with a name)")  # fmt: skip
            raise APIError(HTTPStatus.BAD_REQUEST, message, "vector")
        raise APIError(HTTPStatus.NOT_FOUND, f"no kept vector {name!r}; kept: {sorted(state.saved.vectors)}", "vector", "NotFoundError")
    if kept.owner != (key.name if key else None):
        raise APIError(HTTPStatus.FORBIDDEN, f"vector {name!r} was kept by another key; only its keeper calibrates it", "vector", "PermissionDeniedError")
    model = _model(state, body)
    settings = _settings(body, VECTOR_SETTINGS)
    steerings = [
        SteeringSpec(features=[FeatureIntervention(vector=name, strength=s.strength * kept.stream_norm, unit="norm")], prompt_scale=s.prompt_scale)
        for s in settings
    ]  # fmt: skip
    plans = [_plan(state, model, key, steering, None) for steering in [None, *steerings]]

    def keep(calibration: Calibration) -> bool:
        current = state.saved.vectors.get(name)
        if current is None or current.vector is not kept.vector:  # derived again meanwhile: the calibration is of another
            return False
        state.saved.calibrate(name, calibration)
        return True

    head = {"object": "vector.calibration", "vector": name, "layer": kept.layer, "mode": "add", "unit": "stream_norm", "stream_norm": kept.stream_norm}
    # The recommendation is kept as the length it adds (unit norm), what a request then steers with.
    return await _sweep(raw_request, state, body, plans, settings, None, body.concept, head, kept.stream_norm, "norm", keep)


def _settings(body: CalibrateRequest, default: tuple[Setting, ...]) -> list[Setting]:
    return [Setting(s.strength, s.prompt_scale) for s in body.settings] if body.settings else list(default)


def _model(state: SteeringState, body: CalibrateRequest) -> str:
    model = body.model or next(iter(sorted(state.served_models)))
    if model not in state.served_models:
        raise APIError(HTTPStatus.NOT_FOUND, f"no model {model!r}; served: {sorted(state.served_models)}", "model", "NotFoundError")
    return model


async def _sweep(
    raw_request: Request, state: SteeringState, body: CalibrateRequest, plans: list[Plan], settings: list[Setting], index: int | None,
    concept: str | None, head: dict, length: float, unit: str, keep: Callable[[Calibration], bool],
) -> dict | JSONResponse | StreamingResponse:  # fmt: skip
    """Every prompt answered under every plan (the unsteered one, then one per setting), measured:
    the response (`head`, then the curve), with the recommendation, its strength x `length` in
    `unit`, given to `keep` where the body asks to store it (`keep` says whether it did)."""
    if (refusal := lifecycle(raw_request).refusal()) is not None:
        return refusal
    prompts = body.prompts or list(PROMPTS)
    engine = raw_request.app.state.engine_client
    longest = engine.model_config.max_model_len - body.max_tokens
    ids = await asyncio.to_thread(lambda: [chat_tokens(state, [Message(role="user", content=p)], f"prompts[{n}]", longest) for n, p in enumerate(prompts)])
    sweep = Sweep(state, engine, index, body, ids, prompts, concept)
    started = time.monotonic()

    async def result(progress: Callable[[int, int], None]) -> dict:
        outcome = await lifecycle(raw_request).within_drain(sweep.run(plans, progress))
        if isinstance(outcome, JSONResponse):
            raise _Unavailable(outcome)
        return {**_respond(head, body, settings, outcome, concept, length, unit, keep), "seconds": round(time.monotonic() - started, 1)}

    if not body.stream:
        try:
            return await result(lambda done, total: None)
        except _Unavailable as exc:
            return exc.response
    return StreamingResponse(_events(result), media_type="text/event-stream")


class _Unavailable(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


async def _events(result: Callable[[Callable[[int, int], None]], Awaitable[dict]]) -> AsyncIterator[str]:
    """Progress events as the sweep's generations finish (at most one per percent), then the result."""
    queue: asyncio.Queue = asyncio.Queue()
    last = [-1]

    def progress(done: int, total: int) -> None:
        if done * 100 // total != last[0]:
            last[0] = done * 100 // total
            queue.put_nowait({"object": "calibration.progress", "done": done, "total": total})

    task = asyncio.ensure_future(result(progress))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (event := await queue.get()) is not None:
            yield f"data: {json.dumps(event)}\n\n"
        try:
            yield f"data: {json.dumps(task.result())}\n\n"
        except APIError as exc:  # the stream has begun (200): the error comes as its last event
            yield f"data: {openai_error(exc.status, str(exc), exc.param, exc.type_).body.decode()}\n\n"
        except _Unavailable as exc:
            yield f"data: {exc.response.body.decode()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        task.cancel()


def _plan(state: SteeringState, model: str, key: KeyPolicy | None, steering: SteeringSpec | None, readout: ReadoutSpec | None) -> Plan:
    """One setting's steering (and the feature's readout), checked as a request's would be (400, 403)."""
    try:
        return state.plan(model, steering, key, readout)
    except SteeringError as exc:
        raise APIError(HTTPStatus.BAD_REQUEST, str(exc), exc.param) from exc
    except PolicyDenied as exc:
        raise APIError(HTTPStatus.FORBIDDEN, str(exc), exc.rule, "PermissionDeniedError") from exc


def _label(state: SteeringState, sae: str, index: int) -> str | None:
    """The feature's label and explanation, as its catalogue has them; None without one."""
    catalogue = state.catalogue(sae)
    if catalogue is None:
        return None
    card = catalogue.card(index)
    return ". ".join(t for t in (card["label"].split(" → ")[0], card.get("explanation", "")) if t)


class Sweep:
    """The answers of every setting to every prompt, measured."""

    def __init__(self, state: SteeringState, engine, index: int | None, body: CalibrateRequest, ids: list[list[int]], prompts: list[str], concept: str | None):
        self.state, self.engine, self.index, self.body = state, engine, index, body
        self.ids, self.prompts, self.concept = ids, prompts, concept
        self.limit = asyncio.Semaphore(max(1, min(IN_FLIGHT, state.gate.capacity // 2)))

    async def run(self, plans: list[Plan], progress: Callable[[int, int], None]) -> list[list[Answer]]:
        total, done = 2 * len(plans) * len(self.ids), [0]

        async def one(plan: Plan, n: int) -> tuple[list[int], str, float | None, float]:
            async with self.limit:
                tokens, text, fired = await self._answer(plan, n)
                done[0] += 1
                progress(done[0], total)
                logprobs = await self._logprobs(self.ids[n], tokens)
                done[0] += 1
                progress(done[0], total)
            return tokens, text, fired, perplexity(logprobs)

        # One generation failing (503, 429) cancels the rest rather than leaving them to run for nobody.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [[group.create_task(one(plan, n)) for n in range(len(self.ids))] for plan in plans]
        except* Exception as failed:
            raise failed.exceptions[0] from None
        results = [[task.result() for task in row] for row in tasks]
        return await asyncio.to_thread(self._judge, results)

    def _judge(self, results: list[list[tuple[list[int], str, float | None, float]]]) -> list[list[Answer]]:
        texts = [text for row in results for _, text, _, _ in row]
        answers = embedder().embed(texts, max_length=256)
        asked = embedder().embed(self.prompts)
        concept = embedder().embed([self.concept])[0] if self.concept else None
        judged = []
        for r, row in enumerate(results):
            vectors = answers[r * len(row) : (r + 1) * len(row)]
            relevance = (vectors * asked).sum(1)
            similarity = (vectors @ concept).tolist() if concept is not None else [None] * len(row)
            judged.append([Answer(fired, None if fired is None else fired > 0, similarity[n], float(relevance[n]), ppl) for n, (_, _, fired, ppl) in enumerate(row)])
        return judged

    async def _answer(self, plan: Plan, n: int) -> tuple[list[int], str, float | None]:
        """The prompt's answer under `plan`, and the share of its tokens where the feature fired
        (None when the plan reads no feature: a vector's sweep)."""
        state = self.state
        await _acquire(state, plan)
        read = plan.readout is not None
        readout_id, collector = state.readouts.open(plan.readout, (), 1, state.token_text) if read else (uuid.uuid4().hex, None)
        try:
            extra = {READOUT_KEY: ReadoutRequest.of(readout_id, state.readouts.address, plan.readout, (), None).model_dump_json()} if read else {}
            prompt = TokensPrompt(prompt_token_ids=self.ids[n])
            if plan.resolved is not None:
                extra[CONFIG_KEY] = plan.wire
                prompt["cache_salt"] = f"{uuid.uuid4().hex}:{plan.salt}" if plan.resolved.private() else plan.salt
            params = SamplingParams(max_tokens=self.body.max_tokens, temperature=self.body.temperature, seed=self.body.seed + n, extra_args=extra)
            final = None
            async for final in self.engine.generate(prompt, params, f"calibrate-{readout_id}"):
                pass
            if read and not await collector.until_ended():
                raise APIError(HTTPStatus.SERVICE_UNAVAILABLE, "the engine did not report the feature's activations; retry", "index", "ServiceUnavailableError")
            entries = collector.take(0) if read else []
        finally:
            if read:
                state.readouts.close(readout_id)
            if plan.resolved is not None:
                state.gate.release(1)
        output = final.outputs[0]
        if not read:
            return list(output.token_ids), output.text, None
        key = str(self.index)
        values = [(e.get("pre_activation") or e["features"])[key] for e in entries]
        return list(output.token_ids), output.text, sum(v > 0 for v in values) / max(1, len(values))

    async def _logprobs(self, prompt: list[int], answer: list[int]) -> list[float]:
        """The answer's tokens' log-probabilities under the unsteered model, after the prompt."""
        if not answer:
            return []
        ids = prompt + answer
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        final = None
        async for final in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params, f"calibrate-ppl-{uuid.uuid4().hex}"):
            pass
        return [final.prompt_logprobs[j][ids[j]].logprob for j in range(len(prompt), len(ids))]


async def _acquire(state: SteeringState, plan: Plan) -> None:
    """A steering slot for a steered answer, waiting while other requests hold them all."""
    if plan.resolved is None:
        return
    while not state.gate.try_acquire(1):
        await asyncio.sleep(0.05)


def _respond(
    head: dict, body: CalibrateRequest, settings: list[Setting], answers: list[list[Answer]], concept: str | None, length: float, unit: str,
    keep: Callable[[Calibration], bool],
) -> dict:  # fmt: skip
    unsteered = Measured.of(Setting(0.0), answers[0], statistics.median(a.perplexity for a in answers[0]))
    curve = [Measured.of(setting, row, unsteered.perplexity) for setting, row in zip(settings, answers[1:])]
    chosen = recommend(curve, body.fluency_budget)
    out = {
        **head, "fluency_budget": body.fluency_budget, "prompts": len(answers[0]), "concept": concept,
        "unsteered": vars(unsteered), "curve": [vars(row) for row in curve], "recommendation": None, "stored": False,
    }  # fmt: skip
    if chosen is None:
        out["message"] = f"no setting brought the concept within {body.fluency_budget:g}x the unsteered perplexity; try a larger fluency_budget or weaker settings"
        return out
    top = curve[chosen]
    calibration = Calibration(
        mode=body.mode, strength=top.strength * length, unit=unit, prompt_scale=top.prompt_scale, fluency_budget=body.fluency_budget,
        effect=top.concept, perplexity_ratio=top.perplexity_ratio, prompts=len(answers[0]), concept=concept or "",
    )  # fmt: skip
    out["recommendation"] = calibration.summary()
    out["stored"] = body.store and keep(calibration)
    return out
