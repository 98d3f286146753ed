"""`steerserve features label`: label an SAE's features, score every candidate label, keep the
best per feature in its catalogue, and write the embeddings that search by meaning reads.

Resumable: the language model's replies are appended to a file in the work directory as they
come, and the context embeddings are cached there, so a run that stops starts where it left off.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from core.local import file_sha256
from features import labels, wordnet
from features.catalogue import CATALOGUE_FILE, save_catalogue
from features.embedding import Embedder, embedder
from features.train import write_json


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible chat endpoint the llm labeller asks."""

    url: str
    api_key: str = "unused"
    model: str | None = None  # None: the first model it lists


REPORT_SAMPLE = 200  # random live features the quality report scores
MIN_CONTEXTS = 8  # fewer top contexts than this and a feature is left with its token label, unscored


def context_vectors(cards: list[dict], embed: Embedder, cache: Path) -> list[torch.Tensor]:
    """Each feature's [contexts, dim] snippet embeddings, cached by the catalogue's content."""
    if cache.exists():
        saved = load_file(cache)
        flat, counts = saved["flat"], saved["counts"]
    else:
        texts = [labels.snippet(c["text"]) for card in cards for c in card["top_contexts"]]
        flat = embed.embed(texts, max_length=32, desc="embedding contexts").half()
        counts = torch.tensor([len(card["top_contexts"]) for card in cards])
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"flat": flat, "counts": counts}, cache)
    return list(torch.split(flat.float(), counts.tolist()))


def wordnet_labels(cards: list[dict], features: list[int], vectors: list[torch.Tensor], embed: Embedder, root: Path) -> dict[int, labels.Label]:
    """For each feature with candidate synsets, the one closest by embedding to the mean of its
    labelling contexts."""
    by_key = {s.key: s for s in wordnet.synsets(root)}
    lexicon = wordnet.Lexicon(root)
    candidates = {i: labels.synset_candidates(cards[i], lexicon, by_key) for i in tqdm(features, desc="WordNet candidates", unit="feature")}
    keys = sorted({k for ks in candidates.values() for k in ks})
    synset_vectors = dict(zip(keys, embed.embed([labels.synset_text(by_key[k]) for k in keys], max_length=48, desc="embedding synsets")))
    out = {}
    for i, ks in candidates.items():
        if ks:
            centroid = vectors[i][labels.LABEL_RANKS].mean(0)
            best = max(ks, key=lambda k: float(synset_vectors[k] @ centroid))
            out[i] = labels.synset_label(by_key[best], by_key)
    return out


def llm_labels(
    cards: list[dict], features: list[int], endpoint: Endpoint, done_file: Path, concurrency: int
) -> dict[int, labels.Label]:
    """Ask the chat endpoint for each feature's label; replies already in `done_file` are reused."""
    from openai import AsyncOpenAI

    done: dict[int, dict] = {}
    if done_file.exists():
        for line in done_file.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run that was stopped mid-write
            done[entry["index"]] = entry
    client = AsyncOpenAI(base_url=endpoint.url, api_key=endpoint.api_key, max_retries=2, timeout=600)

    async def run() -> str:
        name = endpoint.model or (await client.models.list()).data[0].id
        todo = [i for i in features if i not in done or done[i]["model"] != name]
        gate = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(features), initial=len(features) - len(todo), desc=f"labelling with {name}", unit="feature")
        with done_file.open("a") as out:

            async def one(index: int) -> None:
                async with gate:
                    reply = await client.chat.completions.create(
                        model=name, messages=labels.explain_messages(cards[index]), max_tokens=80, temperature=0
                    )
                done[index] = {"index": index, "model": name, "reply": reply.choices[0].message.content or ""}
                out.write(json.dumps(done[index]) + "\n")
                out.flush()
                bar.update()

            await asyncio.gather(*(one(i) for i in todo))
        bar.close()
        await client.close()
        return name

    name = asyncio.run(run())
    return {i: labels.parse_explanation(done[i]["reply"], f"llm:{name}") for i in features}


@dataclass(frozen=True)
class Negatives:
    """Contexts of other features, as [n, dim] embeddings, and whose each is."""

    vectors: torch.Tensor
    features: torch.Tensor

    @classmethod
    def draw(cls, cards: list[dict], live: list[int], vectors: list[torch.Tensor], ranks: slice, seed: int) -> Negatives:
        pool = labels.negative_pool(cards, live, ranks, seed)
        return cls(torch.stack([vectors[f][rank] for f, rank in pool]), torch.tensor([f for f, _ in pool]))

    def besides(self, index: int) -> torch.Tensor:
        return self.vectors[self.features != index]


def choose_and_score(
    candidates: dict[int, list[labels.Label]], vectors: list[torch.Tensor], text_vectors: dict[str, torch.Tensor],
    choosing: Negatives, scoring: Negatives,
) -> dict[int, dict]:  # fmt: skip
    """Per feature: the candidate whose detection AUC is best on the choosing ranks, and every
    candidate's AUC on the scoring ranks, each against negatives drawn from those ranks."""
    out = {}
    for index, options in candidates.items():
        choose, score = vectors[index][labels.CHOOSE_RANKS], vectors[index][labels.SCORE_RANKS]
        held = {c.labeller: round(labels.detection(text_vectors[c.text], score, scoring.besides(index)), 4) for c in options}
        best = max(options, key=lambda c: labels.detection(text_vectors[c.text], choose, choosing.besides(index)))
        out[index] = {
            "label": best.label, "explanation": best.explanation, "labeller": best.labeller,
            "label_score": held[best.labeller], "labeller_scores": held,
        }  # fmt: skip
    return out


def score_and_choose(
    cards: list[dict], candidates: dict[int, list[labels.Label]], vectors: list[torch.Tensor], embed: Embedder
) -> dict[int, dict]:
    """`choose_and_score` with the candidates embedded and each split's negatives drawn."""
    live = [i for i, card in enumerate(cards) if len(card["top_contexts"]) >= MIN_CONTEXTS]
    choosing = Negatives.draw(cards, live, vectors, labels.CHOOSE_RANKS, seed=0)
    scoring = Negatives.draw(cards, live, vectors, labels.SCORE_RANKS, seed=1)
    texts = sorted({c.text for cs in candidates.values() for c in cs})
    text_vectors = dict(zip(texts, embed.embed(texts, desc="embedding labels")))
    return choose_and_score(candidates, vectors, text_vectors, choosing, scoring)


def search_embeddings(cards: list[dict], vectors: list[torch.Tensor], embed: Embedder) -> dict[str, torch.Tensor]:
    """What search by meaning compares a query with: each feature's label and explanation, and
    the mean of its contexts' embeddings (zero for a feature that never fired)."""
    texts = [labels.Label(c["label"], c.get("explanation", ""), "").text for c in cards]
    centroid = torch.stack([torch.nn.functional.normalize(v.mean(0), dim=0) if len(v) else torch.zeros(v.shape[1]) for v in vectors])
    return {"labels": embed.embed(texts, desc="embedding labels for search").half(), "contexts": centroid.half()}


def report(cards: list[dict], seconds: float) -> dict:
    """Mean held-out detection AUC over a fixed random sample of scored features: the chosen
    labels, and each labeller's own labels scored the same way."""
    scored = [i for i, c in enumerate(cards) if "labeller_scores" in c]
    if not scored:
        return {"features": 0, "scored_features": 0, "seconds": round(seconds, 1)}
    sample = sorted(np.random.default_rng(0).choice(scored, size=min(REPORT_SAMPLE, len(scored)), replace=False).tolist())
    labellers = sorted({k for i in sample for k in cards[i]["labeller_scores"]})
    by = {name: [cards[i]["labeller_scores"][name] for i in sample if name in cards[i]["labeller_scores"]] for name in labellers}
    wins = {name: sum(cards[i]["labeller"] == name for i in sample) for name in labellers}
    return {
        "features": len(sample), "chosen_auc": round(float(np.mean([cards[i]["label_score"] for i in sample])), 4),
        "labeller_auc": {k: round(float(np.mean(v)), 4) for k, v in by.items()},
        "labeller_features": {k: len(v) for k, v in by.items()}, "chosen_by": wins,
        "scored_features": len(scored), "seconds": round(seconds, 1),
    }  # fmt: skip


def label_catalogue(
    sae_dir: Path, labellers: list[str], work: Path, endpoint: Endpoint | None = None,
    features: list[int] | None = None, wordnet_root: Path | None = None, concurrency: int = 16,
) -> dict:  # fmt: skip
    """Label `features` (default: every feature with enough contexts) of the catalogue in
    `sae_dir`, rewrite it with the chosen labels and scores, write the search embeddings, and
    return the report, which counts the features asked for that had too few contexts (`skipped`)."""
    started = time.monotonic()
    path = sae_dir / CATALOGUE_FILE
    with gzip.open(path, "rt", encoding="utf-8") as f:
        cards = json.load(f)
    key = hashlib.sha256(json.dumps([c["top_contexts"] for c in cards]).encode()).hexdigest()[:16]
    work.mkdir(parents=True, exist_ok=True)
    embed = embedder()
    vectors = context_vectors(cards, embed, work / f"contexts-{key}.safetensors")
    eligible = [i for i, c in enumerate(cards) if len(c["top_contexts"]) >= MIN_CONTEXTS]
    if not eligible:
        raise ValueError(f"no feature has {MIN_CONTEXTS} top contexts or more to label from and score on")
    asked = list(dict.fromkeys(features)) if features is not None else eligible
    allowed = set(eligible)
    targets = [i for i in asked if i in allowed]
    candidates = {i: [labels.token_label(cards[i])] for i in targets}
    if "wordnet" in labellers:
        if wordnet_root is None:
            raise ValueError("the wordnet labeller needs WordNet's data files")
        for i, found in wordnet_labels(cards, targets, vectors, embed, wordnet_root).items():
            candidates[i].append(found)
    if "llm" in labellers:
        if endpoint is None:
            raise ValueError("the llm labeller needs an endpoint")
        found = llm_labels(cards, targets, endpoint, work / f"llm-{key}.jsonl", concurrency)
        for i in targets:
            candidates[i].append(found[i])
    for index, chosen in score_and_choose(cards, candidates, vectors, embed).items():
        cards[index].update(chosen)
    save_catalogue(path, cards, search_embeddings(cards, vectors, embed))
    return {**report(cards, time.monotonic() - started), "skipped": len(asked) - len(targets)}


def write_report(sae_dir: Path, summary: dict) -> None:
    """`labels.json`, and where the SAE has a quality report (the default's), its labels section;
    a build manifest's artifact checksums follow the rewritten files."""
    write_json(sae_dir / "labels.json", summary)
    quality = sae_dir / "quality.md"
    if quality.exists() and summary["features"]:
        text = quality.read_text().split("\n## Labels")[0].rstrip("\n")
        rows = "\n".join(
            f"| {name} | {auc:.3f} | {summary['labeller_features'][name]} | {summary['chosen_by'].get(name, 0)} |"
            for name, auc in summary["labeller_auc"].items()
        )
        quality.write_text(
            f"{text}\n\n## Labels\n\nDetection AUC of each feature's label on held-out top contexts against contexts of other "
            f"features (sentence embeddings, all-MiniLM-L6-v2), over {summary['features']} random labelled features; "
            f"each feature keeps the labeller that scored best on other contexts.\n\n"
            f"| labeller | mean AUC | features it labelled | chosen for |\n|---|---|---|---|\n{rows}\n"
            f"| **chosen** | **{summary['chosen_auc']:.3f}** | {summary['features']} | |\n\n"
            f"{summary['scored_features']} features labelled in {summary['seconds'] / 60:.1f} min.\n"
        )
    manifest = sae_dir / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if "artifacts" in data:
            data["artifacts"] = {p.name: file_sha256(p) for p in sorted(sae_dir.iterdir()) if p.name != "manifest.json"}
            data.setdefault("seconds", {})["labels"] = summary["seconds"]
            write_json(manifest, data)


def _indices(text: str) -> list[int]:
    """"0-9,12" -> [0, ..., 9, 12]."""
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out += range(int(low), int(high or low) + 1)
    return out


def label_command(args: argparse.Namespace) -> int:
    from core.local import home
    from features.corpus import PUBLIC, WORDNET_DIR, fetch_debian
    from features.formats import description_dir, parse_source

    sae_dir = description_dir(parse_source(args.sae)[1])
    if not (sae_dir / CATALOGUE_FILE).exists():
        print(f"steerserve: {args.sae} has no feature catalogue; `steerserve features build` writes one")
        return 2
    labellers = args.labeller or ["llm"]
    root = None
    if "wordnet" in labellers:
        source = next(s for s in PUBLIC if s.name == "wordnet-base")
        root = fetch_debian(source, home() / "downloads") / WORDNET_DIR
    from openai import APIConnectionError, APIStatusError

    try:
        summary = label_catalogue(
            sae_dir, labellers, Path(args.work) if args.work else home() / "labels",
            Endpoint(args.labeler_url, args.labeler_api_key, args.labeler_model),
            _indices(args.features) if args.features else None, root, args.concurrency,
        )  # fmt: skip
    except APIConnectionError:
        print(f"steerserve: no chat endpoint answers at {args.labeler_url}: start one (`steerserve serve`) or pass --labeler-url")
        return 2
    except APIStatusError as error:
        print(f"steerserve: the labeller's endpoint refused: {error}")
        return 2
    except ValueError as error:
        print(f"steerserve: {error}")
        return 2
    write_report(sae_dir, summary)
    print(json.dumps(summary, indent=2))
    return 0
