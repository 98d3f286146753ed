"""A server given an SAE in each published format and steering vectors in each file form (all
written in their real layouts) steers with them exactly as the transformers reference does,
float32 greedy."""

from __future__ import annotations

from functools import partial

import httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from safetensors.torch import save_file

from core.local import Server, stop_server
from features.formats import load_sae
from tests.helpers import chat_prompt_ids, in_one_batch, server_tokens, spec_and_reference
from tests.reference import VectorEdit, greedy
from tests.sae_formats import FORMAT_OF, WRITERS, gguf_control_vector
from tests.saes import residuals
from tests.serving import start_side_server

# A layer each, spread over the model's 30.
LAYERS = {name: 4 + 2 * n for n, name in enumerate(sorted(WRITERS))}
PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?"]
N_TOKENS = 12
PACE_S = 0.05  # added to each step (tests/pacing.py), so the two requests are seen sharing one


@pytest.fixture(scope="module")
def sources(tmp_path_factory, hf_model, tokenizer) -> dict[str, str]:
    root = tmp_path_factory.mktemp("formats")
    return {name: WRITERS[name](root / name, residuals(hf_model, tokenizer, layer), layer, 0).source for name, layer in LAYERS.items()}


@pytest.fixture(scope="module")
def vectors(tmp_path_factory, hf_model, tokenizer) -> dict[str, tuple[str, dict[int, torch.Tensor]]]:
    """id -> (--vector source, its direction at each layer): each the top principal direction of
    real residuals there, as long as their median norm."""
    root = tmp_path_factory.mktemp("vectors")

    def direction(layer: int) -> torch.Tensor:
        x = residuals(hf_model, tokenizer, layer)
        return torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[0] * float(x.norm(dim=-1).median())

    concept = {10: direction(10), 14: direction(14)}
    save_file({"refusal": direction(12)}, root / "refusal.safetensors", metadata={"layer": "12"})
    np.save(root / "plain.npy", direction(16).numpy())
    return {
        "concept": (str(gguf_control_vector(root / "concept.gguf", concept)), concept),
        "refusal": (str(root / "refusal.safetensors"), {12: direction(12)}),
        "plain": (f"{root / 'plain.npy'}@16", {16: direction(16)}),
    }


@pytest.fixture(scope="module")
def formats_server(tmp_path_factory, sources, vectors) -> Server:
    loaded = [a for vid, (source, _) in vectors.items() for a in ("--vector", f"{vid}={source}")]
    extra = ["--inline-vector-layers", "11-13", "--", "--logits-processors", "tests.pacing:Pacer"]
    server = start_side_server(tmp_path_factory, sources, "formats", [*loaded, *extra])
    yield server
    stop_server(server)


def test_saes_list_each_format(formats_server):
    listed = {s["id"]: s for s in httpx.get(f"{formats_server.url}/v1/saes").json()["data"]}
    assert {name: (s["format"], s["layer"]) for name, s in listed.items() if name != "default"} == {
        name: (FORMAT_OF[name], layer) for name, layer in LAYERS.items()
    }


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_format_steers_as_the_reference(name, formats_server, sources, hf_model, tokenizer):
    client = OpenAI(base_url=f"{formats_server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    sae = load_sae(name, sources[name])
    assert sae.cfg.layer == LAYERS[name]
    peak = float(sae.encode(residuals(hf_model, tokenizer, LAYERS[name]))[:, 0].max())
    assert peak > 0, "feature 0 (the top principal direction) must fire on real text"
    spec, interventions = spec_and_reference({name: sae}, [{"sae": name, "index": 0, "mode": "clamp", "strength": min(4 * peak, 1000.0)}])
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    expected = [greedy(hf_model, ids, N_TOKENS, interventions) for ids in prompts]
    assert expected != [greedy(hf_model, ids, N_TOKENS) for ids in prompts], f"{name}: steering too weak to test"
    assert [server_tokens(client, model, ids, N_TOKENS, spec) for ids in prompts] == expected


def test_vectors_are_listed(formats_server, vectors):
    listed = httpx.get(f"{formats_server.url}/v1/vectors").json()["data"]
    assert {v["id"]: v["layers"] for v in listed} == {vid: sorted(dirs) for vid, (_, dirs) in vectors.items()}
    assert all(s["format"] != "direction" for s in httpx.get(f"{formats_server.url}/v1/saes").json()["data"])


def _projections(hf_model, tokenizer, vectors, vid: str, layer: int) -> torch.Tensor:
    v = vectors[vid][1][layer]
    return residuals(hf_model, tokenizer, layer) @ (v / v.norm())


VECTOR_CASES = {
    # name: (the steering field's entry, the layers and (mode, strength, unit) the reference applies)
    "gguf add over its layers": ({"vector": "concept", "mode": "add", "strength": 2.0}, [10, 14], ("add", 2.0, "raw")),
    "gguf add in a layer range": ({"vector": "concept", "mode": "add", "strength": 3.0, "layers": [12, 20]}, [14], ("add", 3.0, "raw")),
    "safetensors add norm": ({"vector": "refusal", "mode": "add", "strength": 40.0, "unit": "norm"}, [12], ("add", 40.0, "norm")),
    "npy ablate": ({"vector": "plain", "mode": "ablate"}, [16], ("ablate", 0.0, "raw")),
    "gguf clamp": ({"vector": "concept", "mode": "clamp", "strength": "low"}, [10, 14], ("clamp", "low", "raw")),
    "gguf cap": ({"vector": "concept", "mode": "cap", "strength": "median"}, [10, 14], ("cap", "median", "raw")),
}


@pytest.mark.parametrize("case", sorted(VECTOR_CASES))
def test_each_vector_mode_steers_as_the_reference(case, formats_server, vectors, hf_model, tokenizer):
    entry, layers, (mode, strength, unit) = VECTOR_CASES[case]
    vid = entry["vector"]
    if isinstance(strength, str):  # a level of the projections on real text: caps bind on some tokens
        p = _projections(hf_model, tokenizer, vectors, vid, layers[0])
        strength = float(p.median() if strength == "median" else p.quantile(0.05) - p.std())
        entry = {**entry, "strength": strength}
    edits = [VectorEdit(layer, vectors[vid][1][layer], mode, strength, unit) for layer in layers]
    client = OpenAI(base_url=f"{formats_server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    expected = [greedy(hf_model, ids, N_TOKENS, vectors=edits) for ids in prompts]
    assert expected != [greedy(hf_model, ids, N_TOKENS) for ids in prompts], f"{case}: steering too weak to test"
    assert [server_tokens(client, model, ids, N_TOKENS, {"features": [entry]}) for ids in prompts] == expected


def test_inline_vectors_steer_as_the_reference_and_apart(formats_server, vectors, hf_model, tokenizer):
    """Two requests in one batch, each with its own vector given as numbers, at layers 11-13 and
    at 12: each gets exactly the reference's tokens for its own vector, and none of the other's."""
    client = OpenAI(base_url=f"{formats_server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    ids = chat_prompt_ids(tokenizer, PROMPTS[0])
    mine, theirs = vectors["refusal"][1][12], -vectors["concept"][1][14]
    specs = [
        {"features": [{"vector": mine.tolist(), "mode": "add", "strength": 1.5, "layers": [11, 13]}]},
        {"features": [{"vector": theirs.tolist(), "mode": "add", "strength": 2.0, "layer": 12}]},
    ]
    expected = [
        greedy(hf_model, ids, N_TOKENS, vectors=[VectorEdit(layer, mine, "add", 1.5) for layer in (11, 12, 13)]),
        greedy(hf_model, ids, N_TOKENS, vectors=[VectorEdit(12, theirs, "add", 2.0)]),
    ]
    assert expected[0] != expected[1] and greedy(hf_model, ids, N_TOKENS) not in expected, "the vectors must steer apart"
    calls = [partial(server_tokens, client, model, ids, N_TOKENS, spec, PACE_S) for spec in specs]
    assert in_one_batch(formats_server.url, calls) == expected


def test_inline_vector_refusals_name_the_field(formats_server):
    url = f"{formats_server.url}/v1/chat/completions"
    cases = [
        ({"vector": [1.0, 2.0], "layer": 12}, "steering.features[0].vector"),
        ({"vector": [1.0] * 576, "layer": 20}, "steering.features[0].layer"),
        ({"vector": [1.0] * 576}, "steering.features[0].layer"),
    ]
    for entry, param in cases:
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "steering": {"features": [entry]}}  # fmt: skip
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
