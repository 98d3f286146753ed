"""`POST /v1/saes/{sae}/features/{index}/calibrate` and `POST /v1/vectors/{name}/calibrate` through
the real engine: the measures agree with an independent reading of the same answers, the
recommendation follows the rule, and a stored recommendation is what `unit: "calibrated"` then
steers with."""

from __future__ import annotations

import json
import statistics

import httpx
import pytest
import torch

from features.calibration import Measured, recommend
from features.formats import load_sae
from server.cli import main
from tests.serving import ADMIN, ADMIN_KEY

PROMPTS = ["Tell me about your day.", "What is a good book?"]
FEATURE = 3  # of the test SAE "jr" (layer 15, with statistics, no catalogue)
SETTINGS = [{"strength": 2.0}, {"strength": 1.0, "prompt_scale": 4.0}]


def _calibrate(server, sae: str = "jr", index: int = FEATURE, **body) -> httpx.Response:
    body = {"prompts": PROMPTS, "settings": SETTINGS, "max_tokens": 12, "temperature": 0.0, **body}
    return httpx.post(f"{server.url}/v1/saes/{sae}/features/{index}/calibrate", json=body, headers=ADMIN, timeout=600)


@pytest.fixture(scope="module")
def calibrated(server) -> dict:
    reply = _calibrate(server, fluency_budget=50.0)  # no concept, no label: an answer shows it where the feature fires
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_the_unsteered_measures_match_an_independent_reading(calibrated, client, model_name, hf_model, tokenizer):
    fired, once, perplexities = [], [], []
    for prompt in PROMPTS:
        reply = client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0.0,
            extra_body={"readout": {"sae": "jr", "top_k": 0, "features": [FEATURE]}},
        )  # fmt: skip
        choice = reply.choices[0]
        values = [t["features"][str(FEATURE)] for t in choice.model_extra["readout"]["tokens"]]
        fired.append(sum(v > 0 for v in values) / len(values))
        once.append(any(v > 0 for v in values))
        context = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False)
        answer = tokenizer(choice.message.content, add_special_tokens=False).input_ids
        if choice.finish_reason == "stop":
            answer.append(tokenizer.eos_token_id)  # the engine's answer ends with it, and the calibration reads it
        ids = torch.tensor([list(context) + answer])
        with torch.no_grad():
            logits = hf_model(input_ids=ids).logits[0, len(context) - 1 : -1]
        perplexities.append(float(torch.nn.functional.cross_entropy(logits, ids[0, len(context) :]).exp()))
    unsteered = calibrated["unsteered"]
    assert unsteered["fired"] == pytest.approx(statistics.mean(fired), abs=1e-3)
    assert unsteered["answers_fired"] == pytest.approx(statistics.mean(once), abs=1e-3)
    assert unsteered["perplexity"] == pytest.approx(statistics.median(perplexities), rel=0.02)
    assert unsteered["perplexity_ratio"] == 1.0
    assert any(v > 0 for v in fired) or any(row["fired"] > 0 for row in calibrated["curve"]), "the feature never fired: the test could not tell"


def test_the_recommendation_follows_the_rule_and_is_stored(calibrated, server, client, model_name, sae_dirs):
    curve = calibrated["curve"]
    assert [(r["strength"], r["prompt_scale"]) for r in curve] == [(2.0, 1.0), (1.0, 4.0)]
    for row in curve:
        assert 0 <= row["fired"] <= 1 and row["judged"] is None and row["concept"] == row["answers_fired"]
    assert any(row["perplexity_ratio"] != 1.0 for row in curve), "steering changed no answer"
    top = calibrated["recommendation"]
    fluent = [r for r in curve if r["perplexity_ratio"] <= 50.0 and r["concept"] > 0]
    if not fluent:
        assert top is None and "fluency_budget" in calibrated["message"]
        pytest.fail("no setting showed the concept: the test SAE's feature should fire when clamped")
    best = max(fluent, key=lambda r: (r["concept"], -r["perplexity_ratio"]))
    assert (top["strength"], top["prompt_scale"], top["effect"]) == (best["strength"], best["prompt_scale"], best["concept"])
    assert calibrated["stored"] and calibrated["seconds"] > 0
    kept = json.loads((sae_dirs["jr"] / "calibrations.json").read_text())[str(FEATURE)]
    assert (kept["strength"], kept["prompt_scale"], kept["mode"], kept["unit"]) == (top["strength"], top["prompt_scale"], "clamp", "max_act")

    reply = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        extra_body={"steering": {"features": [{"sae": "jr", "index": FEATURE, "strength": 0.5, "unit": "calibrated"}]}},
    )  # fmt: skip
    echo = reply.model_extra["steering"]
    assert echo["features"][0]["mode"] == "clamp" and echo["prompt_scale"] == top["prompt_scale"]
    expected = 0.5 * top["strength"] * float(load_sae("jr", sae_dirs["jr"]).max_act[FEATURE])
    assert echo["features"][0]["strength"] == pytest.approx(expected, rel=1e-4)


def test_uncalibrated_features_and_bad_calibrations_are_refused(server, client, model_name):
    steer = {"features": [{"sae": "jr", "index": FEATURE + 1, "strength": 1.0, "unit": "calibrated"}]}
    reply = httpx.post(f"{server.url}/v1/chat/completions", headers=ADMIN, timeout=60,
                       json={"model": model_name, "messages": [{"role": "user", "content": "Hi"}], "steering": steer})  # fmt: skip
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "steering.features[0].unit", reply.text
    assert "calibrate" in reply.json()["error"]["message"]
    for sae, index, body, status, param in [
        ("nope", 0, {}, 404, "sae"),
        ("jr", 10**6, {}, 404, "index"),
        ("relu", 0, {}, 400, "sae"),  # no statistics: nothing to calibrate in
        ("jr", 0, {"fluency_budget": 1.0}, 400, "fluency_budget"),
        ("jr", 0, {"settings": []}, 400, "settings"),
        ("jr", 0, {"prompts": ["only one"]}, 400, "prompts"),
        ("jr", 0, {"model": "no-such-model"}, 404, "model"),
    ]:
        refused = _calibrate(server, sae, index, **body)
        assert refused.status_code == status, (sae, index, body, refused.text)
        error = refused.json()["error"]
        assert param in (error["param"] or "") or param in error["message"], refused.text
    refused = httpx.post(f"{server.url}/v1/saes/jr/features/0/calibrate", json={"prompts": PROMPTS}, timeout=60,
                         headers={"Authorization": "Bearer sk-test-presets"})  # fmt: skip
    assert refused.status_code == 403, refused.text
    assert client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices


def test_streamed_progress_and_the_cli(server, capsys):
    with httpx.stream("POST", f"{server.url}/v1/saes/jr/features/{FEATURE}/calibrate", headers=ADMIN, timeout=600,
                      json={"prompts": PROMPTS, "settings": SETTINGS[:1], "max_tokens": 8, "store": False, "stream": True}) as reply:  # fmt: skip
        assert reply.status_code == 200
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    progress, result = events[:-1], events[-1]
    assert progress and all(e["object"] == "calibration.progress" for e in progress)
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress) and progress[-1]["done"] == progress[-1]["total"] == 2 * 2 * 2
    assert result["object"] == "sae.feature.calibration" and result["stored"] is False and result["concept"] is None
    assert all(row["judged"] is None for row in result["curve"]), "no concept, no label: nothing for the embedding judge"

    with pytest.raises(SystemExit) as done:
        main(["features", "calibrate", "--sae", "jr", "--index", str(FEATURE), "--url", server.url, "--api-key", ADMIN_KEY, "--no-store",
              "--concept", "a calm day", "--fluency-budget", "50"])  # fmt: skip
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert f"feature {FEATURE}" in printed and "ppl x" in printed
    assert len([line for line in printed.splitlines() if line.strip().startswith(("1 ", "2 ", "3 ", "4 ", "0.5 ", "0.75 ", "1.25 ", "1.5 "))]) == 10



def test_a_kept_vector_is_calibrated_in_shares_of_its_stream_norm(server, client, model_name):
    positive = [[{"role": "user", "content": f"Tell me about {s}."}] for s in ("the Golden Gate Bridge", "San Francisco's bridge", "the bridge in the fog")]
    negative = [[{"role": "user", "content": f"Tell me about {s}."}] for s in ("a kitchen table", "the alphabet", "filing taxes")]
    derived = httpx.post(f"{server.url}/v1/vectors/contrast", headers=ADMIN, timeout=600,
                         json={"positive": positive, "negative": negative, "layer": 15, "name": "calibrate-test"}).json()  # fmt: skip
    steer = {"features": [{"vector": "calibrate-test", "strength": 1.0, "unit": "calibrated"}]}
    uncalibrated = httpx.post(f"{server.url}/v1/chat/completions", headers=ADMIN, timeout=60,
                              json={"model": model_name, "messages": [{"role": "user", "content": "Hi"}], "steering": steer})  # fmt: skip
    assert uncalibrated.status_code == 400 and uncalibrated.json()["error"]["param"] == "steering.features[0].unit", uncalibrated.text

    settings = [{"strength": 0.1}, {"strength": 0.3}, {"strength": 0.1, "prompt_scale": 4.0}]
    body = {"prompts": PROMPTS, "settings": settings, "max_tokens": 12, "temperature": 0.0, "concept": "the Golden Gate Bridge", "fluency_budget": 50.0}
    reply = httpx.post(f"{server.url}/v1/vectors/calibrate-test/calibrate", json=body, headers=ADMIN, timeout=600)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    assert (result["object"], result["unit"], result["mode"], result["layer"]) == ("vector.calibration", "stream_norm", "add", 15)
    assert result["stream_norm"] == pytest.approx(derived["stream_norm"])
    curve = result["curve"]
    assert [(r["strength"], r["prompt_scale"]) for r in curve] == [(0.1, 1.0), (0.3, 1.0), (0.1, 4.0)]
    for row in curve:  # nothing to fire: the judge alone says what shows the concept
        assert row["fired"] is None and row["answers_fired"] is None and row["concept"] == row["judged"]
    assert len({r["perplexity_ratio"] for r in curve}) > 1, "the settings answered alike: the test could not tell them apart"
    top = result["recommendation"]
    if top is None:
        pytest.fail(f"no setting showed the concept to the judge: {curve}")
    chosen = curve[recommend([Measured(**r) for r in curve], 50.0)]
    assert (top["strength"], top["prompt_scale"]) == (pytest.approx(chosen["strength"] * result["stream_norm"]), chosen["prompt_scale"])
    assert (top["unit"], top["effect"], result["stored"]) == ("norm", chosen["concept"], True)
    listed = httpx.get(f"{server.url}/v1/vectors", headers=ADMIN, timeout=60).json()["data"]
    assert next(v for v in listed if v["id"] == "calibrate-test")["calibration"] == top

    # Strength 1 in unit calibrated is the recommendation: the same answer as its setting spelled out.
    def answer(steering: dict) -> str:
        return client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=12, temperature=0.0, extra_body={"steering": steering}
        ).choices[0].message.content  # fmt: skip

    spelled = {"features": [{"vector": "calibrate-test", "strength": top["strength"], "unit": "norm"}], "prompt_scale": top["prompt_scale"]}
    assert answer(steer) == answer(spelled)
    other = 4.0 if top["prompt_scale"] == 1.0 else 1.0  # what a request would get had the calibration's prompt_scale been ignored
    assert answer(steer) != answer({**spelled, "prompt_scale": other}), "the calibrated prompt_scale made no difference: the test could not tell"

    for name, extra, status, param in [
        ("no-such-vector", {}, 404, "vector"),
        ("calibrate-test", {"concept": None}, 400, "concept"),
        ("calibrate-test", {"mode": "clamp"}, 400, "mode"),
    ]:
        refused = httpx.post(f"{server.url}/v1/vectors/{name}/calibrate", json={**body, **extra}, headers=ADMIN, timeout=60)
        assert refused.status_code == status, refused.text
        error = refused.json()["error"]
        assert param in (error["param"] or "") or param in error["message"], refused.text
    other = httpx.post(f"{server.url}/v1/vectors/calibrate-test/calibrate", json=body, timeout=60, headers={"Authorization": "Bearer sk-test-capped"})
    assert other.status_code == 403 and other.json()["error"]["param"] == "vector", other.text
