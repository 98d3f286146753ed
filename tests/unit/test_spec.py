"""Resolution of a steering spec: units, request scale, and the worker's wire form."""

from __future__ import annotations

import pytest
import torch

from steering import spec as spec_module
from steering import wire
from steering.spec import FeatureIntervention, SteeringError, SteeringLimits, SteeringSpec, resolve
from tests.saes import make_sae


@pytest.fixture
def sae(tmp_path):
    return make_sae(tmp_path, "jumprelu", "none")


def one(sae, **feature) -> tuple:
    spec = SteeringSpec(features=[FeatureIntervention(sae="t", **feature)], scale=feature.pop("scale", 1.0))
    return resolve(spec, {"t": sae}, SteeringLimits()).features[0]


def test_units_and_scale(sae):
    assert one(sae, index=2, mode="add", strength=3.0).c0 == 3.0
    assert one(sae, index=2, mode="add", strength=3.0, unit="max_act").c0 == pytest.approx(3.0 * float(sae.max_act[2]))
    norm = one(sae, index=2, mode="add", strength=3.0, unit="norm")
    torch.testing.assert_close(norm.c0 * sae.W_dec[2].norm(), torch.tensor(3.0))
    scaled = resolve(
        SteeringSpec(features=[FeatureIntervention(sae="t", index=1, mode="clamp", strength=2.0)], scale=0.5),
        {"t": sae},
        SteeringLimits(),
    ).features[0]
    assert (scaled.c0, scaled.c1) == (1.0, -1.0)


def test_mode_coefficients(sae):
    assert (lambda f: (f.c0, f.c1))(one(sae, index=0, mode="clamp", strength=4.0)) == (4.0, -1.0)
    assert (lambda f: (f.c0, f.c1))(one(sae, index=0, mode="ablate", strength=9.0)) == (0.0, -1.0)
    assert (lambda f: (f.c0, f.c1))(one(sae, index=0, mode="scale", strength=3.0)) == (0.0, 2.0)


def test_empty_spec_steers_nothing(sae):
    assert resolve(SteeringSpec(), {"t": sae}, SteeringLimits()) is None


def test_per_sae_cap(sae):
    spec = SteeringSpec(features=[FeatureIntervention(sae="t", index=i) for i in range(3)])
    with pytest.raises(SteeringError) as err:
        resolve(spec, {"t": sae}, SteeringLimits(max_features_per_sae=2))
    assert err.value.param == "steering.features"


def test_wire_round_trip_and_digest(sae):
    features = [FeatureIntervention(sae="t", index=i, mode="clamp", strength=i / 3) for i in range(4)]
    resolved = resolve(SteeringSpec(features=features, prompt_scale=2.5), {"t": sae}, SteeringLimits())
    encoded = wire.encode(resolved)
    assert wire.decode(encoded) == ([("t", f.index, f.c0, f.c1, wire.OPEN, 0.0) for f in resolved.features], [], 2.5, [])
    others = [SteeringSpec(features=features[:3], prompt_scale=2.5), SteeringSpec(features=features)]
    for other in others:  # the prompt scale is part of the steering: KV written under one is not another's
        assert wire.cache_salt(encoded) != wire.cache_salt(wire.encode(resolve(other, {"t": sae}, SteeringLimits())))


def _refusal(sae, spec: SteeringSpec, limits: SteeringLimits = SteeringLimits()) -> SteeringError:
    with pytest.raises(SteeringError) as err:
        resolve(spec, {"t": sae}, limits)
    return err.value


def test_one_path_refuses_what_check_spec_did(sae):
    """A feature twice, scale or prompt_scale past the cap, unit norm on a zero decoder row: once
    refused by a second check that presets never ran, now by resolution itself."""
    twice = _refusal(sae, SteeringSpec(features=[FeatureIntervention(sae="t", index=2), FeatureIntervention(sae="t", index=2, mode="clamp")]))
    assert twice.param == "steering.features[1]" and "already steered by features[0]" in str(twice)
    limits = SteeringLimits(max_strength=10.0)
    scaled = _refusal(sae, SteeringSpec(features=[FeatureIntervention(sae="t", index=1, strength=5.0)], scale=3.0), limits)
    assert scaled.param == "steering.scale"
    prompt = SteeringSpec(features=[FeatureIntervention(sae="t", index=1, strength=5.0)], scale=1.5, prompt_scale=2.0)
    assert _refusal(sae, prompt, limits).param == "steering.prompt_scale"
    sae.W_dec[4] = 0.0
    norm = _refusal(sae, SteeringSpec(features=[FeatureIntervention(sae="t", index=4, strength=1.0, unit="norm")]))
    assert norm.param == "steering.features[0].unit" and "no decoder direction" in str(norm)


def test_resolution_yields_the_strengths_the_policy_reads(sae):
    spec = SteeringSpec(features=[FeatureIntervention(sae="t", index=1, strength=2.0, unit="max_act")], scale=1.5, prompt_scale=3.0)
    f = resolve(spec, {"t": sae}, SteeringLimits()).features[0]
    assert (f.unit, f.requested, f.peak) == ("max_act", 3.0, 9.0)
    assert f.strength == pytest.approx(3.0 * float(sae.max_act[1]))


@pytest.fixture
def early(tmp_path):
    return make_sae(tmp_path, "standard", "none", seed=1, layer=1, sae_id="early")


def test_gates_cross_the_wire(sae, early):
    """Each distinct condition once, numbered as the gate columns its features read; windows as given."""
    saes = {"t": sae, "early": early}
    sticky = {"sae": "early", "index": 4, "above": 0.5, "scope": "sticky"}
    spec = SteeringSpec(features=[
        FeatureIntervention(sae="t", index=0, strength=1.0, when={"sae": "t", "index": 9, "above": 0.1}),
        FeatureIntervention(sae="t", index=1, strength=1.0, when=sticky, tokens="completion", first_n=5),
        FeatureIntervention(sae="t", index=2, strength=1.0, when=sticky, after_n=2),
        FeatureIntervention(sae="t", index=3, strength=1.0, tokens="prompt"),
        FeatureIntervention(sae="t", index=4, strength=1.0),
    ])  # fmt: skip
    features, conditions, _, _ = wire.decode(wire.encode(resolve(spec, saes, SteeringLimits())))
    assert conditions == [("t", 9, 0.1, False), ("early", 4, 0.5, True)]
    assert [f.gate for f in features] == [
        wire.Gate(when=1), wire.Gate(when=2, prompt=False, first_n=5), wire.Gate(when=2, after_n=2),
        wire.Gate(first_n=0), wire.OPEN,
    ]  # fmt: skip
    ungated = wire.encode(resolve(SteeringSpec(features=spec.features[4:]), saes, SteeringLimits()))
    assert "conditions" not in ungated and ungated.count(",") == 4, "ungated steering crosses the wire as before"


@pytest.mark.parametrize(
    ("feature", "param"),
    [
        ({"when": {"sae": "late", "index": 0, "above": 0.0}}, "steering.features[0].when.sae"),  # read after it steers
        ({"when": {"sae": "twin", "index": 0, "above": 0.0}}, "steering.features[0].when.sae"),  # same layer, other SAE
        ({"when": {"sae": "nope", "index": 0, "above": 0.0}}, "steering.features[0].when.sae"),
        ({"when": {"sae": "t", "index": 10**6, "above": 0.0}}, "steering.features[0].when.index"),
        ({"tokens": "prompt", "first_n": 3}, "steering.features[0].tokens"),
        ({"first_n": 3, "after_n": 3}, "steering.features[0].after_n"),
    ],
)
def test_bad_gates_name_their_field(tmp_path, sae, early, feature, param):
    saes = {
        "t": sae, "early": early,
        "late": make_sae(tmp_path, "standard", "none", seed=2, layer=5, sae_id="late"),
        "twin": make_sae(tmp_path, "standard", "none", seed=3, layer=3, sae_id="twin"),
    }  # fmt: skip
    spec = SteeringSpec(features=[FeatureIntervention(sae="t", index=0, strength=1.0, **feature)])
    with pytest.raises(SteeringError) as err:
        resolve(spec, saes, SteeringLimits())
    assert err.value.param == param


def test_conditions_count_against_caps(sae, early):
    saes = {"t": sae, "early": early}
    many = [FeatureIntervention(sae="t", index=i, strength=1.0, when={"sae": "early", "index": i, "above": 0.0})
            for i in range(spec_module.MAX_CONDITIONS + 1)]  # fmt: skip
    with pytest.raises(SteeringError, match="distinct `when` conditions"):
        resolve(SteeringSpec(features=many), saes, SteeringLimits())
    # Two interventions and their condition on the same SAE take three of its slots.
    two = [FeatureIntervention(sae="t", index=i, strength=1.0, when={"sae": "t", "index": 7, "above": 0.0}) for i in range(2)]
    assert resolve(SteeringSpec(features=two), saes, SteeringLimits(max_features_per_sae=3)) is not None
    with pytest.raises(SteeringError, match="each distinct `when` condition counting as one"):
        resolve(SteeringSpec(features=two), saes, SteeringLimits(max_features_per_sae=2))


def test_steering_that_follows_the_prompt_length_is_kept_out_of_the_shared_prefix_cache(sae, early):
    saes, add = {"t": sae, "early": early}, {"sae": "t", "index": 0, "strength": 1.0}
    private = [
        SteeringSpec(features=[FeatureIntervention(**add)], prompt_scale=0.5),
        SteeringSpec(features=[FeatureIntervention(**add, tokens="completion")]),
        SteeringSpec(features=[FeatureIntervention(**add, first_n=3)]),
        SteeringSpec(features=[FeatureIntervention(**add, after_n=2)]),
        SteeringSpec(features=[FeatureIntervention(**add, when={"sae": "early", "index": 1, "above": 0.0, "scope": "sticky"})]),
    ]
    assert all(resolve(spec, saes, SteeringLimits()).private() for spec in private)
    shared = [SteeringSpec(features=[FeatureIntervention(**add)]),
              SteeringSpec(features=[FeatureIntervention(**add, when={"sae": "early", "index": 1, "above": 0.0})])]  # fmt: skip
    assert not any(resolve(spec, saes, SteeringLimits()).private() for spec in shared)
