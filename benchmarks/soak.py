"""Soak: a bounded mixed load against one server for a while, then a check that nothing leaked.

    python -m benchmarks.soak --minutes 10 [--sae ID=PATH ...]  # starts its own steerserve
    python -m benchmarks.soak --url URL --pid PID ...           # a server that is already running

`--concurrency` clients loop until time is up, each request drawn at random: of a kind (unsteered,
or steered by 1-4 random features of the server's SAEs), streamed or not, greedy or sampled, and
about one in six cancelled by its client (a stream closed after a few events, or a whole response
given up on). Every answer is read: a whole response must be JSON with choices; a stream must be
JSON chunks with choices, none carrying `error`, ending in `[DONE]` (unless the soak closed it).
It passes when no request failed (a 4xx, a 5xx, an error event, a malformed body, a broken
connection; the soak's own cancellations are not failures), the engine and the steering gate are
back to zero requests once the load stops, and the server's resident memory (API process, engine
and workers) after warm-up stays within 10% of its value at the end of warm-up. Results go to
--out as JSON, every failed request named by its kind, status and message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = [
    "Give me a recipe for dinner.",
    "Write a short poem about the sea.",
    "Explain how tides work.",
    "What should I pack for a trip to the mountains?",
    "Tell me a fun fact about octopuses.",
    "How do I start learning to play the guitar?",
]
RSS_GROWTH_LIMIT = 0.10
IDLE = ("vllm:num_requests_running", "vllm:num_requests_waiting", "steerserve_steered_in_flight")
EXCERPT = 200  # characters of a failure's message kept in the report
Problem = tuple[str, str]  # a Failure's `failure` and `message`


@dataclass(frozen=True)
class RequestKind:
    """One kind of request the soak sends: its name in the report, and how it draws its `steering`
    field from the soak's random generator and the server's SAEs (id -> d_sae); None sends none."""

    name: str
    steering: Callable[[random.Random, dict[str, int]], dict | None]


def random_features(rng: random.Random, saes: dict[str, int]) -> dict:
    """1-4 distinct random features of the server's SAEs, each in a random mode and raw strength."""
    ids = sorted(saes)
    features = [
        {"sae": (sae := rng.choice(ids)), "index": rng.randrange(saes[sae]),
         "mode": rng.choice(["add", "clamp", "ablate", "scale"]), "strength": round(rng.uniform(-4, 8), 2)}
        for _ in range(rng.randint(1, 4))
    ]  # fmt: skip
    unique = {(f["sae"], f["index"]): f for f in features}
    return {"features": list(unique.values())}


KINDS = (RequestKind("unsteered", lambda rng, saes: None), RequestKind("steered", random_features))


@dataclass(frozen=True)
class Failure:
    """One request that failed: its kind, what went wrong (refused: 4xx, server_error: 5xx,
    error_event, bad_body, transport_error), the HTTP status if one came, and an excerpt of the message."""

    request: str
    failure: str
    status: int | None
    message: str


def error_message(body: object) -> str:
    """The message of an OpenAI-format error ({"error": {"message": ...}}), else the body itself, cut short."""
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message", error) if isinstance(error, dict) else error
    return str(message)[:EXCERPT]


def response_problem(status: int, text: str) -> Problem | None:
    """What is wrong with a whole response (or a stream refused before it began), as (failure,
    message): a 4xx or 5xx, a body that is not JSON, or a completion without choices; None if nothing."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        body = text
    if status >= 400:
        return ("server_error" if status >= 500 else "refused"), error_message(body)
    if not isinstance(body, dict) or not body.get("choices"):
        return "bad_body", f"no choices in {str(body)[:EXCERPT]}"
    return None


def stream_problem(lines: Iterable[str], closed_early: bool) -> Problem | None:
    """What is wrong with a 200 stream's lines, as (failure, message): an event carrying `error`
    (how vLLM reports a failure once the 200 is sent), an event that is not a JSON chunk with
    choices, an event after `[DONE]`, or no `[DONE]` unless the soak closed the stream itself."""
    done = False
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank lines between events, SSE comments
        data = line.removeprefix("data:").strip()
        if done:
            return "bad_body", f"event after [DONE]: {data[:EXCERPT]}"
        if data == "[DONE]":
            done = True
            continue
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            return "bad_body", f"event not JSON: {data[:EXCERPT]}"
        if isinstance(event, dict) and "error" in event:
            return "error_event", error_message(event)
        if not isinstance(event, dict) or not isinstance(event.get("choices"), list):
            return "bad_body", f"event without choices: {data[:EXCERPT]}"
    if not done and not closed_early:
        return "bad_body", "stream ended without [DONE]"
    return None


def engine_metrics(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Every sample on /metrics, summed over its labels."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    totals: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return totals


def resident_mb(pid: int) -> float:
    """Resident memory of a server: its process and every process under it."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


@dataclass
class SoakResult:
    minutes: float
    concurrency: int
    outcomes: dict[str, int]  # completed, cancelled (by the soak), or a Failure's `failure`
    statuses: dict[str, int]
    kinds: dict[str, int]  # requests sent of each kind
    failed: list[Failure]
    leaked: dict[str, float]  # engine running/waiting and steering slots still held once idle
    rss_warm_mb: float
    rss_peak_mb: float  # after warm-up
    rss_end_mb: float
    rss_samples: list[tuple[float, float]] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def rss_growth(self) -> float:
        return max(self.rss_peak_mb, self.rss_end_mb) / self.rss_warm_mb - 1

    def failures(self) -> list[str]:
        # One line per (failure, kind, status), with its count and first message; `failed` has them all.
        groups: dict[tuple, list[Failure]] = defaultdict(list)
        for f in self.failed:
            groups[f.failure, f.request, f.status].append(f)
        problems = [
            f"{len(fs)} x {failure} (request kind {request}, status {status}), first: {fs[0].message}"
            for (failure, request, status), fs in groups.items()
        ]
        if any(self.leaked.values()):
            problems.append(f"leaked: {self.leaked}")
        if self.rss_growth > RSS_GROWTH_LIMIT:
            problems.append(f"resident memory grew {self.rss_growth:.1%} after warm-up")
        return problems

    def summary(self) -> dict:
        return {**asdict(self), "requests": self.requests, "rss_growth": round(self.rss_growth, 4), "failures": self.failures()}


class Soak:
    def __init__(self, url: str, model: str, saes: dict[str, int], headers: dict[str, str],
                 kinds: Sequence[RequestKind] = KINDS, seed: int = 0):  # fmt: skip
        self.url, self.model, self.saes, self.headers, self.kinds = url, model, saes, headers, kinds
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.failed: list[Failure] = []

    def _body(self) -> tuple[str, dict, bool, bool]:
        rng = self.rng
        stream, cancel, kind = rng.random() < 0.5, rng.random() < 1 / 6, rng.choice(self.kinds)
        body: dict = {
            "model": self.model,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(8, 48),
            "temperature": rng.choice([0.0, 0.8]),
            "stream": stream,
        }
        steering = kind.steering(rng, self.saes)
        if steering is not None:
            body["steering"] = steering
        return kind.name, body, stream, cancel

    async def _stream(self, client: httpx.AsyncClient, body: dict, cancel: bool) -> tuple[int, Problem | None, bool]:
        """Status, what was wrong (or None), and whether the soak closed the stream itself."""
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return response.status_code, response_problem(response.status_code, response.text), False
            lines, events = [], 0
            async for line in response.aiter_lines():
                lines.append(line)
                events += line.startswith("data:")
                if cancel and events >= 3:
                    break  # leaving the block closes the connection mid-stream
            closed = cancel and events >= 3
            return 200, stream_problem(lines, closed_early=closed), closed

    async def _whole(self, client: httpx.AsyncClient, body: dict, cancel: bool) -> tuple[int, Problem | None, bool]:
        """The same for a whole response; one the soak gives up on (after a random wait, mid-prefill
        or mid-decode) raises TimeoutError."""
        wait = self.rng.uniform(0.2, 1.5) if cancel else None
        response = await asyncio.wait_for(client.post("/v1/chat/completions", json=body), wait)
        return response.status_code, response_problem(response.status_code, response.text), False

    async def _one(self, client: httpx.AsyncClient) -> None:
        kind, body, stream, cancel = self._body()
        self.sent[kind] += 1
        try:
            status, problem, cancelled = await (self._stream if stream else self._whole)(client, body, cancel)
        except TimeoutError:
            self.outcomes["cancelled"] += 1
            return
        except httpx.HTTPError as exc:
            status, problem, cancelled = None, ("transport_error", f"{type(exc).__name__}: {exc}"[:EXCERPT]), False
        if status is not None:
            self.statuses[str(status)] += 1
        if problem is not None:
            self.outcomes[problem[0]] += 1
            self.failed.append(Failure(kind, problem[0], status, problem[1]))
        else:
            self.outcomes["cancelled" if cancelled else "completed"] += 1

    async def run(self, seconds: float, concurrency: int) -> None:
        deadline = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=concurrency * 2)
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=600, limits=limits) as client:

            async def worker() -> None:
                while time.monotonic() < deadline:
                    await self._one(client)

            await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _sample_rss(pid: int, samples: list[tuple[float, float]], every: float, stop: asyncio.Event) -> None:
    start = time.monotonic()
    while not stop.is_set():
        samples.append((round(time.monotonic() - start, 1), round(resident_mb(pid), 1)))
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
        except TimeoutError:
            pass


def _settle(url: str, headers: dict[str, str], timeout: float = 120) -> dict[str, float]:
    """Engine and gate counts once the load has stopped (polled until all zero, or `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = engine_metrics(url, headers)
        leaked = {name: metrics[name] for name in IDLE}
        if not any(leaked.values()) or time.monotonic() > deadline:
            return leaked
        time.sleep(1)


def soak(url: str, pid: int, minutes: float, concurrency: int = 8, api_key: str | None = None, seed: int = 0,
         kinds: Sequence[RequestKind] = KINDS) -> SoakResult:  # fmt: skip
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    listing = httpx.get(f"{url}/v1/saes", headers=headers, timeout=30).json()["data"]
    if not listing:
        raise SystemExit("soak: the server has no SAE to steer with")
    load = Soak(url, model, {s["id"]: s["d_sae"] for s in listing}, headers, kinds, seed)
    seconds = minutes * 60
    warmup = min(120.0, seconds / 5)
    samples: list[tuple[float, float]] = []

    async def main() -> None:
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(pid, samples, max(1.0, min(10.0, seconds / 60)), stop))
        await load.run(seconds, concurrency)
        stop.set()
        await sampler

    asyncio.run(main())
    leaked = _settle(url, headers)
    end = resident_mb(pid)
    after = [mb for t, mb in samples if t >= warmup]
    warm = after[0] if after else samples[-1][1]
    return SoakResult(
        minutes=minutes,
        concurrency=concurrency,
        outcomes=dict(load.outcomes),
        statuses=dict(load.statuses),
        kinds=dict(load.sent),
        failed=load.failed,
        leaked=leaked,
        rss_warm_mb=warm,
        rss_peak_mb=max(after or [warm]),
        rss_end_mb=round(end, 1),
        rss_samples=samples,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--url", help="a running server (default: start steerserve on the default model)")
    parser.add_argument("--sae", action="append", default=[], metavar="ID=PATH", help="without --url: SAEs to load")
    parser.add_argument("--pid", type=int, help="with --url: the server's process, for its resident memory")
    parser.add_argument("--api-key")
    parser.add_argument("--out", default="benchmarks/results/soak.json")
    args = parser.parse_args()
    server = None
    if args.url:
        if args.pid is None:
            parser.error("--url needs --pid")
        url, pid = args.url, args.pid
    else:
        from core.local import start_steerserve

        sae_args = [a for s in args.sae for a in ("--sae", s)]
        server = start_steerserve(sae_args, Path(args.out).parent / "logs" / "soak-server.log")
        url, pid = server.url, server.process.pid
    try:
        started = time.monotonic()
        result = soak(url, pid, args.minutes, args.concurrency, args.api_key)
        print(f"soak: {time.monotonic() - started:.0f}s", flush=True)
    finally:
        if server is not None:
            from core.local import stop_server

            stop_server(server)
    summary = result.summary()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    samples = [mb for _, mb in result.rss_samples]
    print(json.dumps({k: v for k, v in summary.items() if k != "rss_samples"}, indent=2))
    print(f"RSS MB: min {min(samples)} median {statistics.median(samples)} max {max(samples)}")
    sys.exit(1 if result.failures() else 0)


if __name__ == "__main__":
    main()
