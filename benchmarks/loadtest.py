"""An OpenAI-compatible load generator: bounded request count, fixed output length, streamed.

Every request streams with `ignore_eos`, so each produces exactly `max_tokens` tokens and the
scenarios differ only in their steering. TTFT is the time to the first content chunk, and
inter-token latency the gaps between content chunks. A steered request's stream must echo its
steering (steerserve adds it to the first event); one that does not is counted in `unechoed`.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from openai import AsyncOpenAI

SpecFactory = Callable[[random.Random, int], dict | None]  # (rng, request number) -> steering or None


@dataclass
class Scenario:
    name: str
    concurrency: int
    requests: int
    max_tokens: int
    spec: SpecFactory
    labels: dict = field(default_factory=dict)
    # Each request its own `cache_salt`, so no prompt is served from any target's prefix cache:
    # a prefill scenario measures prefill, on every target alike (steered requests are salted anyway).
    fresh_prefill: bool = False
    extra: dict = field(default_factory=dict)  # request fields besides steering, e.g. a readout


@dataclass
class Result:
    scenario: str
    concurrency: int
    requests: int
    errors: int
    error_kinds: dict[str, int]  # "ExceptionType: message" -> count
    wall_s: float
    output_tokens: int
    output_tok_s: float
    prompt_tokens: int
    prompt_tok_s: float
    req_s: float
    ttft_ms: dict
    itl_ms: dict
    unechoed: int  # steered requests whose stream did not echo their steering
    labels: dict

    def row(self) -> dict:
        return asdict(self)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": round(qs[49], 2), "p90": round(qs[89], 2), "p99": round(qs[98], 2)}


@dataclass
class _Reply:
    ttft: float
    itl: list[float]
    tokens: int
    prompt_tokens: int
    echoed: bool


async def _one(
    client: AsyncOpenAI, model: str, prompt: str, max_tokens: int, steering: dict | None, salt: bool, fields: dict
) -> _Reply:
    extra = {"ignore_eos": True, **fields, **({"steering": steering} if steering else {}),
             **({"cache_salt": uuid.uuid4().hex} if salt else {})}  # fmt: skip
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = prompt_tokens = 0
    echoed = False
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    async for chunk in stream:
        echoed = echoed or bool((chunk.model_extra or {}).get("steering"))
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    if not stamps:
        raise RuntimeError(f"no text streamed ({tokens} tokens)")
    itl = [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]
    return _Reply((stamps[0] - start) * 1000, itl, tokens, prompt_tokens, echoed)


async def run(url: str, model: str, prompts: list[str], scenario: Scenario, seed: int = 0, api_key: str = "unused") -> Result:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=900)
    rng = random.Random(seed)
    jobs = [(prompts[i % len(prompts)], scenario.spec(rng, i)) for i in range(scenario.requests)]
    gate = asyncio.Semaphore(scenario.concurrency)
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = prompt_tokens = unechoed = 0
    errors: Counter[str] = Counter()

    async def worker(prompt: str, spec: dict | None) -> None:
        nonlocal tokens, prompt_tokens, unechoed
        async with gate:
            try:
                reply = await _one(client, model, prompt, scenario.max_tokens, spec, scenario.fresh_prefill, scenario.extra)
            except Exception as exc:
                errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
                return
            ttfts.append(reply.ttft)
            itls.extend(reply.itl)
            tokens += reply.tokens
            prompt_tokens += reply.prompt_tokens
            unechoed += bool(spec) and not reply.echoed

    start = time.perf_counter()
    await asyncio.gather(*(worker(p, s) for p, s in jobs))
    wall = time.perf_counter() - start
    await client.close()
    return Result(
        scenario=scenario.name,
        concurrency=scenario.concurrency,
        requests=scenario.requests,
        errors=errors.total(),
        error_kinds=dict(errors),
        wall_s=round(wall, 2),
        output_tokens=tokens,
        output_tok_s=round(tokens / wall, 1),
        prompt_tokens=prompt_tokens,
        prompt_tok_s=round(prompt_tokens / wall, 1),
        req_s=round((scenario.requests - errors.total()) / wall, 3),
        ttft_ms=percentiles(ttfts),
        itl_ms=percentiles(itls),
        unechoed=unechoed,
        labels=scenario.labels,
    )


def random_spec(saes: dict[str, int], features: int, modes: tuple[str, ...] = ("add", "clamp")) -> SpecFactory:
    """A distinct random spec per request: `features` features spread over the given SAEs (id -> d_sae)."""
    ids = sorted(saes)

    def make(rng: random.Random, n: int) -> dict:
        per_sae = {sae: features // len(ids) + (k < features % len(ids)) for k, sae in enumerate(ids)}
        # distinct features within a request: the server refuses a feature given twice
        return {"features": [
            {"sae": sae, "index": index, "mode": rng.choice(modes), "strength": round(rng.uniform(-2, 4), 3), "unit": "max_act"}
            for sae, count in per_sae.items() for index in rng.sample(range(saes[sae]), count)
        ]}  # fmt: skip

    return make


def conditioned(steered: SpecFactory, d_sae: int) -> SpecFactory:
    """`steered`'s specs, each feature gated by a `when` on another feature of its SAE (token scope
    on even requests, sticky on odd). The conditions draw nothing from `rng`, so request n steers
    the same features as it does under `steered`."""

    def make(rng: random.Random, n: int) -> dict:
        spec = steered(rng, n)
        scope = "sticky" if n % 2 else "token"
        return {**spec, "features": [
            {**f, "when": {"sae": f["sae"], "index": (f["index"] + 1 + n) % d_sae, "above": 0.2, "unit": "max_act", "scope": scope}}
            for f in spec["features"]
        ]}  # fmt: skip

    return make


def unsteered(rng: random.Random, n: int) -> None:
    return None


def mixed(steered: SpecFactory, fraction: float) -> SpecFactory:
    return lambda rng, n: steered(rng, n) if (n % 100) < fraction * 100 else None
