"""Labels people can read: each feature explained from its top contexts, and every explanation
scored by how well it picks the feature's own contexts out of other text.

Three labellers, each writing a short label and a one-sentence explanation:

- `tokens`: the tokens a feature fires on and promotes (the catalogue's automatic label);
- `wordnet`: the WordNet synset whose words and gloss sit closest, by sentence embedding, to the
  feature's contexts (offline, for the embedded default, whose own model writes poor explanations);
- `llm`: a language model behind any OpenAI-compatible chat endpoint (by default the served
  model), prompted as in Bills et al. 2023 with the contexts' activating tokens marked.

Contexts are split by rank so that no label is scored on what it was written from: the even
ranks (0, 2, ...) are what labellers see; ranks 1, 5, 9, ... choose between labellers; ranks 3, 7,
11, ... give the score that is stored and reported. The score is a detection AUC: the chance that
the label's embedding sits closer to one of the feature's held-out contexts than to a context of
another feature.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from features import catalogue
from features.wordnet import Lexicon, Synset, ancestry, common_hypernym

LABEL_RANKS = slice(0, None, 2)
CHOOSE_RANKS = slice(1, None, 4)
SCORE_RANKS = slice(3, None, 4)
NEGATIVES = 400  # contexts of other features each label is scored against
_MARK = re.compile(r"«(.*?)»")
_SPECIAL = re.compile(r"<\|[^|]*\|>")


@dataclass(frozen=True)
class Label:
    label: str
    explanation: str
    labeller: str

    @property
    def text(self) -> str:
        """What is embedded to score and search it."""
        return f"{self.label}: {self.explanation}" if self.explanation else self.label


def activating_word(context: str) -> str:
    """The whole word holding a context's «marked» token, lower-cased ("«rab»bit" -> "rabbit")."""
    mark = _MARK.search(context)
    if mark is None:
        return ""
    left = re.search(r"[^\W_]*$", context[: mark.start()]).group()  # letters and digits, accented ones too
    right = re.match(r"[^\W_]*", context[mark.end() :]).group()
    token = mark.group(1)
    if token[:1].isspace():
        left = ""  # the token starts a word
    return (left + token + right).strip().lower()


def snippet(context: str, before: int = 32, after: int = 12) -> str:
    """A context as it is embedded: its activating word, then the plain words around it, about
    `before` and `after` characters of them (whole words, chat-template tokens left out)."""
    mark = _MARK.search(context)
    if mark is None:
        return _plain(context)[-before:]
    words = _plain(f"{context[: mark.start()]}\0{mark.group(1)}\0{context[mark.end() :]}").split()
    first = next(i for i, w in enumerate(words) if "\0" in w)  # the mark's first word, then its last
    last = max(i for i, w in enumerate(words) if "\0" in w)
    start = next(i for i in range(first + 1) if len(" ".join(words[i:first])) <= before)
    end = next(i for i in range(len(words), last, -1) if len(" ".join(words[last + 1 : i])) <= after)
    return f"{activating_word(context)}: {' '.join(words[start:end]).replace(chr(0), '')}"


def _plain(text: str) -> str:
    return " ".join(_SPECIAL.sub(" ", text.replace("⏎", " ")).split())


def contexts(card: dict, ranks: slice) -> list[str]:
    return [c["text"] for c in card["top_contexts"][ranks]]


def token_label(card: dict) -> Label:
    """The catalogue's automatic label, from the contexts a labeller may see."""
    activating = [mark.group(1) for t in contexts(card, LABEL_RANKS) if (mark := _MARK.search(t))]
    return Label(catalogue.label(activating, card["promoted_tokens"]), "", "tokens")


def synset_text(synset: Synset) -> str:
    """A synset as it is matched against contexts: its first words and its definition."""
    return f"{', '.join(synset.words[:3])}: {_definition(synset)}"


def _definition(synset: Synset) -> str:
    """The gloss without its quoted examples."""
    return synset.gloss.split('; "')[0].strip()


def synset_label(synset: Synset, by_key: dict[str, Synset]) -> Label:
    """The synset's first words as the label; its gloss, without examples, and what it is a kind of."""
    words = [w.split("(")[0] for w in synset.words]  # "(a)": an adjective's position marker
    gloss = _definition(synset)
    kinds = ancestry(synset, by_key)
    kind = f" (a kind of {', '.join(kinds)})" if kinds else ""
    return Label(" / ".join(dict.fromkeys(words[:3])), f"{gloss}{kind}", "wordnet")


def synset_candidates(card: dict, lexicon: Lexicon, by_key: dict[str, Synset]) -> list[str]:
    """Synsets that may name a feature: senses of the three words it fires on most, and what
    the first noun senses of any two of them are both kinds of (dog and cat: carnivore)."""
    found = Counter(activating_word(t) for t in contexts(card, LABEL_RANKS))
    words = [w for w, _ in found.most_common() if w.isalpha() and len(w) >= 3][:3]
    keys = [key for w in words for key in lexicon.senses(w) if key in by_key]
    nouns = [by_key[ks[0]] for w in words if (ks := [k for k in lexicon.senses(w) if k.startswith("n:") and k in by_key])]
    for a, b in combinations(dict.fromkeys(nouns), 2):
        if (shared := common_hypernym(a, b, by_key)) is not None:
            keys.append(shared.key)
    return list(dict.fromkeys(keys))


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counted half: the Mann-Whitney statistic."""
    above = (positive[:, None] > negative[None, :]).float().mean()
    ties = (positive[:, None] == negative[None, :]).float().mean()
    return float(above + ties / 2)


def detection(label_vector: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> float:
    return auc(positives @ label_vector, negatives @ label_vector)


def negative_pool(cards: list[dict], live: list[int], ranks: slice, seed: int = 0) -> list[tuple[int, int]]:
    """(feature, rank) of one context at `ranks` of each of NEGATIVES random live features: the
    choice between labels and the stored score each draw theirs from their own ranks, so no
    context, positive or negative, is scored on that chose."""
    rng = np.random.default_rng(seed)
    pool = []
    for index in rng.choice(live, size=min(NEGATIVES, len(live)), replace=False).tolist():
        held = range(len(cards[index]["top_contexts"]))[ranks]
        if len(held):
            pool.append((index, held[int(rng.integers(len(held)))]))
    return pool


# --- the language-model labeller -------------------------------------------------------------

SYSTEM = (
    "We're studying features in a neural network. Each feature looks for some particular thing in a short text. "
    "Look at the parts of the text the feature activates for, marked with « and », and summarize what the "
    "feature is looking for. Don't list examples of words."
)
ANSWER_FORMAT = "Answer in exactly two lines:\nLabel: <two to five words>\nExplanation: <one sentence>"


def explain_messages(card: dict, shown: int = 8) -> list[dict]:
    """The chat that asks for a label: the labelling contexts (activating tokens marked) and the
    tokens the feature promotes, as Neuronpedia's explainer shows them."""
    examples = "\n".join(f"Example {n}: {_plain(t)}" for n, t in enumerate(contexts(card, LABEL_RANKS)[:shown], 1))
    promoted = ", ".join(repr(t.strip()) for t in card["promoted_tokens"][:8] if t.strip())
    user = f"{examples}\n\nTokens the feature makes more likely: {promoted}\n\n{ANSWER_FORMAT}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(reply: str, labeller: str) -> Label:
    """The label and explanation of a reply; a reply that ignores the format keeps its first line
    as the label and the rest as the explanation."""
    label = re.search(r"label\s*:\s*(.+)", reply, re.IGNORECASE)
    explanation = re.search(r"explanation\s*:\s*(.+)", reply, re.IGNORECASE)
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    first = label.group(1) if label else (lines[0] if lines else "?")
    rest = explanation.group(1) if explanation else " ".join(lines[1:])
    return Label(first.strip().strip('"*')[:80], rest.strip().strip('"*')[:300], labeller)
