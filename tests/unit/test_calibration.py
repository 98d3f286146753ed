"""Calibration (features/calibration.py): the measures of a sweep, the setting it recommends, the
file that keeps it, and `unit: "calibrated"` reading it back (steering/spec.py; a kept vector's,
server/state.py)."""

from __future__ import annotations

import math

import pytest
import torch

from features.calibration import (
    EMBEDDING_THRESHOLD,
    Answer,
    Calibration,
    Calibrations,
    Measured,
    Setting,
    perplexity,
    recommend,
)
from server.presets import Preset
from server.state import SavedVector, SavedVectors
from steering.spec import FeatureIntervention, SteeringError, SteeringLimits, SteeringSpec, resolve
from tests.saes import make_sae


def test_perplexity_is_the_exp_of_the_mean_negative_logprob():
    assert perplexity([math.log(0.5)] * 3) == pytest.approx(2.0)
    assert perplexity([math.log(0.5), math.log(0.125)]) == pytest.approx(4.0)  # geometric: exp((ln 2 + ln 8) / 2)
    assert perplexity([]) == math.inf


def test_measured_summarises_a_settings_answers():
    answers = [
        Answer(0.5, True, EMBEDDING_THRESHOLD + 0.1, 0.6, 6.0),
        Answer(0.1, True, EMBEDDING_THRESHOLD - 0.1, 0.4, 8.0),
        Answer(0.0, False, 0.9, 0.5, 30.0),
    ]
    row = Measured.of(Setting(2.0, 4.0), answers, unsteered_perplexity=4.0)
    assert (row.strength, row.prompt_scale) == (2.0, 4.0)
    assert row.fired == pytest.approx(0.2) and row.judged == pytest.approx(2 / 3, abs=1e-4)
    assert row.answers_fired == pytest.approx(2 / 3, abs=1e-4)
    assert row.concept == pytest.approx(1 / 3, abs=1e-4), "only the first answer both fires and is judged about the concept"
    assert row.perplexity == 8.0 and row.perplexity_ratio == 2.0  # medians, not means
    assert row.relevance == 0.5
    unjudged = Measured.of(Setting(1.0), [Answer(0.3, True, None, 0.5, 4.0), Answer(0.0, False, None, 0.5, 4.0)], 4.0)
    assert unjudged.judged is None and unjudged.concept == 0.5


def row(concept: float, ratio: float, strength: float = 1.0, prompt_scale: float = 1.0) -> Measured:
    return Measured(strength=strength, prompt_scale=prompt_scale, fired=concept, answers_fired=concept, judged=None, concept=concept,
                    relevance=0.5, perplexity=ratio, perplexity_ratio=ratio)  # fmt: skip


def test_recommend_takes_the_strongest_setting_within_the_budget():
    rows = [row(0.2, 1.2, 1.0), row(0.1, 1.9, 2.0), row(0.9, 2.4, 3.0), row(0.8, 3.5, 4.0), row(0.9, 1.6, 5.0)]
    assert recommend(rows, 2.0) == 1, "the strongest before 3x passes 2.0x, not the lucky 5x beyond it, nor the weaker 1x with more concept"
    assert recommend(rows, 2.5) == 2
    assert recommend(rows, 1.1) is None  # nothing that fluent
    assert recommend([row(0.0, 1.0)], 2.0) is None  # fluent, but no concept at all


def test_recommend_chooses_between_prompt_scales_by_concept():
    rows = [row(0.3, 1.5, 2.0), row(0.4, 2.6, 3.0), row(0.5, 1.9, 1.0, 4.0), row(0.6, 3.0, 1.5, 4.0), row(0.5, 1.5, 0.5, 4.0)]
    assert recommend(rows, 2.0) == 2  # strongest fluent: 2x at prompt x1 (0.3), 1x at prompt x4 (0.5)
    tie = [row(0.5, 1.8, 2.0), row(0.5, 1.6, 1.0, 4.0)]
    assert recommend(tie, 2.0) == 1, "the less perplexing on a tie"


def calibration(strength: float = 1.5, prompt_scale: float = 4.0, mode: str = "clamp", unit: str = "max_act") -> Calibration:
    return Calibration(mode=mode, strength=strength, unit=unit, prompt_scale=prompt_scale, fluency_budget=2.0,
                       effect=0.7, perplexity_ratio=1.8, prompts=12, concept="bridges")  # fmt: skip


def test_calibrations_are_kept_and_read_again_when_the_file_changes(tmp_path):
    kept = Calibrations(tmp_path)
    assert kept.get(3) is None
    kept.put(3, calibration())
    other = Calibrations(tmp_path)  # another API process
    assert other.get(3) == calibration()
    kept.put(5, calibration(2.0, 1.0))
    assert other.get(5) == calibration(2.0, 1.0)
    rows = other.annotate([{"index": 5, "label": "x"}, {"index": 4}])
    assert rows == [{"index": 5, "label": "x", "calibration": calibration(2.0, 1.0).summary()}, {"index": 4}]
    (tmp_path / "calibrations.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a calibrations file"):
        other.get(3)


@pytest.fixture
def sae(tmp_path):
    sae = make_sae(tmp_path, "jumprelu", "none")
    sae.calibrations.put(2, calibration(1.5, 4.0))
    sae.calibrations.put(4, calibration(3.0, 1.0, mode="add"))
    return sae


def resolved(sae, *features: dict, **spec):
    return resolve(SteeringSpec(features=[FeatureIntervention(sae="t", **f) for f in features], **spec), {"t": sae}, SteeringLimits())


def test_calibrated_unit_means_the_recommendation(sae):
    steering = resolved(sae, {"index": 2, "strength": 1.0, "unit": "calibrated"})
    f = steering.features[0]
    assert f.mode == "clamp", "the calibration's mode, where the request names none"
    assert f.strength == pytest.approx(1.5 * float(sae.max_act[2]))
    assert (f.unit, f.requested) == ("max_act", 1.5)  # what caps read
    assert steering.prompt_scale == 4.0, "the calibration's prompt_scale, where the request sets none"
    half = resolved(sae, {"index": 2, "strength": 0.5, "unit": "calibrated"}, prompt_scale=1.0)
    assert half.features[0].strength == pytest.approx(0.75 * float(sae.max_act[2])) and half.prompt_scale == 1.0


def test_calibrated_unit_refusals(sae):
    with pytest.raises(SteeringError, match="not calibrated") as exc:
        resolved(sae, {"index": 3, "strength": 1.0, "unit": "calibrated"})
    assert exc.value.param == "steering.features[0].unit"
    with pytest.raises(SteeringError, match="calibrated for mode 'clamp'") as exc:
        resolved(sae, {"index": 2, "mode": "add", "strength": 1.0, "unit": "calibrated"})
    assert exc.value.param == "steering.features[0].mode"
    with pytest.raises(SteeringError, match="different prompt_scales") as exc:
        resolved(sae, {"index": 2, "strength": 1.0, "unit": "calibrated"}, {"index": 4, "strength": 1.0, "unit": "calibrated"})
    assert exc.value.param == "steering.prompt_scale"
    with pytest.raises(SteeringError, match="calibrated strength takes it to 1.5") as exc:  # 1 x 1.5 max_act, past --max-strength 1
        spec = SteeringSpec(features=[FeatureIntervention(sae="t", index=2, strength=1.0, unit="calibrated")], prompt_scale=1.0)
        resolve(spec, {"t": sae}, SteeringLimits(max_strength=1.0))
    assert exc.value.param == "steering.features[0].strength"
    both = resolved(sae, {"index": 2, "strength": 1.0, "unit": "calibrated"}, {"index": 4, "strength": 1.0, "unit": "calibrated"}, prompt_scale=2.0)
    assert [f.mode for f in both.features] == ["clamp", "add"] and both.prompt_scale == 2.0


def test_a_preset_with_calibrated_features_takes_their_prompt_scale_unless_it_sets_one(sae):
    feature = {"sae": "t", "index": 2, "strength": 1.0, "unit": "calibrated"}
    preset = Preset(name="p", model="m", features=[feature])
    assert resolve(preset.spec(), {"t": sae}, SteeringLimits()).prompt_scale == 4.0
    assert resolve(Preset(name="p", model="m", features=[feature], prompt_scale=1.0).spec(), {"t": sae}, SteeringLimits()).prompt_scale == 1.0
    request = SteeringSpec(prompt_scale=0.0)
    assert resolve(preset.spec(request), {"t": sae}, SteeringLimits()).prompt_scale == 0.0


def test_a_vectors_answers_show_the_concept_by_the_judge_alone():
    answers = [Answer(None, None, EMBEDDING_THRESHOLD + 0.1, 0.5, 4.0), Answer(None, None, EMBEDDING_THRESHOLD - 0.1, 0.5, 4.0)]
    row = Measured.of(Setting(0.3), answers, 4.0)
    assert (row.fired, row.answers_fired, row.judged, row.concept) == (None, None, 0.5, 0.5)


def test_a_kept_vector_at_unit_calibrated_is_its_recommendation(sae):
    kept = SavedVectors()
    kept.put("v", SavedVector(15, torch.ones(4), stream_norm=100.0))
    spec = SteeringSpec(features=[FeatureIntervention(vector="v", strength=0.5, unit="calibrated")])
    with pytest.raises(SteeringError, match="not calibrated") as exc:
        kept.expand(spec, {"t": sae})
    assert exc.value.param == "steering.features[0].unit"
    kept.calibrate("v", calibration(30.0, 4.0, mode="add", unit="norm"))
    expanded = kept.expand(spec, {"t": sae})
    f = expanded.features[0]
    assert (f.mode, f.unit, f.strength, f.layer, f.vector) == ("add", "norm", 15.0, 15, [1.0] * 4)
    assert expanded.prompt_scale == 4.0, "the calibration's prompt_scale, where the request sets none"
    assert kept.expand(spec.model_copy(update={"prompt_scale": 1.0}), {"t": sae}).prompt_scale == 1.0
    there = FeatureIntervention(vector="v", strength=0.5, unit="calibrated", layer=15)
    assert kept.expand(SteeringSpec(features=[there]), {"t": sae}).features[0].strength == 15.0
    for elsewhere, param in (({"layer": 14}, "layer"), ({"layers": (14, 16)}, "layers")):
        with pytest.raises(SteeringError, match="calibrated at layer 15") as exc:
            kept.expand(SteeringSpec(features=[FeatureIntervention(vector="v", strength=0.5, unit="calibrated", **elsewhere)]), {"t": sae})
        assert exc.value.param == f"steering.features[0].{param}"
    with pytest.raises(SteeringError, match="calibrated for mode 'add'") as exc:
        kept.expand(SteeringSpec(features=[FeatureIntervention(vector="v", mode="clamp", strength=1.0, unit="calibrated")]), {"t": sae})
    assert exc.value.param == "steering.features[0].mode"
    with_feature = SteeringSpec(features=[*spec.features, FeatureIntervention(sae="t", index=4, strength=1.0, unit="calibrated")])
    with pytest.raises(SteeringError, match="different prompt_scales") as exc:  # the vector at 4, feature 4 at 1
        kept.expand(with_feature, {"t": sae})
    assert exc.value.param == "steering.prompt_scale"
