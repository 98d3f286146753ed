"""`steerserve features label` through a running steerserve: the served model labels a handful of
features of a random SAE, every label is scored and stored, and the server's search finds them."""

from __future__ import annotations

import json

import httpx
import pytest

from features import labels
from features.activations import CONTEXT
from features.catalogue import Catalogue
from features.labelling import MIN_CONTEXTS
from server.cli import main
from tests.saes import TEXTS
from tests.serving import ADMIN, ADMIN_KEY


def _run(*argv: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    return done.value.code


def _search(server, q: str, **params) -> dict:
    response = httpx.get(f"{server.url}/v1/saes/lab/features", params={"q": q, **params}, headers=ADMIN, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_label_features_through_the_served_model(server, sae_dirs, model_dir, model_name, tmp_path):
    sae_dir = sae_dirs["lab"]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TEXTS * 12))
    assert _run("features", "build", "--sae", f"lab={sae_dir}", "--model", str(model_dir), "--text", str(text),
                "--max-tokens", str(4 * CONTEXT), "--work", str(tmp_path / "describe")) == 0  # fmt: skip
    assert _search(server, "the")["search"] == "words", "a catalogue without labels is searched by words"
    built = Catalogue.load(sae_dir)
    few = next(c["index"] for c in built.cards if len(c["top_contexts"]) < MIN_CONTEXTS)  # left with its token label
    labelled = [c["index"] for c in built.cards if len(c["top_contexts"]) >= MIN_CONTEXTS][:6]

    work = tmp_path / "labels"
    label = ["features", "label", "--sae", str(sae_dir), "--labeler-url", f"{server.url}/v1", "--labeler-api-key", ADMIN_KEY,
             "--features", ",".join(map(str, [*labelled, few])), "--work", str(work)]  # fmt: skip
    assert _run(*label) == 0
    [replies_file] = work.glob("llm-*.jsonl")
    replies = {r["index"]: r for r in map(json.loads, replies_file.read_text().splitlines())}
    assert sorted(replies) == labelled and {r["model"] for r in replies.values()} == {model_name}

    catalogue = Catalogue.load(sae_dir)
    labeller = f"llm:{model_name}"
    for index in labelled:
        card = catalogue.card(index)
        candidates = {"tokens": labels.token_label(card), labeller: labels.parse_explanation(replies[index]["reply"], labeller)}
        assert set(card["labeller_scores"]) == set(candidates) and 0 <= card["label_score"] <= 1
        chosen = candidates[card["labeller"]]
        assert (card["label"], card.get("explanation", "")) == (chosen.label, chosen.explanation)
    assert all("labeller" not in card for card in catalogue.cards if card["index"] not in labelled), "only the features asked for"
    summary = json.loads((sae_dir / "labels.json").read_text())
    assert summary["scored_features"] == len(labelled) and summary["skipped"] == 1

    # The running server reads the rewritten catalogue and searches it by meaning.
    for index in labelled:
        card = catalogue.card(index)
        query = labels.Label(card["label"], card.get("explanation", ""), card["labeller"]).text  # what was embedded
        found = _search(server, query, limit=len(catalogue.cards), min_similarity=0.99)
        assert found["search"] == "meaning"
        mine = next(r for r in found["data"] if r["index"] == index)
        assert mine["similarity"] > 0.99 and mine["label_score"] == card["label_score"] and mine["label"] == card["label"]

    # Resumable: the replies on file are reused, nothing is asked again.
    assert _run(*label) == 0
    assert len(replies_file.read_text().splitlines()) == len(labelled)
