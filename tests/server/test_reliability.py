"""Steering never leaks, never crashes the engine, and loses no request.

These tests need a differently configured server than the session's: a KV cache small enough
that a load preempts requests, an SAE with pathological statistics, room for hundreds of steered
requests, and a server that may be SIGTERMed at the end of the module. One such server serves
every test here but the engine-death one, which needs a server of its own to kill.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx
import psutil
import pytest
from openai import OpenAI

from benchmarks.soak import engine_metrics
from core.local import Server, stop_server
from features.formats import save_sae
from tests.helpers import chat_prompt_ids, in_one_batch
from tests.pacing import paced
from tests.serving import PREFILL_CHUNK, start_side_server

MODEL = "SmolLM2-135M-Instruct"
BLOCK, BLOCKS = 32, 160  # 5120 tokens of KV cache: far less than the load below asks for
DRAIN_S = 60  # --shutdown-timeout of the server here: far shorter than the long request below
MAX_TOKENS = 16
LOAD_PACE_S = 0.05  # a floor under each step while the load runs; the tokens are unchanged


def _hot_sae(path, jr) -> str:
    """jr's weights with pathological rows: feature 0's max_act makes 1000 max_act overflow float32
    (1e40), feature 1's lands just under float32's max, features 2 and 3 have no usable direction."""
    W_dec = jr.W_dec.clone()
    W_dec[2] = 0.0
    W_dec[3] = 1e-42  # its norm underflows float32 to 0
    max_act = jr.max_act.clone()
    max_act[0], max_act[1], max_act[4] = 1e37, 3e35, 3e35
    cfg = json.loads((jr.path / "cfg.json").read_text())
    weights = {"W_enc": jr.W_enc, "b_enc": jr.b_enc, "W_dec": W_dec, "b_dec": jr.b_dec, "threshold": jr.params["threshold"]}
    return str(save_sae(path, cfg, weights, max_act=max_act))


def _stop(server: Server) -> None:
    if server.process.poll() is None:
        stop_server(server)


@pytest.fixture(scope="module")
def small_kv(tmp_path_factory, sae_dirs, saes):
    hot = _hot_sae(tmp_path_factory.mktemp("hot") / "hot", saes["jr"])
    server = start_side_server(
        tmp_path_factory, sae_dirs, "small-kv",
        ["--sae", f"hot={hot}", "--max-model-len", "4096", "--max-num-seqs", "48", "--max-steered-requests", "256",
         "--shutdown-timeout", str(DRAIN_S),
         "--", "--max-num-batched-tokens", str(PREFILL_CHUNK), "--block-size", str(BLOCK),
         "--num-gpu-blocks-override", str(BLOCKS), "--logits-processors", "tests.pacing:Pacer"],
    )  # fmt: skip
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def small_client(small_kv) -> OpenAI:
    return OpenAI(base_url=f"{small_kv.url}/v1", api_key="unused", max_retries=0, timeout=900)


READOUT = {"sae": "jr", "top_k": 3, "features": [0, 1], "prompt": True}


def _generate(
    client: OpenAI, ids: list[int], spec: dict | None, stream: bool = False, n: int = 1, read: bool = False,
    pace_s: float = 0.0,
) -> list[list[int]] | list[tuple[list[int], list[dict]]]:
    """Token ids of each of the n choices: greedy for one, seeded sampling for several (vLLM
    refuses n > 1 with greedy), so every answer is reproducible. With `read`, each choice's
    (token ids, readout entries)."""
    extra = {"ignore_eos": True, "return_token_ids": True, **({"steering": spec} if spec else {}),
             **({"readout": READOUT} if read else {}), **paced(pace_s)}  # fmt: skip
    sampling = {"temperature": 0} if n == 1 else {"temperature": 1.0, "seed": 7}
    kwargs = dict(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, n=n, extra_body=extra, **sampling)
    tokens: list[list[int]] = [[] for _ in range(n)]
    readouts: list[list[dict]] = [[] for _ in range(n)]
    if stream:
        for chunk in client.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                tokens[choice.index] += choice.token_ids or []
                readouts[choice.index] += (choice.model_extra.get("readout") or {}).get("tokens", [])
    else:
        for choice in client.completions.create(**kwargs).choices:
            tokens[choice.index] = choice.token_ids
            readouts[choice.index] = (choice.model_extra.get("readout") or {}).get("tokens", [])
    return list(zip(tokens, readouts)) if read else tokens


# ---------------------------------------------------------------------------------------------
# 1. No leakage under load

PREFIX = "You are a meticulous assistant. Answer carefully, in full sentences, and stay on the topic. " * 8
SHORT = ["Name a fruit.", "What is two plus two?", "Say hello in French.", "List three colours."]
SHARED = ["Describe a city at night.", "Describe a forest at dawn.", "Describe a storm at sea.", "Describe a quiet library."]
STORY = "The old lighthouse keeper climbed the spiral stairs each evening, counting the steps as he went. " * 45
LONG = [STORY + "Summarise the story.", STORY + "Who is the main character?"]
SPECS: dict[str, dict | None] = {
    "none": None,
    "huge clamp": {"features": [{"sae": "jr", "index": 1, "mode": "clamp", "strength": 1000, "unit": "max_act"}]},
    "ablate": {"features": [{"sae": "topk", "index": i, "mode": "ablate"} for i in range(4)]},
    "huge negative add": {"features": [{"sae": "relu", "index": 0, "mode": "add", "strength": -1000}]},
    "scale": {"features": [{"sae": "jr", "index": 0, "mode": "scale", "strength": 40}]},
    "24 features": {
        "features": [
            {"sae": ("jr", "topk")[i % 2], "index": i, "mode": ("add", "clamp")[i % 3 == 0], "strength": 3.0, "unit": "max_act"}
            for i in range(24)
        ]
    },
}
# (stream, n, read) of each request of one (prompt, spec) pair
VARIANTS = [(False, 1, True), (True, 1, False), (False, 2, True), (True, 1, True), (False, 1, False), (True, 2, True), (False, 1, False)]


def test_no_leakage_under_load(small_kv, small_client, tokenizer):
    """Hundreds of unsteered and variously steered greedy requests at once, over shared prefixes,
    chunked prefills and a KV cache too small for them: every answer equals its answer alone, and
    so does every readout (each position once, no other request's positions or values)."""
    prompts = [chat_prompt_ids(tokenizer, t) for t in (*SHORT, *(PREFIX + q for q in SHARED), *LONG)]
    assert min(len(p) for p in prompts[-len(LONG) :]) > 3 * PREFILL_CHUNK, "long prompts are prefilled in chunks"
    steered = [name for name in SPECS if name != "none"]
    pairs = [(p, name) for p in range(len(prompts)) for name in ("none", steered[p % 5], steered[(p + 2) % 5])]
    solo = {(p, name, n): _generate(small_client, prompts[p], SPECS[name], n=n, read=True) for p, name in pairs for n in (1, 2)}
    for p in range(len(prompts)):
        assert any(solo[(p, name, 1)][0][0] != solo[(p, "none", 1)][0][0] for q, name in pairs if q == p and name != "none"), "steering bites"
    for (p, _, _), choices in solo.items():
        for tokens, readout in choices:
            assert [t["position"] for t in readout] == list(range(len(prompts[p]) + len(tokens) - 1))

    jobs = [(p, name, stream, n, read) for p, name in pairs for stream, n, read in VARIANTS]
    random.Random(0).shuffle(jobs)
    assert len(jobs) >= 200
    before = engine_metrics(small_kv.url)
    # Paced, so that all 96 in flight reach the engine before the first ones finish and the cache
    # runs short every time: unpaced, how many overlap depends on the machine, and once none were preempted.
    with ThreadPoolExecutor(96) as pool:
        futures = [pool.submit(_generate, small_client, prompts[p], SPECS[name], stream, n, read, LOAD_PACE_S) for p, name, stream, n, read in jobs]
        results = [f.result() for f in futures]
    after = engine_metrics(small_kv.url)

    assert after["vllm:num_preemptions_total"] > before["vllm:num_preemptions_total"], "the KV cache ran short"
    assert after["vllm:prefix_cache_hits_total"] > before["vllm:prefix_cache_hits_total"], "prefix caching was used"
    wrong = [
        (p, name, stream, n, read)
        for (p, name, stream, n, read), choices in zip(jobs, results)
        if not (_same_readouts(choices, solo[(p, name, n)]) if read else choices == [tokens for tokens, _ in solo[(p, name, n)]])
    ]
    assert not wrong, f"{len(wrong)} of {len(jobs)} answers differ from their answer alone, e.g. {wrong[:5]}"


def _same_readouts(got: list[tuple[list[int], list[dict]]], alone: list[tuple[list[int], list[dict]]]) -> bool:
    """The same tokens, and readouts of the same positions and tokens with the same values: to float32
    rounding, since the SAE encodes a request's tokens in groups that follow how its prefill was
    split into steps, and a matmul's rounding may follow its row count. Top indices match too,
    unless their activations tie to that rounding."""
    if [tokens for tokens, _ in got] != [tokens for tokens, _ in alone]:
        return False
    for (_, mine), (_, theirs) in zip(got, alone):
        if [(t["position"], t["token"]) for t in mine] != [(t["position"], t["token"]) for t in theirs]:
            return False
        for a, b in zip(mine, theirs):
            values = [(x["activation"], y["activation"]) for x, y in zip(a["top"], b["top"])]
            values += [(a["features"][i], b["features"][i]) for i in b["features"]]
            if any(abs(x - y) > 1e-4 * max(1.0, abs(y)) for x, y in values):
                return False
            if [x["index"] for x in a["top"]] != [y["index"] for y in b["top"]] and len({round(v, 3) for v, _ in values[:3]}) == 3:
                return False
    return True


# ---------------------------------------------------------------------------------------------
# 2. Numerical safety: the hook bounds every delta (steering/hook.py), validation refuses what
#    is known bad up front (steering/spec.py, server/limits.py)

EXTREMES = {
    "coefficient past float32 (1e40 raw)": [{"sae": "hot", "index": 0, "mode": "add", "strength": 1000, "unit": "max_act"}],
    "scale mode past float32": [{"sae": "hot", "index": 0, "mode": "scale", "strength": 1000, "unit": "max_act"}],
    "two near float32's max": [
        {"sae": "hot", "index": 1, "mode": "clamp", "strength": 1000, "unit": "max_act"},
        {"sae": "hot", "index": 4, "mode": "add", "strength": -1000, "unit": "max_act"},
    ],
    "64 features at the cap on one token": [
        {"sae": "jr", "index": i, "mode": "clamp", "strength": (-1000, 1000)[i % 2], "unit": "max_act"} for i in range(64)
    ],
    "tiny": [{"sae": "topk", "index": 0, "mode": "add", "strength": 1e-30}],
}
REFUSED = {
    "scale takes a strength past the cap": ({"scale": 1e300, "features": [{"sae": "jr", "index": 0, "strength": 5}]}, "steering.scale"),
    "norm on a zero direction": ({"features": [{"sae": "hot", "index": 2, "unit": "norm", "strength": 1}]}, "steering.features[0].unit"),
    "norm on a direction that underflows": (
        {"features": [{"sae": "hot", "index": 3, "unit": "norm", "strength": 1}]}, "steering.features[0].unit",
    ),
    "strength past the cap": ({"features": [{"sae": "jr", "index": 0, "strength": -1e9}]}, "steering.features[0].strength"),
}  # fmt: skip


def _complete(server: Server, prompt: str, steering: list[dict] | dict | None, pace_s: float = 0.0) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1, "ignore_eos": True}
    if steering is not None:
        body["steering"] = steering if isinstance(steering, dict) else {"features": steering}
    body.update(paced(pace_s))  # a floor under each step; the tokens are unchanged
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)


def _tokens_and_logprobs(response: httpx.Response) -> tuple[list[str], list[float]]:
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    return logprobs["tokens"], logprobs["token_logprobs"]


BATCH_PACE_S = 0.2


def test_extreme_steering_completes_or_is_refused_and_batchmates_are_unaffected(small_kv):
    plain = ["The capital of France is", "Once upon a time", "def add(a, b):"]
    alone = [_tokens_and_logprobs(_complete(small_kv, p, None)) for p in plain]
    # Paced: sent together, requests can reach the engine steps apart, and unpaced, at most 10 of
    # these 11 were once seen running at once. in_one_batch checks that all of them met.
    calls = [partial(_complete, small_kv, plain[0], spec, BATCH_PACE_S) for spec in EXTREMES.values()]
    calls += [partial(_complete, small_kv, p, None, BATCH_PACE_S) for p in plain * 2]
    responses = in_one_batch(small_kv.url, calls)
    for name, response in zip(EXTREMES, responses):
        tokens, logprobs = _tokens_and_logprobs(response)
        assert len(tokens) == 12 and all(math.isfinite(x) for x in logprobs), name
    for n, response in enumerate(responses[len(EXTREMES) :]):
        assert _tokens_and_logprobs(response)[0] == alone[n % len(plain)][0]
    # and nothing non-finite was left in KV-cache blocks that later requests reuse
    assert [_tokens_and_logprobs(_complete(small_kv, p, None)) for p in plain] == alone
    for name, (spec, param) in REFUSED.items():
        response = _complete(small_kv, plain[0], spec)
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"]["param"] == param, name


# ---------------------------------------------------------------------------------------------
# 3. A client that goes away aborts its request in the engine


def _wait_for(server: Server, predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(metrics := engine_metrics(server.url)):
        shown = {k: v for k, v in metrics.items() if k.startswith(("vllm:num_requests", "vllm:kv_cache", "steerserve_steered"))}
        assert time.monotonic() < deadline, f"{what} within {timeout}s; metrics: {shown}"
        time.sleep(0.5)


def _in_engine(metrics: dict[str, float]) -> float:
    return metrics["vllm:num_requests_running"] + metrics["vllm:num_requests_waiting"]


def test_disconnected_clients_abort_their_requests(small_kv):
    """Streams closed mid-way and a whole-response request given up on: each would run for
    minutes more (1900 tokens), so the engine's running count dropping to 0 at once means they
    were aborted, their KV blocks and steering slots freed."""
    long = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 1900, "ignore_eos": True}
    steer = {"features": [{"sae": "jr", "index": 0, "mode": "add", "strength": 2, "unit": "max_act"}]}
    clients, open_streams = [], []
    try:
        for i in range(6):
            client = httpx.Client(timeout=300)
            clients.append(client)
            body = {**long, "stream": True, **({"steering": steer} if i % 2 else {})}
            stream = client.send(client.build_request("POST", f"{small_kv.url}/v1/completions", json=body), stream=True)
            lines = stream.iter_lines()  # held: a dropped iterator would close the stream here and now
            assert stream.status_code == 200 and next(lines).startswith("data:")
            open_streams.append(lines)
        # 6 x 1900 tokens overflow this KV cache, so on a slow machine the first streams may already
        # have preempted others: they count as waiting, and must be aborted all the same
        _wait_for(small_kv, lambda m: _in_engine(m) >= 6 and m["steerserve_steered_in_flight"] == 3, 120, "6 in the engine")
    finally:
        for client in clients:
            client.close()
    with pytest.raises(httpx.ReadTimeout):  # a whole-response request whose client stops waiting
        httpx.post(f"{small_kv.url}/v1/completions", json={**long, "steering": steer}, timeout=5)
    _wait_for(
        small_kv,
        lambda m: _in_engine(m) == 0 and m["vllm:kv_cache_usage_perc"] == 0
        and m["steerserve_steered_in_flight"] == 0,
        30,
        "every request aborted and its blocks freed",
    )
    assert _complete(small_kv, "Name a fruit.", steer["features"]).status_code == 200


# ---------------------------------------------------------------------------------------------
# 4. Shutdown: readiness flips, in-flight requests drain, exit 0 (last: it stops the server)


PACE_S = 0.03  # added to every engine step the long request is in (tests/pacing.py)
LONG_TOKENS = 3000  # at least 90 s wherever it runs: far past the drain
# At least 6 s once admitted (every step it shares with the paced request takes 30 ms more): still
# running when the stream below has begun, and done within the drain even at 4 tokens/s on a loaded machine.
WHOLE_TOKENS = 200
STREAM_TOKENS = 100


def test_sigterm_flips_readiness_drains_and_exits_0(small_kv):
    results: dict[str, object] = {}
    streaming = threading.Event()  # the streamed request has sent its first token

    def request(name: str, max_tokens: int, stream: bool, **extra) -> None:
        body = {"model": MODEL, "prompt": f"Tell me about {name}.", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": stream, "steering": {"features": [{"sae": "jr", "index": 0, "strength": 1, "unit": "max_act"}]},
                **extra}  # fmt: skip
        try:
            with httpx.stream("POST", f"{small_kv.url}/v1/completions", json=body, timeout=300) as response:
                text = ""
                for piece in response.iter_text():
                    text += piece
                    if stream:
                        streaming.set()
                results[name] = (response.status_code, text)
        except httpx.HTTPError as exc:
            results[name] = exc

    def launch(*args, **extra) -> threading.Thread:
        thread = threading.Thread(target=request, args=args, kwargs=extra)
        thread.start()
        return thread

    # One request at a time, each in flight before the next goes out: on a loaded machine two
    # requests sent together have reached the engine seconds apart. Only the paced long request
    # depends on a duration, and the pace makes that a floor rather than a guess at decode speed.
    threads = [launch("everything", LONG_TOKENS, False, vllm_xargs={"pace_s": PACE_S})]
    _wait_for(small_kv, lambda m: m["steerserve_steered_in_flight"] == 1, 120, "the long request admitted")
    threads.append(launch("owls", WHOLE_TOKENS, False))
    _wait_for(small_kv, lambda m: m["steerserve_steered_in_flight"] == 2, 120, "the whole-response request admitted")
    threads.append(launch("rivers", STREAM_TOKENS, True))
    assert streaming.wait(120), f"the stream began within 120s; answers: {results}"
    assert not results, f"SIGTERM must find all three in flight, but some had finished: {results}"
    signalled = time.monotonic()
    small_kv.process.send_signal(signal.SIGTERM)  # the main process only, as a container runtime does
    time.sleep(0.5)
    assert httpx.get(f"{small_kv.url}/health").status_code == 503, "not ready once SIGTERM arrives"
    refused = httpx.post(f"{small_kv.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "ServiceUnavailableError"
    assert small_kv.process.wait(DRAIN_S + 60) == 0
    for thread in threads:
        thread.join()
    assert time.monotonic() - signalled > DRAIN_S - 1, "the drain waited for the long request"
    whole, streamed, cut = results["owls"], results["rivers"], results["everything"]
    assert whole[0] == 200 and json.loads(whole[1])["usage"]["completion_tokens"] == WHOLE_TOKENS, whole
    events = [line.removeprefix("data: ") for line in streamed[1].splitlines() if line.startswith("data: ")]
    assert streamed[0] == 200 and events[-1] == "[DONE]", streamed
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length", "the stream ran to its end"
    assert cut[0] == 503, f"a request past the drain timeout is answered, not left hanging: {cut}"


# ---------------------------------------------------------------------------------------------
# 5. Engine death: 503, then a non-zero exit


@pytest.fixture
def doomed(tmp_path_factory, sae_dirs):
    # Eager mode: start-up without compiling, since what is tested is what happens after the engine is gone.
    server = start_side_server(tmp_path_factory, sae_dirs, "doomed", ["--enforce-eager"])
    yield server
    _stop(server)


def test_engine_death_answers_503_and_exits_nonzero(doomed):
    engine = next(p for p in psutil.Process(doomed.process.pid).children(recursive=True) if "EngineCore" in p.name())
    result: list[httpx.Response] = []
    body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 1900, "ignore_eos": True}
    thread = threading.Thread(target=lambda: result.append(httpx.post(f"{doomed.url}/v1/completions", json=body, timeout=300)))
    thread.start()
    _wait_for(doomed, lambda m: m["vllm:num_requests_running"] == 1, 120, "the request running")
    engine.kill()
    thread.join(120)
    assert result and result[0].status_code == 503, result and result[0].text
    assert result[0].json()["error"]["type"] == "ServiceUnavailableError"
    assert doomed.process.wait(60) != 0, "a supervisor must see a failure and restart the server"
    assert "the engine process died" in doomed.log_text()
