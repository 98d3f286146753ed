"""A server given an SAE in each published format (files written in that format's real layout)
steers with it exactly as the transformers reference does with the loaded SAE, float32 greedy."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from core.local import Server, stop_server
from features.formats import load_sae
from tests.helpers import chat_prompt_ids, server_tokens, spec_and_reference
from tests.reference import greedy
from tests.sae_formats import FORMAT_OF, WRITERS
from tests.saes import residuals
from tests.serving import start_side_server

# A layer each, spread over the model's 30.
LAYERS = {name: 4 + 2 * n for n, name in enumerate(sorted(WRITERS))}
PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?"]
N_TOKENS = 12


@pytest.fixture(scope="module")
def sources(tmp_path_factory, hf_model, tokenizer) -> dict[str, str]:
    root = tmp_path_factory.mktemp("formats")
    return {name: WRITERS[name](root / name, residuals(hf_model, tokenizer, layer), layer, 0).source for name, layer in LAYERS.items()}


@pytest.fixture(scope="module")
def formats_server(tmp_path_factory, sources) -> Server:
    server = start_side_server(tmp_path_factory, sources, "formats", [])
    yield server
    stop_server(server)


def test_saes_list_each_format(formats_server):
    listed = {s["id"]: s for s in httpx.get(f"{formats_server.url}/v1/saes").json()["data"]}
    assert {name: (s["format"], s["layer"]) for name, s in listed.items()} == {
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
    spec, interventions = spec_and_reference({name: sae}, [{"sae": name, "index": 0, "mode": "clamp", "strength": 4 * peak}])
    prompts = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    expected = [greedy(hf_model, ids, N_TOKENS, interventions) for ids in prompts]
    assert expected != [greedy(hf_model, ids, N_TOKENS) for ids in prompts], f"{name}: steering too weak to test"
    assert [server_tokens(client, model, ids, N_TOKENS, spec) for ids in prompts] == expected
