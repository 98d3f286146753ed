"""The soak's reading of answers (benchmarks/soak.py), on synthetic bodies: it once judged a
stream by its HTTP status alone, so an error event inside a 200 stream counted as completed."""

from __future__ import annotations

import json

from benchmarks.soak import response_problem, stream_problem

CHUNK = json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hi"}}]})
# What vLLM sends when generation fails after the 200 went out (create_streaming_error_response).
ERROR = json.dumps({"error": {"message": "Internal server error", "type": "InternalServerError", "code": 500}})


def sse(*events: str) -> list[str]:
    """The lines of an SSE body, as httpx's aiter_lines yields them: `data: ...` then a blank line."""
    return [line for event in events for line in (f"data: {event}", "")]


def test_a_whole_stream_passes():
    assert stream_problem(sse(CHUNK, CHUNK, "[DONE]"), closed_early=False) is None


def test_an_error_event_inside_a_200_stream_fails():
    assert stream_problem(sse(CHUNK, ERROR, "[DONE]"), closed_early=False) == ("error_event", "Internal server error")


def test_a_stream_cut_short_fails_unless_the_soak_closed_it():
    assert stream_problem(sse(CHUNK, CHUNK), closed_early=False) == ("bad_body", "stream ended without [DONE]")
    assert stream_problem(sse(CHUNK, CHUNK), closed_early=True) is None
    assert stream_problem(sse(CHUNK, ERROR), closed_early=True)[0] == "error_event"


def test_malformed_events_fail():
    assert stream_problem(sse(CHUNK, "{not json", "[DONE]"), closed_early=False)[0] == "bad_body"
    no_choices = json.dumps({"object": "chat.completion.chunk"})
    assert stream_problem(sse(no_choices, "[DONE]"), closed_early=False)[0] == "bad_body"
    assert stream_problem(sse(CHUNK, "[DONE]", CHUNK), closed_early=False)[0] == "bad_body"


def test_whole_responses():
    completion = json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": {"content": "Hi"}}]})
    refusal = json.dumps({"error": {"message": "index 9000 out of range", "type": "BadRequestError", "code": 400}})
    assert response_problem(200, completion) is None
    assert response_problem(400, refusal) == ("refused", "index 9000 out of range")
    assert response_problem(503, "Service Unavailable") == ("server_error", "Service Unavailable")
    assert response_problem(200, json.dumps({"object": "chat.completion", "choices": []}))[0] == "bad_body"
    assert response_problem(200, "<html>")[0] == "bad_body"
