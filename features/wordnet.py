"""WordNet 3.0 synsets read from its data files (Debian's wordnet-base, the files the default
SAE's corpus already fetches): the words, gloss and hypernyms of each."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PARTS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
_SATELLITE = {"s": "a"}  # a satellite adjective's pointer names its file's part, adj
HYPERNYM = ("@", "@i")  # pointer symbols of a hypernym and an instance's class


@dataclass(frozen=True)
class Synset:
    key: str  # "n:02084071": part of speech and byte offset, unique across the data files
    words: tuple[str, ...]
    gloss: str
    hypernyms: tuple[str, ...]  # keys


def _parse(line: str, pos: str) -> Synset:
    """One line of a data file: `offset lex_filenum ss_type w_cnt (word lex_id)* p_cnt
    (symbol offset pos source/target)* [frames] | gloss`, w_cnt in hex."""
    fields, gloss = line.split(" | ", 1)
    tokens = fields.split()
    count = int(tokens[3], 16)
    words = tuple(tokens[4 + 2 * i].replace("_", " ") for i in range(count))
    at = 4 + 2 * count
    pointers = int(tokens[at])
    hypernyms = tuple(
        f"{_SATELLITE.get(tokens[p + 2], tokens[p + 2])}:{tokens[p + 1]}"
        for p in range(at + 1, at + 1 + 4 * pointers, 4)
        if tokens[p] in HYPERNYM
    )
    return Synset(f"{pos}:{tokens[0]}", words, gloss.strip(), hypernyms)


def synsets(root: Path) -> Iterator[Synset]:
    """Every synset under `root` (the directory holding data.noun, data.verb, ...), in file order."""
    for part, pos in PARTS.items():
        for line in (root / f"data.{part}").read_text(errors="replace").splitlines():
            if not line.startswith(" ") and " | " in line:  # the licence header is indented
                yield _parse(line, pos)


def ancestry(synset: Synset, by_key: dict[str, Synset], depth: int = 4) -> list[str]:
    """The first word of each hypernym up the first path, nearest first, `depth` at most."""
    out: list[str] = []
    while synset.hypernyms and synset.hypernyms[0] in by_key and len(out) < depth:
        synset = by_key[synset.hypernyms[0]]
        out.append(synset.words[0])
    return out


# Morphy's detachment rules: the base forms an inflected word may have, per part of speech.
_RULES = {
    "n": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("ies", "y")],
    "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")],
    "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")],
    "r": [],
}


class Lexicon:
    """Word -> its synsets, most frequent sense first, through WordNet's index files and its
    morphology (irregular forms from the .exc files, then Morphy's suffix rules)."""

    def __init__(self, root: Path):
        self.index: dict[str, dict[str, list[str]]] = {}
        self.exceptions: dict[str, dict[str, list[str]]] = {}
        for part, pos in PARTS.items():
            entries = self.index[pos] = {}
            for line in (root / f"index.{part}").read_text(errors="replace").splitlines():
                if line.startswith(" "):
                    continue
                tokens = line.split()
                senses = int(tokens[2])
                entries[tokens[0]] = [f"{pos}:{offset}" for offset in tokens[-senses:]]
            irregular = self.exceptions[pos] = {}
            for line in (root / f"{part}.exc").read_text(errors="replace").splitlines():
                inflected, *bases = line.split()
                irregular[inflected] = bases

    def senses(self, word: str, per_part: int = 3) -> list[str]:
        """The word's synset keys: per part of speech, the first `per_part` senses of each form it
        may be ("bridges": the name Bridges, and the plural of bridge)."""
        word = word.lower().replace(" ", "_")
        out: list[str] = []
        for pos, entries in self.index.items():
            forms = [word, *self.exceptions[pos].get(word, [])]
            forms += [word[: -len(old)] + new for old, new in _RULES[pos] if word.endswith(old) and len(word) > len(old) + 1]
            for form in dict.fromkeys(forms):
                out += [key for key in entries.get(form, [])[:per_part] if key not in out]
        return out


def common_hypernym(a: Synset, b: Synset, by_key: dict[str, Synset], min_depth: int = 5) -> Synset | None:
    """The nearest synset that both are kinds of (first hypernym paths), unless it sits fewer than
    `min_depth` steps below the root ("entity", "object", ... say nothing)."""
    def path(s: Synset) -> list[Synset]:
        chain = [s]
        while chain[-1].hypernyms and chain[-1].hypernyms[0] in by_key:
            chain.append(by_key[chain[-1].hypernyms[0]])
        return chain

    above_b = {s.key for s in path(b)}
    for depth_from_a, s in enumerate(chain := path(a)):
        if s.key in above_b:
            return s if len(chain) - depth_from_a > min_depth else None
    return None
