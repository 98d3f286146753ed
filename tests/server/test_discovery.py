"""Finding features in the default SAE: search, cards, search by text, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from features.calibration import CALIBRATIONS_FILE
from features.catalogue import CLOSE, Catalogue
from features.formats import DEFAULT_SAE
from features.labels import activating_word
from tests.serving import ADMIN


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    loaded = Catalogue.load(DEFAULT_SAE)
    assert loaded is not None, "the default SAE ships with its catalogue"
    return loaded


def _get(server, path: str, **params) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", params=params, headers=ADMIN, timeout=120)


@pytest.mark.parametrize(
    "query, words",
    [("bridge", ("bridge",)), ("golden gate", ("golden", "gate")), ("san francisco", ("san", "francisco")),
     ("dog", ("dog",)), ("ocean", ("ocean", "sea")), ("music", ("music",))],
)  # fmt: skip
def test_search_finds_features_about_the_query(server, query, words):
    response = _get(server, "/v1/saes/default/features", q=query, limit=5)
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list" and 0 < len(listing["data"]) <= 5
    top = listing["data"][0]
    assert {"index", "label", "density", "max_act"} <= set(top)
    card = _get(server, f"/v1/saes/default/features/{top['index']}").json()
    contexts = [c["text"].lower() for c in card["top_contexts"]]
    # plainly about the query: most of its top contexts contain it
    assert sum(any(w in c for w in words) for c in contexts) >= len(contexts) // 2, contexts


def test_search_by_meaning_finds_a_category_by_its_members_and_admits_a_miss(server, catalogue):
    listing = _get(server, "/v1/saes/default/features", q="insects", limit=5).json()
    assert listing["search"] == "meaning" and listing["data"], listing
    close = [r["similarity"] for r in listing["data"] if not r["exact"]]
    assert close == sorted(close, reverse=True) and min(close) >= CLOSE
    assert all({"similarity", "label_score"} <= set(r) for r in listing["data"])
    insects = {"insect", "insects", "larva", "larvae", "bee", "bees", "ant", "ants", "butterfly", "butterflies", "beetle", "beetles", "moth", "wasp"}
    fired_on = {activating_word(c["text"]) for r in listing["data"] for c in catalogue.card(r["index"])["top_contexts"]}
    assert fired_on & insects, fired_on
    miss = _get(server, "/v1/saes/default/features", q="qwzx vbnm").json()
    assert miss["data"] == [] and "the closest, #" in miss["message"] and f"below min_similarity {CLOSE}" in miss["message"]


def test_feature_card(server, catalogue):
    index = catalogue.search("san francisco", 1)[0]["index"]
    card = _get(server, f"/v1/saes/default/features/{index}").json()
    assert card["index"] == index and card["sae"] == "default"
    assert 0 < card["density"] < 1 and card["max_act"] > 0
    assert card["quantiles"]["p50"] <= card["quantiles"]["p90"] <= card["quantiles"]["p99"]
    assert 0 < len(card["top_contexts"]) <= 20 and all("«" in c["text"] for c in card["top_contexts"])
    assert [c["activation"] for c in card["top_contexts"]] == sorted((c["activation"] for c in card["top_contexts"]), reverse=True)
    assert len(card["promoted_tokens"]) == len(card["suppressed_tokens"]) == 10


def test_calibrated_features_carry_their_calibration(server):
    """The default SAE ships the effect benchmark's calibrations (features/default/calibrations.json):
    its cards and search results carry each one's recommended setting and effect; others carry none."""
    kept = json.loads((DEFAULT_SAE / CALIBRATIONS_FILE).read_text())
    assert kept, "the default SAE ships calibrations"
    index, calibration = next(iter(kept.items()))
    assert _get(server, f"/v1/saes/default/features/{index}").json()["calibration"] == calibration
    uncalibrated = next(i for i in range(100) if str(i) not in kept)
    assert "calibration" not in _get(server, f"/v1/saes/default/features/{uncalibrated}").json()
    [listed] = _get(server, "/v1/saes/default/features", limit=1, offset=int(index)).json()["data"]
    assert listed["index"] == int(index) and listed["calibration"] == calibration


def test_search_by_text(server):
    text = "We drove across the Golden Gate Bridge into San Francisco."
    response = httpx.post(f"{server.url}/v1/saes/default/features/search", json={"text": text, "top_k": 10}, headers=ADMIN, timeout=300)
    assert response.status_code == 200
    data = response.json()["data"]
    assert len(data) == 10 and [d["score"] for d in data] == sorted((d["score"] for d in data), reverse=True)
    assert all(d["tokens"] and all(t["token"] in text for t in d["tokens"]) for d in data)
    labels = " ".join(f"{d['label']} {' '.join(t['token'] for t in d['tokens'])}" for d in data).lower()
    assert "bridge" in labels or "golden" in labels or "francisco" in labels, labels


def test_discovery_errors(server):
    unknown = _get(server, "/v1/saes/nope/features")
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "sae"
    no_catalogue = _get(server, "/v1/saes/jr/features", q="x")
    assert no_catalogue.status_code == 404 and "no feature catalogue" in no_catalogue.json()["error"]["message"]
    out_of_range = _get(server, "/v1/saes/default/features/999999")
    assert out_of_range.status_code == 404 and out_of_range.json()["error"]["param"] == "index"
    bad = httpx.post(f"{server.url}/v1/saes/default/features/search", json={"text": ""}, headers=ADMIN)
    assert bad.status_code == 400
    assert _get(server, "/v1/saes/default/features", limit=0).status_code == 400


def test_max_act_unit_on_the_default_sae(client, model_name, catalogue):
    index = catalogue.search("san francisco", 1)[0]["index"]
    steering = {"features": [{"sae": "default", "index": index, "mode": "clamp", "strength": 1.0, "unit": "max_act"}]}
    reply = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body={"steering": steering}
    )
    assert reply.model_extra["steering"]["features"][0]["strength"] == pytest.approx(catalogue.card(index)["max_act"], rel=1e-3)


def test_cli_search_prints_a_table(catalogue):
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "features", "search", "golden gate", "--limit", "3"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = out.strip().splitlines()
    assert lines[0].split()[:5] == ["index", "similarity", "label_score", "density", "max_act"]
    rows = [line for line in lines[1:] if line[:6].strip().isdigit()]  # an indented explanation follows each
    assert [int(line.split()[0]) for line in rows] == [r["index"] for r in catalogue.search("golden gate", 3)]
