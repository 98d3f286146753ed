"""The OpenAI surface through the unmodified `openai` client, with steering in extra_body."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx

from tests.serving import ADMIN, PREFILL_CHUNK

STEER = {"features": [{"sae": "jr", "index": 0, "mode": "add", "strength": 3.0, "unit": "max_act"}]}
MESSAGES = [{"role": "user", "content": "Name a fruit."}]


def test_health_models_and_saes(server, client, model_name, saes):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert model_name == "SmolLM2-135M-Instruct"  # the base model is listed first, then the presets
    listing = httpx.get(f"{server.url}/v1/saes", headers=ADMIN).json()
    assert listing["object"] == "list"
    by_id = {s["id"]: s for s in listing["data"]}
    assert set(by_id) == set(saes) | {"default"}, "the default SAE loads with the default model"
    assert by_id["default"]["has_statistics"] and by_id["default"]["has_catalogue"]
    assert by_id["jr"] == {
        "id": "jr",
        "object": "sae",
        "owned_by": "steerserve",
        "hook_name": "blocks.15.hook_resid_post",
        "layer": 15,
        "d_in": 576,
        "d_sae": 256,
        "architecture": "jumprelu",
        "format": "saelens",
        "has_statistics": True,
        "has_catalogue": False,
    }
    assert by_id["relu"]["has_statistics"] is False
    assert by_id["topk"]["architecture"] == "topk"


def test_idle_connection_outlives_client_keep_alive(server):
    """A connection idle for longer than httpx's (the openai SDK's) 5 s keep-alive still answers:
    the server must not be the side that closes it first, or a reused connection can fail."""
    url = urlsplit(server.url)
    request = f"GET /health HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "the server closed the idle connection"


def test_chat_completion_echoes_resolved_steering(client, model_name, saes):
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=12, temperature=0)
    steered = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"steering": STEER}
    )
    assert "steering" not in (plain.model_extra or {})
    echo = steered.model_extra["steering"]
    raw = 3.0 * float(saes["jr"].max_act[0])
    assert echo["features"] == [{"sae": "jr", "index": 0, "mode": "add", "strength": raw, "unit": "raw"}]
    assert len(echo["hash"]) == 32
    assert steered.choices[0].message.content != plain.choices[0].message.content
    assert steered.usage.completion_tokens == 12 and steered.usage.prompt_tokens > 0


def test_streaming_matches_non_streaming(client, model_name):
    kwargs = dict(model=model_name, messages=MESSAGES, max_tokens=16, temperature=0, extra_body={"steering": STEER})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].model_extra["steering"]["features"][0]["index"] == 0
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert chunks[-1].usage.completion_tokens == 16


def test_n_seed_stop_logprobs(client, model_name):
    sampled = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_completion_tokens=10, n=3, temperature=1.0, seed=7,
        extra_body={"steering": STEER},
    )  # fmt: skip
    again = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_completion_tokens=10, n=3, temperature=1.0, seed=7,
        extra_body={"steering": STEER},
    )  # fmt: skip
    assert len(sampled.choices) == 3
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]
    with_logprobs = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"steering": STEER},
    )  # fmt: skip
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    stopped = client.completions.create(model=model_name, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert " 7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_seeded_request_prefilled_in_chunks(server, client, model_name):
    """vLLM 0.32's CPU runner raised on a seeded request whose prompt is prefilled in chunks,
    ending the engine for everyone (core/vllm_internals.py fixes it)."""
    fruits = ", ".join(["apple", "pear", "plum", "fig", "cherry"] * 80)
    kwargs = dict(
        model=model_name, messages=[{"role": "user", "content": f"Pick one of these: {fruits}."}],
        max_tokens=8, temperature=1.0, seed=11,
    )  # fmt: skip
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert first.usage.prompt_tokens > 2 * PREFILL_CHUNK
    assert first.choices[0].message.content == second.choices[0].message.content
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_completions_endpoint_steers(client, model_name):
    prompt = "The best thing about summer is"
    plain = client.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0)
    steered = client.completions.create(
        model=model_name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"steering": STEER}
    )
    assert steered.model_extra["steering"]["hash"]
    assert steered.choices[0].text != plain.choices[0].text
