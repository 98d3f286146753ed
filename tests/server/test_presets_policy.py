"""Presets as models, live reloading, the access policy, and the steering metrics."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, BadRequestError, OpenAI, PermissionDeniedError

from core.local import serve_command
from tests.helpers import chat_prompt_ids, server_tokens
from tests.serving import ADMIN, ADMIN_KEY, PRESETS, sae_args

CLAMP = [{"sae": "jr", "index": 1, "mode": "clamp", "strength": 4.0, "unit": "max_act"}]
CLAMP_PROMPT_SCALE = 0.25  # test-clamp's
MESSAGES = [{"role": "user", "content": "Tell me about the weather today."}]


def _as(server, key: str) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300)


def test_preset_model_equals_explicit_features(client, model_name):
    cards = {m.id: m for m in client.models.list().data}
    assert cards["test-clamp"].model_extra["parent"] == model_name
    via_preset = client.chat.completions.create(model="test-clamp", messages=MESSAGES)  # nothing else
    explicit = client.chat.completions.create(
        model=model_name, messages=MESSAGES, temperature=0.0, max_tokens=12,
        extra_body={"steering": {"features": CLAMP, "prompt_scale": CLAMP_PROMPT_SCALE}},
    )  # fmt: skip
    plain = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0.0, max_tokens=12)
    assert via_preset.choices[0].message.content == explicit.choices[0].message.content
    assert via_preset.choices[0].message.content != plain.choices[0].message.content
    assert via_preset.usage.completion_tokens == 12  # the preset's sampling defaults applied
    assert via_preset.model_extra["steering"]["preset"] == "test-clamp"
    assert via_preset.model_extra["steering"]["hash"] == explicit.model_extra["steering"]["hash"]


def test_preset_in_steering_field_with_scale_and_extra_features(client, model_name, saes, tokenizer):
    extra = {"sae": "relu", "index": 0, "mode": "add", "strength": 10.0}
    response = client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=4, temperature=0,
        extra_body={"steering": {"preset": "test-mix", "scale": 2.0, "features": [extra]}},
    )  # fmt: skip
    features = response.model_extra["steering"]["features"]
    jr, topk = saes["jr"].max_act, saes["topk"].max_act
    # preset scale 0.5 x request scale 2.0 on the preset's own features; request scale on the extra one
    assert [f["strength"] for f in features] == pytest.approx([6.0 * float(jr[0]), 4.0 * float(topk[2]), 20.0])
    assert response.model_extra["steering"]["prompt_scale"] == 1.0  # the preset's, as the request set none
    overridden = client.chat.completions.create(
        model="test-clamp", messages=MESSAGES, extra_body={"steering": {"prompt_scale": 2.0}}
    )
    assert overridden.model_extra["steering"]["prompt_scale"] == 2.0  # the request's replaces the preset's
    ids = chat_prompt_ids(tokenizer, "Hi")
    assert server_tokens(client, model_name, ids, 8, {"preset": "test-mix"}) == server_tokens(
        client, model_name, ids, 8, {"features": [
            {"sae": "jr", "index": 0, "mode": "add", "strength": 3.0, "unit": "max_act"},
            {"sae": "topk", "index": 2, "mode": "clamp", "strength": 2.0, "unit": "max_act"},
        ]},
    )  # fmt: skip


def test_presets_are_served_in_file_form(server):
    listing = httpx.get(f"{server.url}/v1/presets", headers=ADMIN).json()
    assert [p["name"] for p in listing["data"]] == ["test-clamp", "test-mix"]
    one = httpx.get(f"{server.url}/v1/presets/test-mix", headers=ADMIN).json()
    assert one == {
        "name": "test-mix",
        "description": "two SAEs at once",
        "model": "SmolLM2-135M-Instruct",
        "features": [
            {"sae": "jr", "index": 0, "mode": "add", "strength": 6.0, "unit": "max_act"},
            {"sae": "topk", "index": 2, "mode": "clamp", "strength": 4.0, "unit": "max_act"},
        ],
        "scale": 0.5,
        "prompt_scale": 1.0,
    }
    missing = httpx.get(f"{server.url}/v1/presets/nope", headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"


def _names(server) -> list[str]:
    return [p["name"] for p in httpx.get(f"{server.url}/v1/presets", headers=ADMIN).json()["data"]]


def _wait_for(predicate, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False


def test_presets_file_reloads_while_serving(server, presets_file, client):
    added = PRESETS + """\
  - name: test-new
    model: SmolLM2-135M-Instruct
    features: [{sae: jr, index: 2, mode: add, strength: 1.0}]
"""
    try:
        presets_file.write_text(added)
        assert _wait_for(lambda: "test-new" in _names(server)), "a valid edit takes effect"
        served = client.chat.completions.create(model="test-new", messages=MESSAGES, max_tokens=2)
        assert served.model_extra["steering"]["preset"] == "test-new", served.model_extra
        presets_file.write_text(added.replace("[{sae: jr, index: 2,", "[{sae: jr, index: 99999,"))
        assert _wait_for(lambda: "presets reload rejected" in server.log_text()), "an invalid edit is logged"
        assert _names(server) == ["test-clamp", "test-mix", "test-new"], "and the old presets keep serving"
        assert re.search(r"presets\.yaml:\d+: preset 'test-new': features\[0\]\.index: index 99999", server.log_text())
    finally:
        presets_file.write_text(PRESETS)
        assert _wait_for(lambda: _names(server) == ["test-clamp", "test-mix"])
    assert "presets reloaded" in server.log_text()


def test_keys_are_required_and_checked(server, model_name):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": model_name, "messages": MESSAGES, "max_tokens": 2},
            headers=headers,
        )
        assert response.status_code == 401
        assert response.json()["error"]["code"] == 401
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # vLLM's own routes too
    assert httpx.get(f"{server.url}/health").status_code == 200
    with pytest.raises(AuthenticationError):
        _as(server, "sk-wrong").models.list()


def test_presets_only_key(server, model_name):
    key = _as(server, "sk-test-presets")
    with pytest.raises(PermissionDeniedError) as denied:
        key.chat.completions.create(
            model=model_name, messages=MESSAGES, max_tokens=2, extra_body={"steering": {"features": CLAMP}}
        )
    assert denied.value.body["param"] == "raw_features"
    granted = key.chat.completions.create(model="test-clamp", messages=MESSAGES)
    assert granted.model_extra["steering"]["preset"] == "test-clamp" and granted.usage.completion_tokens == 12
    with pytest.raises(PermissionDeniedError) as other:
        key.chat.completions.create(model="test-mix", messages=MESSAGES, max_tokens=2)
    assert other.value.body["param"] == "presets"
    # a presets-only key may not add raw features on top of its preset either
    with pytest.raises(PermissionDeniedError):
        key.chat.completions.create(
            model="test-clamp", messages=MESSAGES, extra_body={"steering": {"features": CLAMP}}
        )
    # nor steer with a vector of its own (the session server takes them at layer 15)
    inline = [{"vector": [0.5] * 576, "layer": 15, "mode": "add", "strength": 1.0}]
    with pytest.raises(PermissionDeniedError) as vector:
        key.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2, extra_body={"steering": {"features": inline}})
    assert vector.value.body["param"] == "raw_features"
    steered = _as(server, ADMIN_KEY).chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=2, extra_body={"steering": {"features": inline}}
    )
    assert steered.model_extra["steering"]["features"][0] == {"inline_vector": 0, "layer": 15, "mode": "add", "strength": 1.0, "unit": "raw"}


def test_capped_key(server, model_name, saes):
    key = _as(server, "sk-test-capped")
    over = {"features": [{"sae": "jr", "index": 0, "mode": "add", "strength": 2.5, "unit": "max_act"}]}
    with pytest.raises(PermissionDeniedError) as denied:
        key.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2, extra_body={"steering": over})
    assert denied.value.body["param"] == "max_strength.max_act"
    scaled_over = {**over, "features": [{**over["features"][0], "strength": 1.5}], "scale": 2.0}
    with pytest.raises(PermissionDeniedError):
        key.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2, extra_body={"steering": scaled_over})
    prompt_over = {"features": [{**over["features"][0], "strength": 1.5}], "prompt_scale": 2.0}  # 3.0 on the prompt
    with pytest.raises(PermissionDeniedError):
        key.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2, extra_body={"steering": prompt_over})
    under = {"features": [{**over["features"][0], "strength": 1.5}], "prompt_scale": 0.5}
    served = key.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=2, extra_body={"steering": under}
    ).model_extra["steering"]
    # served as asked: the cap refuses what passes it, and trims nothing below it
    assert served["features"][0]["strength"] == pytest.approx(1.5 * float(saes["jr"].max_act[0])), served
    assert served["prompt_scale"] == 0.5, served


def test_protected_features(server, model_name):
    key = _as(server, "sk-test-guarded")

    def ask(feature: dict):
        return key.chat.completions.create(
            model=model_name, messages=MESSAGES, max_tokens=2, extra_body={"steering": {"features": [feature]}}
        )

    for feature in (
        {"sae": "jr", "index": 5, "mode": "ablate"},
        {"sae": "jr", "index": 5, "mode": "add", "strength": -3.0},
        {"sae": "jr", "index": 6, "mode": "add", "strength": 3.0},
    ):
        with pytest.raises(PermissionDeniedError) as denied:
            ask(feature)
        assert denied.value.body["param"] == "protected"
    allowed = ask({"sae": "jr", "index": 5, "mode": "add", "strength": 3.0}).model_extra["steering"]
    assert allowed["features"] == [{"sae": "jr", "index": 5, "mode": "add", "strength": 3.0, "unit": "raw"}], allowed


def _counter(server, name: str, **labels) -> float:
    """A counter's value from /metrics; 0 for a label set not yet counted."""
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_steering(server, client, model_name):
    before = {
        "steered": _counter(server, "steerserve_requests_total", steered="true", preset=""),
        "unsteered": _counter(server, "steerserve_requests_total", steered="false", preset=""),
        "preset": _counter(server, "steerserve_requests_total", steered="true", preset="test-clamp"),
        "denied": _counter(server, "steerserve_policy_denials_total", rule="raw_features"),
        "invalid": _counter(server, "steerserve_validation_errors_total", param="steering.features.index"),
    }
    for _ in range(3):
        client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2, extra_body={"steering": {"features": CLAMP}})
    for _ in range(2):
        client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2)
    client.chat.completions.create(model="test-clamp", messages=MESSAGES, max_tokens=2)
    with pytest.raises(PermissionDeniedError):
        _as(server, "sk-test-presets").chat.completions.create(
            model=model_name, messages=MESSAGES, extra_body={"steering": {"features": CLAMP}}
        )
    bad = {"features": [{"sae": "jr", "index": 10**6}]}
    assert httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": model_name, "messages": MESSAGES, "steering": bad},
        headers=ADMIN,
    ).status_code == 400
    assert _counter(server, "steerserve_requests_total", steered="true", preset="") - before["steered"] == 3
    assert _counter(server, "steerserve_requests_total", steered="false", preset="") - before["unsteered"] == 2
    assert _counter(server, "steerserve_requests_total", steered="true", preset="test-clamp") - before["preset"] == 1
    assert _counter(server, "steerserve_policy_denials_total", rule="raw_features") - before["denied"] == 1
    assert _counter(server, "steerserve_validation_errors_total", param="steering.features.index") - before["invalid"] == 1
    assert "vllm:" in httpx.get(f"{server.url}/metrics").text  # vLLM's own metrics are still there


def test_request_log_line_has_hash_not_prompt(server, client, model_name):
    secret = "my-very-private-prompt-text"
    response = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": secret}], max_tokens=2,
        extra_body={"steering": {"features": CLAMP}},
    )  # fmt: skip
    digest = response.model_extra["steering"]["hash"]
    assert _wait_for(lambda: digest in server.log_text(), 5)
    assert secret not in server.log_text()
    assert "sk-test-admin" not in server.log_text()


BAD_PRESETS = """\
presets:
  - name: fine
    model: SmolLM2-135M-Instruct
    features: [{sae: jr, index: 0}]
  - name: broken
    model: SmolLM2-135M-Instruct
    features: [{sae: jr, index: 0, mode: explode}]
"""


def test_bad_presets_or_policy_stop_startup(tmp_path, sae_dirs):
    presets = tmp_path / "bad.yaml"
    presets.write_text(BAD_PRESETS)
    policy = tmp_path / "policy.yaml"
    policy.write_text("keys:\n  - name: x\n    key: a\n    max_strength: {volts: 3}\n")
    base = serve_command("--sae", f"jr={sae_dirs['jr']}")
    result = subprocess.run([*base, "--presets", str(presets)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"{presets}:5: preset 'broken': features[0].mode" in result.stderr
    result = subprocess.run([*base, "--policy", str(policy)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and f"{policy}: keys[0].max_strength" in result.stderr


def test_presets_cli(tmp_path, sae_dirs, presets_file):
    cli = [sys.executable, "-m", "server.cli", "presets"]
    saes = sae_args(sae_dirs)
    ok = subprocess.run([*cli, "check", str(presets_file), *saes], capture_output=True, text=True)
    assert ok.returncode == 0 and "2 preset(s) valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_PRESETS)
    failed = subprocess.run([*cli, "check", str(bad), *saes], capture_output=True, text=True)
    assert failed.returncode == 2 and "preset 'broken'" in failed.stderr
    changed = tmp_path / "changed.yaml"
    changed.write_text(PRESETS.replace("scale: 0.5", "scale: 0.75"))
    diff = subprocess.run([*cli, "diff", str(presets_file), str(changed)], capture_output=True, text=True)
    assert diff.returncode == 1 and "~ test-mix.scale: 0.5 -> 0.75" in diff.stdout


def test_example_presets_file_is_valid():
    """The presets file `make serve` loads checks out against the default model and its SAE."""
    example = Path(__file__).parents[2] / "server" / "presets.example.yaml"
    out = subprocess.run([sys.executable, "-m", "server.cli", "presets", "check", str(example)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    names = re.findall(r"^  - name: (\S+)$", example.read_text(), re.MULTILINE)
    assert names, "the example file names its presets"
    assert [line.split()[1] for line in out.stdout.splitlines() if line.startswith("ok ")] == names
    assert out.stdout.strip().endswith(f"{len(names)} preset(s) valid")


TWICE = [{"sae": "jr", "index": 3, "mode": "add", "strength": 1.0}, {"sae": "jr", "index": 3, "mode": "clamp", "strength": 2.0}]
TWICE_PRESET = """\
  - name: twice
    model: SmolLM2-135M-Instruct
    features: [{sae: jr, index: 3, mode: add, strength: 1.0}, {sae: jr, index: 3, mode: clamp, strength: 2.0}]
"""


def test_a_feature_listed_twice_is_refused_everywhere_with_the_request_message(
    server, client, model_name, presets_file, sae_dirs, tmp_path
):
    """Once a presets file that steered a feature twice passed `presets check`, start-up and reload,
    and then every request using the preset got a 400. Every entry point now resolves alike."""
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2, extra_body={"steering": {"features": TWICE}})
    error = refused.value.body
    assert error["param"] == "steering.features[1]"
    message = error["message"]
    assert "already steered by features[0]" in message
    expected = f"preset 'twice': features[1]: {message}"

    twice = tmp_path / "twice.yaml"
    twice.write_text("presets:\n" + TWICE_PRESET)
    check = subprocess.run([*_cli("presets", "check", str(twice)), *sae_args(sae_dirs)], capture_output=True, text=True)
    assert check.returncode == 2 and expected in check.stderr, check.stderr
    start = subprocess.run(
        [*serve_command("--sae", f"jr={sae_dirs['jr']}"), "--presets", str(twice)], capture_output=True, text=True, timeout=300
    )
    assert start.returncode != 0 and expected in start.stderr, start.stderr
    try:
        presets_file.write_text(PRESETS + TWICE_PRESET)
        assert _wait_for(lambda: expected in server.log_text()), "reload refuses it with the same message"
        assert _names(server) == ["test-clamp", "test-mix"], "and the presets in force keep serving"
    finally:
        presets_file.write_text(PRESETS)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", *args]
