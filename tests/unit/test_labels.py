"""Feature labels: WordNet read from its real file layout, the labellers' inputs, the detection
score against a pairwise reference, and labelling plus search by meaning on a small catalogue."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import torch

from features import labels, wordnet
from features.catalogue import CATALOGUE_FILE, EMBEDDINGS_FILE, Catalogue, save_catalogue
from features.embedding import embedder
from features.labelling import Negatives, choose_and_score, context_vectors, label_catalogue, wordnet_labels

WORDNET = Path(__file__).parents[1] / "fixtures" / "wordnet"  # an excerpt of WordNet 3.0's data and index files
DOG, CAT, CARNIVORE, PIANO = "n:02084071", "n:02121620", "n:02075296", "n:03928116"


def test_wordnet_synsets_senses_and_kinds():
    by_key = {s.key: s for s in wordnet.synsets(WORDNET)}
    dog = by_key[DOG]
    assert dog.words == ("dog", "domestic dog", "Canis familiaris") and dog.gloss.startswith("a member of the genus Canis")
    assert wordnet.ancestry(dog, by_key) == ["canine", "carnivore", "placental", "mammal"]
    lexicon = wordnet.Lexicon(WORDNET)
    assert lexicon.senses("dogs")[0] == DOG and lexicon.senses("Dog")[0] == DOG, "plurals and case find the base form"
    assert lexicon.senses("of") == []
    assert wordnet.common_hypernym(dog, by_key[CAT], by_key).key == CARNIVORE
    assert wordnet.common_hypernym(dog, by_key[PIANO], by_key) is None, "meeting only at 'whole' says nothing"


def test_activating_word_and_snippet():
    assert labels.activating_word("the «rab»bit ran") == "rabbit"
    assert labels.activating_word("over a« bridge» at") == "bridge"
    assert labels.activating_word("two «cat»s") == "cats"
    assert labels.activating_word("no mark") == ""
    text = "<|im_start|>user⏎Tell me about dogs<|im_end|>⏎<|im_start|>assistant⏎The« dog» barked"
    assert labels.snippet(text) == "dog: Tell me about dogs assistant The dog barked"
    assert labels.snippet("a white «rab»bit, running off into the woods") == "rabbit: a white rabbit, running off"


def test_auc_matches_a_pairwise_count():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        positive = torch.randint(0, 6, (7,), generator=g).float()
        negative = torch.randint(0, 6, (11,), generator=g).float()
        wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positive.tolist(), negative.tolist()))
        assert abs(labels.auc(positive, negative) - wins / (7 * 11)) < 1e-6
    assert labels.auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert labels.auc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0


def test_the_choice_and_the_score_come_from_their_own_ranks():
    """Candidate A matches the feature's choosing contexts, B its scoring ones: A is chosen, and the
    stored score is A's on the scoring ranks (low), not the choice's own (high)."""
    a, b, *rest = torch.eye(8)
    vectors = torch.stack([rest[r % 6] for r in range(20)])
    vectors[labels.CHOOSE_RANKS] = a
    vectors[labels.SCORE_RANKS] = b
    negatives = Negatives(torch.stack(rest[:4]) * 0.5 + 0.1 * (a + b), torch.arange(1, 5))
    options = [labels.Label("A", "", "first"), labels.Label("B", "", "second")]
    found = choose_and_score({0: options}, [vectors], {"A": a, "B": b}, negatives, negatives)[0]
    assert found["labeller"] == "first" and found["label"] == "A"
    assert found["labeller_scores"] == {"first": labels.auc(vectors[labels.SCORE_RANKS] @ a, negatives.vectors @ a), "second": 1.0}
    assert found["label_score"] == found["labeller_scores"]["first"] == 0.0


def test_parse_explanation():
    parsed = labels.parse_explanation("Label: Dogs and puppies\nExplanation: Fires on words for dogs.", "llm:m")
    assert (parsed.label, parsed.explanation, parsed.labeller) == ("Dogs and puppies", "Fires on words for dogs.", "llm:m")
    loose = labels.parse_explanation("**Bridges**\nThe feature looks for bridges.", "llm:m")
    assert (loose.label, loose.explanation) == ("Bridges", "The feature looks for bridges.")
    assert labels.parse_explanation("", "llm:m").label == "?"


def _card(index: int, words: list[str], promoted: list[str]) -> dict:
    contexts = [{"text": f"Yesterday in the park we saw the« {w}» near the gate, rank {r}", "activation": 20.0 - r} for r, w in enumerate(words)]
    return {"index": index, "label": "?", "density": 0.01, "max_act": 20.0, "top_contexts": contexts, "promoted_tokens": promoted}


def test_labellers_see_only_labelling_contexts():
    card = _card(0, [f"w{r}" for r in range(20)], [" bark"])
    shown = json.dumps(labels.explain_messages(card), ensure_ascii=False)
    assert all(f"« w{r}»" in shown for r in range(0, 16, 2)), "the first 8 labelling contexts are shown, marked"
    assert not any(f" w{r}»" in shown for r in range(1, 20, 2)), "no context a label is chosen or scored on"
    assert "'bark'" in shown


def test_labelling_and_search_by_meaning(tmp_path):
    """Dog, cat, piano and bridge features get the WordNet synsets of their words; every feature
    keeps one of its candidate labels with its score; search by meaning then finds the animals
    by their category and says when nothing is close."""
    cards = [
        _card(0, ["dog", "dogs", "puppy", "hound"] * 5, [" bark"]),
        _card(1, ["cat", "cats", "kitten", "cat"] * 5, [" purr"]),
        _card(2, ["piano", "pianos", "piano", "keyboard"] * 5, [" keys"]),
        _card(3, ["bridge", "bridges", "bridge", "span"] * 5, [" river"]),
        _card(4, ["the", "a", "the", "an"] * 5, [" of"]),
    ]
    found = wordnet_labels(cards, range(5), context_vectors(cards, embedder(), tmp_path / "contexts.safetensors"), embedder(), WORDNET)
    assert found[0].label == "dog / domestic dog / Canis familiaris" and "a kind of canine, carnivore" in found[0].explanation
    assert [found[i].label.split(" /")[0] for i in (1, 2, 3)] == ["cat", "piano", "bridge"]
    assert 4 not in found, "no synset names a feature that fires on articles"

    (tmp_path / CATALOGUE_FILE).write_bytes(gzip.compress(json.dumps(cards).encode()))
    summary = label_catalogue(tmp_path, ["wordnet"], tmp_path / "work", wordnet_root=WORDNET)
    assert summary["features"] == 5 and set(summary["labeller_auc"]) == {"tokens", "wordnet"}
    catalogue = Catalogue.load(tmp_path)
    for index, card in enumerate(catalogue.cards):
        candidates = {"tokens": labels.token_label(cards[index]), **({"wordnet": found[index]} if index in found else {})}
        assert set(card["labeller_scores"]) == set(candidates) and 0 <= card["label_score"] <= 1
        chosen = candidates[card["labeller"]]
        assert (card["label"], card["explanation"]) == (chosen.label, chosen.explanation)
    assert (tmp_path / EMBEDDINGS_FILE).exists()

    ranked = catalogue.search("animals", limit=5, min_similarity=-1)
    assert {r["index"] for r in ranked[:2]} == {0, 1}, ranked
    assert [r["similarity"] for r in ranked] == sorted((r["similarity"] for r in ranked), reverse=True)
    piano = catalogue.search("piano", limit=1)[0]
    assert piano == {**catalogue.summary(2), "similarity": round(float(catalogue.similarity("piano")[2]), 4), "exact": True}
    assert catalogue.search("quantum chromodynamics", min_similarity=0.9) == [], "nothing close: nothing listed"
    said, best = catalogue.nothing_close("quantum chromodynamics", 0.9), int(catalogue.similarity("quantum chromodynamics").argmax())
    assert f"the closest, #{best} " in said and said.endswith("below min_similarity 0.9")

    save_catalogue(tmp_path / CATALOGUE_FILE, [*catalogue.cards[:4], {**catalogue.cards[4], "label": "rewritten"}])
    assert Catalogue.load(tmp_path).embeddings is None, "embeddings made from another catalogue are never used"
