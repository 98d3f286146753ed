"""A catalogue of an SAE's features: what each fires on, what it promotes, and a short label.

Built once beside the SAE (`catalogue.json.gz`; the per-feature numbers also go into
`feature_statistics.safetensors`, which is what `unit: max_act` reads), then searched by the
server's discovery routes and by `steerserve features`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from features.activations import CONTEXT
from features.embedding import DIM, embedder
from features.sae import SAE

CATALOGUE_FILE = "catalogue.json.gz"
EMBEDDINGS_FILE = "search_embeddings.safetensors"  # written by features/labelling.py
TOP_CONTEXTS = 20
TOP_TOKENS = 10
QUANTILES = (0.5, 0.9, 0.99)
_BINS = torch.logspace(-3, 4, 281)  # activation histogram edges, for the quantiles
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class Statistics:
    """Per-feature statistics over a stream of activations."""

    tokens: int  # rows counted, attention sinks left out
    fires: torch.Tensor  # [d_sae] count of tokens where the feature is active
    total: torch.Tensor  # [d_sae] sum of its activations
    max_act: torch.Tensor  # [d_sae]
    histogram: torch.Tensor  # [d_sae, bins] counts of active values per log-spaced bin
    top_values: torch.Tensor  # [TOP_CONTEXTS, d_sae] largest activations, descending
    top_rows: torch.Tensor  # [TOP_CONTEXTS, d_sae] their rows in the activation stream
    sinks: int = 0  # rows left out as attention sinks

    @property
    def density(self) -> torch.Tensor:
        return self.fires / self.tokens

    def quantiles(self) -> torch.Tensor:
        """[len(QUANTILES), d_sae] quantiles of the active values, read off the histogram as the
        geometric middle of the bin where each quantile falls (within 3% of the exact value)."""
        cumulative = self.histogram.cumsum(1).float()
        total = cumulative[:, -1:].clamp_min(1)
        middles = torch.cat([_BINS[:1], (_BINS[1:] * _BINS[:-1]).sqrt(), _BINS[-1:]])  # bin j holds (edge j-1, edge j]
        out = []
        for q in QUANTILES:
            bin_index = (cumulative / total < q).sum(1).clamp(max=len(middles) - 1)
            out.append(torch.where(self.fires > 0, middles[bin_index], torch.zeros(())))
        return torch.stack(out)


def gather_statistics(
    sae: SAE, batches: Callable[[], Iterator[torch.Tensor]], rows: int, batch: int, sink_norm: float = float("inf")
) -> Statistics:
    """One pass over `rows` residuals, fed as [n, d_in] float batches in stream order.

    Rows whose norm exceeds `sink_norm` are left out: attention-sink tokens carry residuals tens
    of times the usual norm, so every feature whose encoder leans their way "fires" on them far
    above anything it does on text, which would make them every feature's max activation and top
    context (SAELens leaves BOS out for the same reason)."""
    d = sae.cfg.d_sae
    fires = torch.zeros(d, dtype=torch.long)
    total = torch.zeros(d, dtype=torch.float64)
    histogram = torch.zeros(d * (len(_BINS) + 1), dtype=torch.long)
    top_values = torch.full((TOP_CONTEXTS, d), -1.0)
    top_rows = torch.zeros(TOP_CONTEXTS, d, dtype=torch.long)
    seen = sinks = 0
    bar = tqdm(total=rows, desc="feature statistics", unit="tok", unit_scale=True)
    for x in batches():
        sink = x.norm(dim=1) > sink_norm
        sinks += int(sink.sum())
        acts = sae.encode(x).masked_fill_(sink[:, None], 0.0)
        active = acts > 0
        fires += active.sum(0)
        total += acts.sum(0, dtype=torch.float64)
        token, feature = active.nonzero(as_tuple=True)
        values = acts[token, feature]
        histogram += torch.bincount(feature * (len(_BINS) + 1) + torch.bucketize(values, _BINS), minlength=len(histogram))
        k = min(TOP_CONTEXTS, len(x))
        best = torch.topk(acts, k, dim=0)
        merged_values = torch.cat([top_values, best.values])
        merged_rows = torch.cat([top_rows, best.indices + seen])
        keep = torch.topk(merged_values, TOP_CONTEXTS, dim=0).indices
        top_values, top_rows = merged_values.gather(0, keep), merged_rows.gather(0, keep)
        seen += len(x)
        bar.update(len(x))
    bar.close()
    return Statistics(
        tokens=seen - sinks, fires=fires, total=total.float(), max_act=top_values[0].clamp_min(0),
        histogram=histogram.view(d, -1), top_values=top_values, top_rows=top_rows, sinks=sinks,
    )  # fmt: skip


def logit_lens(sae: SAE, unembed: torch.Tensor, final_norm: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [d_sae, TOP_TOKENS] each decoder row promotes most and suppresses most, read
    through the final norm's weight and the unembedding."""
    promoted, suppressed = [], []
    weight = (unembed * final_norm).T
    for start in tqdm(range(0, sae.cfg.d_sae, chunk), desc="logit lens", unit="chunk"):
        logits = sae.W_dec[start : start + chunk] @ weight
        promoted.append(torch.topk(logits, TOP_TOKENS, dim=1).indices)
        suppressed.append(torch.topk(-logits, TOP_TOKENS, dim=1).indices)
    return torch.cat(promoted), torch.cat(suppressed)


def context_text(tokenizer, stream: np.ndarray, position: int, before: int = 24, after: int = 6) -> str:
    """The text around stream[position], with the activating token marked «thus», within its window."""
    window = position - position % CONTEXT
    start, end = max(window, position - before), min(window + CONTEXT, position + 1 + after)
    left = tokenizer.decode(stream[start:position].tolist())
    token = tokenizer.decode([int(stream[position])])
    right = tokenizer.decode(stream[position + 1 : end].tolist())
    return f"{left}«{token}»{right}".replace("\n", "⏎")


def _words(text: str) -> str:
    """Lower-case words, space-separated and space-padded, for whole-word and prefix matching."""
    return " " + " ".join(_WORD.findall(text.lower())) + " "


def _marked(text: str, before: int = 40, after: int = 20) -> tuple[str, str]:
    """A context's «marked» token, and the characters around it (the whole text if unmarked)."""
    mark = re.search(r"«(.*?)»", text)
    if mark is None:
        return "", text
    return mark.group(1), text[max(0, mark.start() - before) : mark.end() + after]


def label(activating: list[str], promoted: list[str]) -> str:
    """A short automatic label: the tokens it fires on most, and what it promotes."""
    common = [t for t, _ in Counter(t.strip() for t in activating if t.strip()).most_common(3)]
    shown = [t for t in promoted if t.strip()][:3]
    return f"{' / '.join(common) or '?'} → {' '.join(s.strip() for s in shown)}"


def build_cards(
    stats: Statistics,
    tokenizer,
    stream: np.ndarray,
    token_of_row: Callable[[int], int],
    promoted: torch.Tensor,
    suppressed: torch.Tensor,
) -> list[dict]:
    quantiles = stats.quantiles()
    density = stats.density
    cards = []
    for i in tqdm(range(len(density)), desc="feature cards", unit="feature"):
        contexts, activating = [], []
        for value, row in zip(stats.top_values[:, i].tolist(), stats.top_rows[:, i].tolist()):
            if value <= 0:
                break
            position = token_of_row(row)
            contexts.append({"text": context_text(tokenizer, stream, position), "activation": round(value, 3)})
            activating.append(tokenizer.decode([int(stream[position])]))
        up = [tokenizer.decode([t]) for t in promoted[i].tolist()]
        down = [tokenizer.decode([t]) for t in suppressed[i].tolist()]
        fires = int(stats.fires[i])
        cards.append({
            "index": i,
            "label": label(activating, up) if fires else "dead",
            "density": float(density[i]),
            "max_act": round(float(stats.max_act[i]), 4),
            "mean_act": round(float(stats.total[i]) / fires, 4) if fires else 0.0,
            "quantiles": {f"p{round(q * 100)}": round(float(v), 4) for q, v in zip(QUANTILES, quantiles[:, i])},
            "top_contexts": contexts,
            "promoted_tokens": up,
            "suppressed_tokens": down,
        })  # fmt: skip
    return cards


def save_catalogue(path: Path, cards: list[dict], embeddings: dict[str, torch.Tensor] | None = None) -> None:
    """Write the cards (and the search embeddings made from them, stamped with the catalogue's
    checksum so that a catalogue written later without them is never searched with stale ones).
    Each file is replaced whole, so a server reading meanwhile sees the old one or the new one."""
    data = gzip.compress(json.dumps(cards, ensure_ascii=False, separators=(",", ":")).encode(), compresslevel=9, mtime=0)
    if embeddings is not None:  # first: a reader pairs a new catalogue only with embeddings that name it
        tmp = path.with_name(EMBEDDINGS_FILE + ".tmp")
        save_file(embeddings, tmp, metadata={"catalogue_sha256": hashlib.sha256(data).hexdigest()})
        os.replace(tmp, path.with_name(EMBEDDINGS_FILE))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)  # mtime 0 above: a rebuild is byte-identical
    os.replace(tmp, path)


# The similarity from which a feature counts as close to a query (`Catalogue.search`), set on pilot
# queries outside the search benchmark: below it sat matches like "tractor" -> a feature firing on "<".
CLOSE = 0.45


class Catalogue:
    """The loaded cards of one SAE, searchable by meaning once labelled (`features.labelling`
    writes the embeddings), and by words otherwise."""

    SUMMARY = ("index", "label", "explanation", "label_score", "density", "max_act")

    def __init__(self, cards: list[dict], embeddings: dict[str, torch.Tensor] | None = None):
        self.cards = cards
        self._text = [self._searchable(c) for c in cards]
        self.density = torch.tensor([c["density"] for c in cards])
        self.max_act = torch.tensor([c["max_act"] for c in cards])
        self.embeddings = {k: v.float() for k, v in embeddings.items()} if embeddings else None
        self.stamp: tuple = ()  # its files' modification times, when loaded from disk

    @classmethod
    def load(cls, sae_dir: Path) -> Catalogue | None:
        path = Path(sae_dir) / CATALOGUE_FILE
        stamp = cls.stamp_of(sae_dir)  # before reading: a rewrite meanwhile is seen next time
        if not path.exists():
            return None
        data = path.read_bytes()
        cards = json.loads(gzip.decompress(data))
        catalogue = cls(cards, cls._embeddings(Path(sae_dir) / EMBEDDINGS_FILE, hashlib.sha256(data).hexdigest(), len(cards)))
        catalogue.stamp = stamp
        return catalogue

    @staticmethod
    def _embeddings(path: Path, catalogue_sha256: str, features: int) -> dict[str, torch.Tensor] | None:
        """The search embeddings made from this very catalogue, or None (searched by words)."""
        if not path.exists():
            return None
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("catalogue_sha256") != catalogue_sha256:
                return None  # made from another catalogue: `steerserve features label` again
            embeddings = {k: f.get_tensor(k) for k in f.keys()}
        if any(v.shape != (features, DIM) for v in embeddings.values()):
            return None
        return embeddings

    @staticmethod
    def stamp_of(sae_dir: Path) -> tuple:
        """The modification times of a catalogue's files (None where absent), to tell a rewrite."""
        paths = (Path(sae_dir) / CATALOGUE_FILE, Path(sae_dir) / EMBEDDINGS_FILE)
        return tuple(p.stat().st_mtime_ns if p.exists() else None for p in paths)

    @staticmethod
    def _searchable(card: dict) -> tuple[str, list[tuple[str, str]], str]:
        """The promoted tokens, each top context's marked token and the text near it, and the
        label, as " word word " strings (near the mark only: a chat's context window often holds
        the prompt's topic, which says nothing about a feature that fires on the reply's greeting)."""
        promoted = _words(" ".join(card["promoted_tokens"]))
        contexts = []
        for c in card["top_contexts"]:
            marked, near = _marked(c["text"].lower())
            contexts.append((_words(marked), _words(near)))
        return promoted, contexts, _words(card["label"].split(" → ")[0])  # a token label's promoted tokens follow "→"

    def card(self, index: int) -> dict:
        return self.cards[index]

    def summary(self, index: int) -> dict:
        return {k: self.cards[index][k] for k in self.SUMMARY if k in self.cards[index]}

    def search(self, query: str, limit: int = 20, min_similarity: float = CLOSE) -> list[dict]:
        """Features about the query. Once labelled, by meaning: the sentence-embedding similarity
        of the query to the feature's label and explanation, or to the mean of its contexts,
        whichever is higher; features labelled with the query's words, or firing on them in a
        quarter of their top contexts, come first. Only features at `min_similarity` or above are
        listed, each with its similarity. Unlabelled, by words (`search_words`)."""
        if self.embeddings is None:
            return self.search_words(query, limit)
        similarity = self.similarity(query)
        exact = set(self._exact(query))
        order = sorted(range(len(self.cards)), key=lambda i: (i in exact, float(similarity[i])), reverse=True)
        found = []
        for i in order[:limit]:
            if i not in exact and similarity[i] < min_similarity:
                break
            found.append({**self.summary(i), "similarity": round(float(similarity[i]), 4), "exact": i in exact})
        return found

    def nothing_close(self, query: str, min_similarity: float) -> str:
        """What to say when `search` lists nothing (no exact match, none close): which came closest."""
        similarity = self.similarity(query)
        best = int(similarity.argmax())
        return (f"no feature is close to {query!r}: the closest, #{best} ({self.cards[best]['label']!r}), "
                f"has similarity {round(float(similarity[best]), 4)}, below min_similarity {min_similarity}")  # fmt: skip

    def similarity(self, query: str) -> torch.Tensor:
        """[d_sae] similarity of the query to each feature (see `search`)."""
        q = embedder().embed([query])[0]
        return torch.maximum(self.embeddings["labels"] @ q, self.embeddings["contexts"] @ q)

    def _exact(self, query: str) -> list[int]:
        words = _WORD.findall(query.lower())
        if not words:
            return []
        patterns = [re.compile(rf" {w}(?:s|es)? ") for w in words]
        found = []
        for index, (_, contexts, label) in enumerate(self._text):
            if all(p.search(label) for p in patterns):
                found.append(index)
            elif len(words) == 1 and contexts and 4 * sum(bool(patterns[0].search(m)) for m, _ in contexts) >= len(contexts):
                found.append(index)
        return found

    def search_words(self, query: str, limit: int = 20) -> list[dict]:
        """Features that fire on the query's words, or near them, or promote them.

        Per query word: 2 for each top context whose activating token is the word, 1 for each whose
        text near that token holds it, 2 if the feature promotes it. A word matches itself, its
        plural, and (from 4 letters) any word it starts: "music" matches "musical". Every query
        word must match somewhere; the whole phrase near a context's mark scores 2 more."""
        words = _WORD.findall(query.lower())
        if not words:
            return []
        patterns = [re.compile(rf" {w}(?:s|es)? " if len(w) < 4 else rf" {w}") for w in words]
        phrase = " ".join(words)
        scored = []
        for index, (promoted, contexts, _) in enumerate(self._text):
            score = 0
            for pattern in patterns:
                hit = 2 * bool(pattern.search(promoted))
                hit += sum(2 if pattern.search(marked) else 1 for marked, near in contexts if pattern.search(near))
                if not hit:
                    break
                score += hit
            else:
                if len(words) > 1:
                    score += 2 * sum(phrase in near for _, near in contexts)
                scored.append((score, -self.cards[index]["density"], index))
        scored.sort(reverse=True)
        return [{**self.summary(i), "score": s} for s, _, i in scored[:limit]]

    @torch.no_grad()
    def active_features(self, sae: SAE, reader, tokens: list[int], top_k: int) -> list[dict]:
        """The features most active on a text relative to how often they usually fire.

        A feature scores its mean activation over the text's tokens, in multiples of its max
        activation, divided by the square root of its usual density: a rare feature that fires
        here outranks a common one that fires as much. The text is read after one EOS token, so
        that no text token sits at position 0 (the attention sink, which the SAE never saw)."""
        ids = torch.tensor([[reader.tokenizer.eos_token_id, *tokens]])
        acts = sae.encode(reader(ids)[0, 1:].float())
        score = (acts / self.max_act.clamp_min(1e-6)).mean(0) / self.density.clamp_min(1e-6).sqrt()
        top = torch.topk(score, min(top_k, len(score)))
        found = []
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            if value <= 0:
                break
            column = acts[:, index]
            fired = torch.topk(column, min(8, int((column > 0).sum())))
            where = [
                {"position": p, "token": reader.tokenizer.decode([tokens[p]]), "activation": round(a, 4)}
                for a, p in zip(fired.values.tolist(), fired.indices.tolist())
            ]
            found.append({**self.summary(index), "score": round(value, 4), "tokens": where})
        return found
