"""Steering vectors: each file form loads as its convention says, and each vector mode steers a
token exactly as its formula, through resolution, the wire and the steering op's tables."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from features.sae import SAEFormatError
from features.vectors import PREFIX, direction_saes, load_vector
from steering import wire
from steering.hook import SAESteering, TokenIndex
from steering.spec import FeatureIntervention, SteeringError, SteeringLimits, SteeringSpec, resolve
from tests.sae_formats import gguf_control_vector

D = 16


def vec(seed: int) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(seed)) * 3


def test_gguf_control_vector_loads_each_direction_at_its_layer(tmp_path):
    dirs = {3: vec(0), 5: vec(1)}
    loaded = load_vector("v", str(gguf_control_vector(tmp_path / "v.gguf", dirs)))
    assert sorted(loaded.directions) == [3, 5]
    for layer, v in dirs.items():
        torch.testing.assert_close(loaded.directions[layer], v, rtol=0, atol=0)


def test_direction_files_load_with_their_layer(tmp_path):
    v = vec(2)
    save_file({"direction.4": v}, tmp_path / "numbered.safetensors")
    save_file({"refusal": v}, tmp_path / "meta.safetensors", metadata={"layer": "6"})
    np.save(tmp_path / "plain.npy", v.numpy())
    torch.save({"direction.7": v}, tmp_path / "numbered.pt")
    torch.save(v, tmp_path / "plain.pt")
    cases = {"numbered.safetensors": 4, "meta.safetensors": 6, "plain.npy@8": 8, "numbered.pt": 7, "plain.pt@9": 9}
    for source, layer in cases.items():
        loaded = load_vector("v", str(tmp_path / source))
        assert list(loaded.directions) == [layer], source
        torch.testing.assert_close(loaded.directions[layer], v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "write, source, message",
    [
        (lambda p: gguf_control_vector(p / "v.gguf", {0: vec(0)}), "v.gguf", "direction.0"),
        (lambda p: save_file({"direction.2": torch.full((D,), torch.nan)}, p / "v.safetensors"), "v.safetensors", "NaN"),
        (lambda p: save_file({"direction.2": torch.zeros(D)}, p / "v.safetensors"), "v.safetensors", "all zeros"),
        (lambda p: np.save(p / "v.npy", vec(0).numpy()), "v.npy", "give it as PATH@LAYER"),
        (lambda p: torch.save(torch.nn.Linear(D, 1), p / "v.pt"), "v.pt@3", "never unpickles"),
        (lambda p: np.save(p / "v.npy", np.array([{"a": 1}], dtype=object)), "v.npy@3", "without pickle"),
        (lambda p: (p / "v.gguf").write_bytes(b"GGUF" + b"\0" * 20), "v.gguf", "cannot read GGUF"),
        (lambda p: save_file({"a": vec(0), "b": vec(1)}, p / "v.safetensors"), "v.safetensors@2", "a single tensor"),
    ],
)
def test_bad_vector_files_are_named(tmp_path, write, source, message):
    write(tmp_path)
    with pytest.raises(SAEFormatError, match=message) as err:
        load_vector("v", str(tmp_path / source))
    assert str(tmp_path) in str(err.value)


def _steer(vectors: dict, features: list[FeatureIntervention], x: torch.Tensor, inline_layers=()) -> dict[int, torch.Tensor]:
    """x [T, D] steered at each layer by one request: resolve, encode, decode, write a row, run the op."""
    saes = direction_saes({vid: load_vector(vid, str(path)) for vid, path in vectors.items()}, D, 2, inline_layers)
    resolved = resolve(SteeringSpec(features=features), saes, SteeringLimits())
    decoded = wire.decode(wire.encode(resolved))
    out = {}
    for sae_id, sae in saes.items():
        index = TokenIndex.zeros(len(x))
        index.slot.fill_(1)
        hook = SAESteering(sae, index, rows=2, width=sae.slots, dtype=torch.float32)
        hook.set_row(1, [(f.index, f.c0, f.c1, f.gate, f.bias) for f in decoded.features if f.sae == sae_id], vectors=decoded.vectors)
        out[sae.cfg.layer] = x + hook.delta(x)
    return out


def test_each_mode_steers_as_its_formula(tmp_path):
    v, w = vec(3), vec(4)
    paths = {"a": gguf_control_vector(tmp_path / "a.gguf", {2: v, 3: w}), "b": gguf_control_vector(tmp_path / "b.gguf", {2: w})}
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(9)) * 4
    r = v / v.norm()
    p = x @ r
    cases = {
        "add raw": (FeatureIntervention(vector="a", mode="add", strength=2.0, layers=(2, 2)), x + 2.0 * v),
        "add norm": (FeatureIntervention(vector="a", mode="add", strength=2.0, unit="norm", layers=(2, 2)), x + 2.0 * r),
        "ablate": (FeatureIntervention(vector="a", mode="ablate", layers=(2, 2)), x - p[:, None] * r),
        "clamp": (FeatureIntervention(vector="a", mode="clamp", strength=1.5, layers=(2, 2)), x + (1.5 - p)[:, None] * r),
        "cap": (FeatureIntervention(vector="a", mode="cap", strength=0.5, layers=(2, 2)), x + (p.clamp(max=0.5) - p)[:, None] * r),
    }
    assert (p > 0.5).any() and (p < 0.5).any(), "the cap must bind on some tokens and not others"
    for name, (feature, expected) in cases.items():
        steered = _steer(paths, [feature], x)
        torch.testing.assert_close(steered[2], expected, rtol=1e-5, atol=1e-4, msg=name)
        torch.testing.assert_close(steered[3], x, rtol=0, atol=0, msg=f"{name}: layers (2, 2) leaves layer 3 alone")
    both = _steer(paths, [FeatureIntervention(vector="a", strength=1.0), FeatureIntervention(vector="b", strength=-1.0)], x)
    torch.testing.assert_close(both[2], x + v - w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(both[3], x + w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "feature, param, message",
    [
        (dict(vector="nope"), "steering.features[0].vector", "unknown vector 'nope'; loaded vectors: ['a']"),
        (dict(vector="a", sae="x", index=1), "steering.features[0].vector", "replaces sae and index"),
        (dict(vector="a", mode="scale", strength=2.0), "steering.features[0].mode", "add, ablate, clamp and cap"),
        (dict(vector="a", unit="max_act", strength=2.0), "steering.features[0].unit", "raw and norm"),
        (dict(vector="a", layers=(5, 9)), "steering.features[0].layers", "directions at layers [2], none in 5..9"),
        (dict(), "steering.features[0].sae", "give an SAE feature"),
        (dict(vector=[1.0] * D), "steering.features[0].layer", "needs a layer (or layers); this server takes them at layers [2, 3]"),
        (dict(vector=[1.0] * D, layers=(2, 4)), "steering.features[0].layers", "at layers [2, 3] (--inline-vector-layers), not [4]"),
        (dict(vector=[1.0] * (D - 1), layer=2), "steering.features[0].vector", f"d_in = {D} numbers, got {D - 1}"),
        (dict(vector=[0.0] * D, layer=2), "steering.features[0].vector", "length must be between 1e-06 and 60000"),
        (dict(vector=[1e200] * D, layer=2), "steering.features[0].vector", "length must be between 1e-06 and 60000"),
        (dict(vector="a", layer=2, layers=(2, 2)), "steering.features[0].layer", "not both"),
        (dict(sae="t", index=0, layer=2), "steering.features[0].layer", "applies to vectors"),
        (dict(sae=f"{PREFIX}2", index=0), "steering.features[0].sae", "unknown SAE"),
    ],
)
def test_vector_entries_are_refused_by_field(tmp_path, feature, param, message):
    saes = direction_saes({"a": load_vector("a", str(gguf_control_vector(tmp_path / "a.gguf", {2: vec(0)})))}, D, 1, [2, 3])
    with pytest.raises(SteeringError, match=re.escape(message)) as err:
        resolve(SteeringSpec(features=[FeatureIntervention(**feature)]), saes, SteeringLimits())
    assert err.value.param == param


def test_inline_vectors_steer_as_their_formula(tmp_path):
    v, u = vec(5), vec(6)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(3)) * 4
    r = u / u.norm()
    p = x @ r
    features = [
        FeatureIntervention(vector=v.tolist(), mode="add", strength=0.5, layers=(2, 3)),
        FeatureIntervention(vector=u.tolist(), mode="cap", strength=float(p.median()), layer=3),
    ]
    steered = _steer({}, features, x, inline_layers=[2, 3])
    torch.testing.assert_close(steered[2], x + 0.5 * v, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(steered[3], x + 0.5 * v + (p.clamp(max=float(p.median())) - p)[:, None] * r, rtol=1e-5, atol=1e-4)


def test_inline_vectors_are_capped_per_request(tmp_path):
    saes = direction_saes({}, D, 2, [2])
    features = [FeatureIntervention(vector=vec(i).tolist(), layer=2) for i in range(3)]
    with pytest.raises(SteeringError, match="at most 2 inline vectors") as err:
        resolve(SteeringSpec(features=features), saes, SteeringLimits(max_inline_vectors=2))
    assert err.value.param == "steering.features[2].vector"


def test_caps_judge_the_length_a_vector_adds(tmp_path):
    """A long vector's raw strength is judged as the length it adds, by the server's cap and a key's."""
    from server.policy import KeyPolicy, PolicyDenied, ProtectedFeature, authorize_steering

    saes = direction_saes({}, D, 2, [2])
    long = (torch.ones(D) * 100).tolist()  # length 400
    with pytest.raises(SteeringError, match="the vector's length") as err:
        resolve(SteeringSpec(features=[FeatureIntervention(vector=long, layer=2, strength=3.0)]), saes, SteeringLimits(max_strength=1000.0))
    assert err.value.param == "steering.features[0].strength"
    steering = resolve(SteeringSpec(features=[FeatureIntervention(vector=long, layer=2, strength=2.0)]), saes, SteeringLimits())
    assert (steering.features[0].unit, steering.features[0].requested) == ("norm", pytest.approx(800.0))
    with pytest.raises(PolicyDenied, match="caps"):
        authorize_steering(KeyPolicy(name="k", key="k", max_strength={"norm": 500.0}), steering)
    with pytest.raises(PolicyDenied, match="may not steer with inline vectors"):
        authorize_steering(KeyPolicy(name="k", key="k", protected=[ProtectedFeature(sae="x", index=1)]), steering)
