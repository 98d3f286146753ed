"""Does steering make the model talk about a concept, and what does it cost? The effect benchmark,
in the style of AxBench: `python -m benchmarks.steering_demo [--url URL]` (`make demo`).

Per concept (the Golden Gate Bridge, dogs, the ocean, music), every choice is made on the pilot
prompts and every reported figure comes from the evaluation prompts, which nothing was chosen on:
- candidate features come from the server's search; each is calibrated through
  `POST /v1/saes/default/features/{i}/calibrate` on the pilot prompts, and they are ranked by the
  effect each showed at its recommended setting (features chosen by their effect, not their activations);
- methods, each then answering the evaluation prompts:
  - *feature, calibrated*: the best feature at `{"strength": 1, "unit": "calibrated"}`, the calibration's own choice of strength and `prompt_scale`;
  - *feature, prompt_scale 1*: the same feature at the strongest setting the calibration found within budget with the prompt steered like the answer;
  - *team*: the best TEAM calibrated features together, each at its calibrated strength, their common scale chosen on the pilot;
  - *vector, calibrated*: `POST /v1/vectors/contrast` from chats about the concept against neutral ones, kept on the
    server and calibrated through `POST /v1/vectors/{name}/calibrate` on the pilot prompts, at `{"strength": 1, "unit": "calibrated"}`;
  - *prompting*: no steering; a system prompt asks the model to bring the concept up.
Measures: keyword mentions, an embedding judge (similarity to a description of the concept),
perplexity under the unsteered model (as a multiple of the unsteered answers'), relevance (answer
to prompt similarity, as a share of the unsteered answers'), and per answer the harmonic mean of
concept, fluency and relevance, as AxBench reports. Writes steering_demo.json, .md and .png under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import torch
from openai import AsyncOpenAI

from core.local import MODEL_NAME, ensure_default_model, start_steerserve, stop_server
from features.calibration import EMBEDDING_THRESHOLD, Measured, recommend
from features.embedding import embedder

PROMPTS = [
    "Give me a recipe for dinner.", "What should I do this weekend?", "Write a short poem about morning.",
    "How can I improve my sleep?", "Tell me a fun fact.", "What is a good way to learn math?",
    "Describe your favourite season.", "Give me tips for a job interview.", "How do I make my garden grow?",
    "Write a short story about a child.", "What is the best way to save money?", "Explain how a car engine works.",
    "What should I pack for a holiday?", "How do I write a good email?", "Suggest a name for a new cafe.",
    "What makes a good friend?", "How do I start running?", "Describe a busy market.", "What is your advice for students?",
    "Write a thank-you note to a teacher.", "How do computers store data?", "Plan a birthday party for me.",
    "What are some healthy snacks?", "How do I clean a kitchen quickly?", "Tell me about your ideal home.",
    "What should I read next?", "How can I be more productive?", "Describe a walk in the park.",
    "Give me ideas for a rainy day.", "Explain why the sky is blue.",
]  # fmt: skip
# Chosen on, and never evaluated on: the pilot that picks each concept's features and setting.
# 16 prompts, so that a mention rate on them moves in steps of 6%, not 12%.
PILOT_PROMPTS = [
    "What is a good hobby to pick up?", "How do I cook rice?", "Write a limerick about a cat.",
    "What should I name my goldfish?", "Give me advice for a first date.", "How do I fix a flat tyre?",
    "Describe your perfect breakfast.", "What is the meaning of friendship?",
    "How do I choose a good pair of shoes?", "Write a short note inviting a neighbour to tea.",
    "What are good habits to start this year?", "Explain how a bicycle's gears work.",
    "Give me a plan for clearing out a cupboard.", "What questions should I ask a new doctor?",
    "Describe a snowy afternoon in a small town.", "How do I bake bread without a mixer?",
]  # fmt: skip
MAX_TOKENS = 64
# The most perplexity a choice on the pilot may cost, x unsteered: the calibrations' fluency budget
# and the pilot choices' limit. Below the bar's 3x, because a choice made on 16 prompts drifts on
# others (the earlier demo's chosen settings moved by up to +0.8x from pilot to evaluation).
BUDGET = 2.5
FLUENCY_LIMIT = 3.0  # the bar, on the evaluation prompts: median perplexity at most this x unsteered
BAR_MENTIONS, BAR_EMBEDDING = 0.7, 0.4  # and at least these shares of answers about the concept
# Every candidate is screened on a few pilot prompts at two strong settings; the CANDIDATES with the
# most concept there are calibrated in full.
SCREEN = {"prompts": PILOT_PROMPTS[:6], "settings": [{"strength": 3.0}, {"strength": 1.25, "prompt_scale": 4.0}], "max_tokens": 32}
CANDIDATES = 3
TEAM = 3
TEAM_SCALES = (0.5, 0.75, 1.0)  # the team's common scale on its calibrated strengths, chosen on the pilot
VECTOR_LAYER = 15
SAE = "default"
T = TypeVar("T")


@dataclass(frozen=True)
class Concept:
    name: str
    queries: tuple[str, ...]  # what is typed into the feature search
    keywords: tuple[str, ...]  # regexes; an answer mentions the concept if any matches
    description: str  # a text about it: searched for the features active on it, and the embedding target
    topic: str = ""  # how the prompting baseline names it
    subjects: tuple[str, ...] = ()  # the contrastive vector's positive examples are about these


CONCEPTS = [
    Concept("the Golden Gate Bridge / San Francisco", ("golden gate", "bridge", "san francisco"),
            (r"golden gate", r"\bbridges?\b", r"san francisco"),
            "The Golden Gate Bridge is a suspension bridge in San Francisco. Tourists walk across the bridge "
            "to see the bay, the fog and the city.", "the Golden Gate Bridge",
            ("the Golden Gate Bridge", "San Francisco's red suspension bridge", "the bridge over the Golden Gate strait",
             "crossing the Golden Gate Bridge in the fog")),
    Concept("dogs", ("dog", "puppy"), (r"\bdogs?\b", r"\bpupp(y|ies)\b", r"\bcanine"),
            "My dog loves to play fetch. Dogs and puppies are loyal pets; the dog wagged its tail and barked.", "dogs",
            ("dogs", "my puppy", "a loyal dog", "dogs playing fetch in the park")),
    Concept("the ocean", ("ocean", "sea"), (r"\boceans?\b", r"\bseas?\b", r"\bwaves?\b", r"\bmarine\b"),
            "The ocean waves crashed on the shore. The sea is deep and blue, full of fish and marine life.", "the ocean",
            ("the ocean", "the deep blue sea", "ocean waves crashing on the shore", "sailing across the sea")),
    Concept("music", ("music", "song"), (r"\bmusic", r"\bsongs?\b", r"\bmelod", r"\bguitar", r"\bpiano"),
            "She played a song on the guitar and the piano. Music, melody and rhythm filled the concert hall.", "music",
            ("music", "playing the guitar", "a piano concert", "singing a song")),
]  # fmt: skip
# The contrastive vector's examples: each template about each subject (the concept's, or these).
TEMPLATES = [
    "Tell me about {}.", "Write a short poem about {}.", "What is the history of {}?", "Describe {} to a child.",
    "Why do people like {}?", "Give me three facts about {}.", "What comes to mind when you think of {}?",
    "Write a short story about {}.",
]  # fmt: skip
NEUTRAL = ["a kitchen table", "the alphabet", "filing taxes", "a spreadsheet"]


def mentions(concept: Concept, text: str) -> bool:
    return any(re.search(k, text, re.IGNORECASE) for k in concept.keywords)


def repetition(text: str) -> float:
    """Share of word 3-grams that repeat an earlier one."""
    words = text.lower().split()
    grams = list(zip(words, words[1:], words[2:]))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def system_prompt(concept: Concept) -> str:
    """The prompting baseline: what AxBench's prompt baseline asks, in one sentence."""
    return f"Whatever you are asked, answer it, and bring {concept.topic} into your answer."


class Judges:
    """Perplexity under the unsteered model (transformers, float32: independent of the engine that
    steered), and sentence embeddings (features.embedding)."""

    def __init__(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = ensure_default_model()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def perplexity(self, prompt: str, answer: str) -> float:
        messages = [{"role": "user", "content": prompt}]
        context = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        context_ids = self.tokenizer(context, add_special_tokens=False).input_ids
        answer_ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        if not answer_ids:
            return float("nan")
        ids = torch.tensor([context_ids + answer_ids])
        logits = self.lm(input_ids=ids).logits[0, len(context_ids) - 1 : -1]
        return float(torch.nn.functional.cross_entropy(logits, ids[0, len(context_ids) :]).exp())

    def embed(self, texts: list[str]) -> torch.Tensor:
        return embedder().embed(texts, max_length=256)


async def _answers(url: str, steerings: list[dict | None], prompts: list[str], system: str | None) -> list[list[str]]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)

    async def one(steering: dict | None, n: int, prompt: str) -> str:
        extra = {"steering": steering} if steering else {}
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        reply = await client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0.7, seed=n, extra_body=extra
        )
        return reply.choices[0].message.content or ""

    try:
        flat = await asyncio.gather(*(one(s, n, p) for s in steerings for n, p in enumerate(prompts)))
    finally:
        await client.close()
    return [flat[i : i + len(prompts)] for i in range(0, len(flat), len(prompts))]


def answers(url: str, steerings: list[dict | None], prompts: list[str], system: str | None = None) -> list[list[str]]:
    """Each steering's answers to every prompt (seed = the prompt's position, the same for every
    steering). All are sent at once: the engine batches a whole sweep, far faster on a CPU than one
    steering at a time."""
    return asyncio.run(_answers(url, steerings, prompts, system))


def candidates(url: str, concept: Concept) -> list[dict]:
    """The top 4 features of a search for each query, and the top 8 most active on a text about the concept."""
    found = []
    for query in concept.queries:
        found += httpx.get(f"{url}/v1/saes/{SAE}/features", params={"q": query, "limit": 4}, timeout=60).json()["data"]
    found += httpx.post(
        f"{url}/v1/saes/{SAE}/features/search", json={"text": concept.description, "top_k": 8}, timeout=300
    ).json()["data"]
    return list({f["index"]: f for f in found}.values())


def score(concept: Concept, judges: Judges, texts: list[str], prompts: list[str], target: torch.Tensor, base: dict | None = None) -> dict:
    """A setting's answers judged; with `base` (the unsteered row on the same prompts), also each
    answer's harmonic mean of concept (a keyword or the embedding judge), fluency (unsteered median
    perplexity over its own, at most 1) and relevance (its similarity to its prompt over the
    unsteered median, at most 1), averaged: AxBench's aggregate."""
    embedded = judges.embed(texts)
    similarity = (embedded @ target).tolist()
    relevance = (embedded * judges.embed(prompts)).sum(1).tolist()
    ppl = [judges.perplexity(p, t) for p, t in zip(prompts, texts)]
    row = {
        "keyword_rate": sum(mentions(concept, t) for t in texts) / len(texts),
        "embedding_rate": sum(s >= EMBEDDING_THRESHOLD for s in similarity) / len(texts),
        "median_similarity": statistics.median(similarity),
        "median_perplexity": statistics.median(p for p in ppl if p == p),
        "median_relevance": statistics.median(relevance),
        "repetition": statistics.mean(repetition(t) for t in texts),
        "example": texts[0],
    }
    if base is not None:
        def harmonic(*parts: float) -> float:
            return 0.0 if min(parts) <= 0 else len(parts) / sum(1 / p for p in parts)

        concept_hit = [float(mentions(concept, t) or s >= EMBEDDING_THRESHOLD) for t, s in zip(texts, similarity)]
        fluency = [min(1.0, base["median_perplexity"] / p) if p == p else 0.0 for p in ppl]
        relevant = [min(1.0, max(0.0, r / base["median_relevance"])) for r in relevance]
        row["harmonic"] = statistics.mean(harmonic(*parts) for parts in zip(concept_hit, fluency, relevant))
    return row


def calibrate(url: str, concept: Concept, index: int, **body) -> dict:
    """The feature calibrated on the pilot prompts through the server, and kept there (or, with
    `body`, that calibration's fields replaced)."""
    body = {"prompts": PILOT_PROMPTS, "concept": concept.description, "fluency_budget": BUDGET, "max_tokens": MAX_TOKENS, **body}
    reply = httpx.post(f"{url}/v1/saes/{SAE}/features/{index}/calibrate", json=body, timeout=1800)
    reply.raise_for_status()
    return reply.json()


def screen(url: str, concept: Concept, found: list[dict]) -> list[dict]:
    """Every candidate's largest concept score at the SCREEN settings (perplexity aside), best first."""
    rows = []
    for c in found:
        cal = calibrate(url, concept, c["index"], **SCREEN, store=False, fluency_budget=100.0)
        rows.append({"index": c["index"], "label": c["label"], "screen": max(row["concept"] for row in cal["curve"])})
    return sorted(rows, key=lambda r: -r["screen"])


def feature(index: int, strength: float = 1.0, unit: str = "calibrated") -> dict:
    return {"sae": SAE, "index": index, "strength": strength, "unit": unit, **({"mode": "clamp"} if unit != "calibrated" else {})}


def choose(pilot: list[dict], limit: float = BUDGET) -> tuple[int, bool]:
    """The pilot row (after the unsteered one, row 0) with the most mentions whose median perplexity
    is within `limit` x unsteered, the less perplexing on a tie, and True; if no row is that
    fluent, the least perplexing one and False."""
    bound = limit * pilot[0]["median_perplexity"]
    steered = range(1, len(pilot))
    fluent = [n for n in steered if pilot[n]["median_perplexity"] <= bound]
    if fluent:
        return max(fluent, key=lambda n: (pilot[n]["keyword_rate"], -pilot[n]["median_perplexity"])), True
    return min(steered, key=lambda n: pilot[n]["median_perplexity"]), False


def slug(concept: Concept) -> str:
    return re.sub(r"[^a-z0-9]+", "-", concept.name.lower()).strip("-")[:40]


def derive(url: str, concept: Concept) -> dict:
    """The concept's contrastive direction at VECTOR_LAYER, kept on the server under `slug`."""
    def chats(subjects) -> list[list[dict]]:
        return [[{"role": "user", "content": t.format(s)}] for t in TEMPLATES for s in subjects]

    body = {"positive": chats(concept.subjects), "negative": chats(NEUTRAL), "layer": VECTOR_LAYER, "name": slug(concept)}
    reply = httpx.post(f"{url}/v1/vectors/contrast", json=body, timeout=1800)
    reply.raise_for_status()
    return {k: v for k, v in reply.json().items() if k != "vector"}


def calibrate_vector(url: str, concept: Concept) -> dict:
    """The kept vector `slug(concept)` calibrated on the pilot prompts through the server, and kept there."""
    body = {"prompts": PILOT_PROMPTS, "concept": concept.description, "fluency_budget": BUDGET, "max_tokens": MAX_TOKENS}
    reply = httpx.post(f"{url}/v1/vectors/{slug(concept)}/calibrate", json=body, timeout=1800)
    reply.raise_for_status()
    return reply.json()


def pilot_choice(url: str, concept: Concept, judges: Judges, target: torch.Tensor, base: dict, steerings: list[tuple[str, dict]]) -> tuple[list[dict], int]:
    """Each named steering's pilot answers judged, and the one `choose` takes."""
    rows = [base]
    for (name, _), texts in zip(steerings, answers(url, [s for _, s in steerings], PILOT_PROMPTS)):
        rows.append({"setting": name, **score(concept, judges, texts, PILOT_PROMPTS, target)})
        print(f"    pilot {name}: mentions {rows[-1]['keyword_rate']:.0%}, ppl {rows[-1]['median_perplexity'] / base['median_perplexity']:.2f}x", flush=True)
    return rows, choose(rows)[0]


def run(url: str, judges: Judges, concepts: list[Concept]) -> list[dict]:
    results = []
    unsteered = {"pilot": answers(url, [None], PILOT_PROMPTS)[0], "evaluation": answers(url, [None], PROMPTS)[0]}
    for concept in concepts:
        started = time.monotonic()
        target = judges.embed([concept.description])[0]
        pilot_base = {"setting": "unsteered", **score(concept, judges, unsteered["pilot"], PILOT_PROMPTS, target)}
        screened = screen(url, concept, candidates(url, concept))
        listed = ", ".join(f"{r['index']} {r['screen']:.2f}" for r in screened)
        print(f"{concept.name}: screened {listed}", flush=True)
        calibrated = []
        for c in screened[:CANDIDATES]:
            cal = calibrate(url, concept, c["index"])
            top = cal["recommendation"]
            print(f"{concept.name}: feature {c['index']} ({c['label']}) calibrated in {cal['seconds']:.0f} s: "
                  + (f"effect {top['effect']:.2f} at {top['strength']:g}x, prompt x{top['prompt_scale']:g}" if top else "no fluent setting"), flush=True)  # fmt: skip
            calibrated.append({"index": c["index"], "label": c["label"], **cal})
        ranked = sorted([c for c in calibrated if c["recommendation"]], key=lambda c: -c["recommendation"]["effect"])
        if not ranked:
            print(f"{concept.name}: no candidate had a fluent setting", flush=True)
            continue
        best = ranked[0]
        methods: list[tuple[str, dict | None, str | None]] = [("prompting", None, system_prompt(concept))]
        methods.append(("feature, calibrated", {"features": [feature(best["index"])]}, None))
        plain = [Measured(**row) for row in best["curve"] if row["prompt_scale"] == 1]
        if (n := recommend(plain, BUDGET)) is not None:
            methods.append(("feature, prompt_scale 1", {"features": [feature(best["index"], plain[n].strength, "max_act")]}, None))
        team = [c["index"] for c in ranked[:TEAM]]
        pilot = {}
        if len(team) > 1:
            steerings = [(f"team x{s:g}", {"features": [feature(i) for i in team], "scale": s, "prompt_scale": best["recommendation"]["prompt_scale"]})
                         for s in TEAM_SCALES]  # fmt: skip
            rows, chosen = pilot_choice(url, concept, judges, target, pilot_base, steerings)
            pilot["team"] = {"rows": rows, "chosen": chosen}
            methods.append((f"team of {len(team)}", steerings[chosen - 1][1], None))
        derived = derive(url, concept)
        vector = {**calibrate_vector(url, concept), "derived": derived}
        top = vector["recommendation"]
        print(f"{concept.name}: vector calibrated in {vector['seconds']:.0f} s: "
              + (f"effect {top['effect']:.2f} at {top['strength'] / derived['stream_norm']:.3g} of the stream norm, prompt x{top['prompt_scale']:g}" if top else "no fluent setting"), flush=True)  # fmt: skip
        if top is not None:
            methods.append(("vector, calibrated", {"features": [{"vector": slug(concept), "strength": 1.0, "unit": "calibrated"}]}, None))

        base = {"method": "unsteered", **score(concept, judges, unsteered["evaluation"], PROMPTS, target)}
        base["harmonic"] = score(concept, judges, unsteered["evaluation"], PROMPTS, target, base)["harmonic"]
        evaluation = [base]
        for name, steering, system in methods:
            texts = answers(url, [steering], PROMPTS, system)[0]
            row = {"method": name, "steering": steering, **score(concept, judges, texts, PROMPTS, target, base)}
            row["meets_bar"] = meets_bar(row, base)
            print(f"  {name}: mentions {row['keyword_rate']:.0%}, embedding {row['embedding_rate']:.0%}, "
                  f"ppl {times(row, base):.2f}x, harmonic {row['harmonic']:.2f}{' (meets the bar)' if row['meets_bar'] else ''}", flush=True)  # fmt: skip
            evaluation.append(row)
        results.append({"concept": concept.name, "screened": screened, "calibrated": calibrated, "best": best["index"], "vector": vector,
                        "pilot": pilot, "evaluation": evaluation, "seconds": round(time.monotonic() - started)})  # fmt: skip
    return results


def meets_bar(row: dict, base: dict) -> bool:
    return row["keyword_rate"] >= BAR_MENTIONS and row["embedding_rate"] >= BAR_EMBEDDING and times(row, base) <= FLUENCY_LIMIT


def times(row: dict, base: dict) -> float:
    """A row's median perplexity as a multiple of the unsteered row's on the same prompts."""
    return row["median_perplexity"] / base["median_perplexity"]


def ratio(row: dict, base: dict) -> str:
    return f"{row['median_perplexity']:.1f} ({times(row, base):.2f}x)"


CALIBRATED = ("feature, calibrated", "vector, calibrated")  # the methods at a strength no one picked by hand


def setting_of(row: dict, stream_norm: float | None = None) -> str:
    """A calibration row's or recommendation's setting, in words; a vector's (with the `stream_norm`
    its strengths are shares of; a recommendation's strength is the length it adds) as that share."""
    weighted = f", prompt x{row['prompt_scale']:g}" if row["prompt_scale"] != 1 else ""
    if stream_norm is None:
        return f"clamp {row['strength']:g}x max_act{weighted}"
    share = row["strength"] / stream_norm if row.get("unit") == "norm" else row["strength"]
    return f"add {share:.3g} of the stream norm{weighted}"


def calibrated_rows(r: dict) -> list[tuple[dict, str, str]]:
    """A concept's evaluation rows at calibrated strengths, each with what was calibrated and its setting."""
    best = next(c for c in r["calibrated"] if c["index"] == r["best"])
    about = {"feature, calibrated": (f"feature {r['best']} ({best['label']})", setting_of(best["recommendation"])),
             "vector, calibrated": (f"contrastive vector, layer {VECTOR_LAYER}", setting_of(r["vector"]["recommendation"], r["vector"]["stream_norm"])
                                    if r["vector"]["recommendation"] else "")}  # fmt: skip
    return [(row, *about[row["method"]]) for row in r["evaluation"] if row["method"] in CALIBRATED]


def markdown(results: list[dict], seconds: float) -> str:
    met = [r for r in results if any(row["meets_bar"] for row, _, _ in calibrated_rows(r))]
    lines = [
        "# Effect benchmark: steering toward a concept, and what it costs",
        "",
        f"Per concept, every choice was made on {len(PILOT_PROMPTS)} pilot prompts and every figure below the first "
        f"heading comes from {len(PROMPTS)} evaluation prompts that nothing was chosen on ({MAX_TOKENS} tokens, "
        f"temperature 0.7, seeded). The features the server's search finds for the concept (4 per query, by meaning, and 8 most "
        f"active on its description) were screened on {len(SCREEN['prompts'])} pilot prompts at two strong settings "
        f"(clamp 3x max_act; 1.25x with the prompt steered 4x), and the {CANDIDATES} with the most concept there were "
        f"each calibrated through `POST /v1/saes/{SAE}/features/{{i}}/calibrate` on the pilot prompts (fluency budget "
        f"{BUDGET:g}x, the concept's description as the embedding judge's target) and ranked by the effect each showed "
        f"at its recommended setting. Methods: *feature, calibrated*: the best feature at strength 1 in unit "
        f"`calibrated`, with no strength picked by hand; *feature, prompt_scale 1*: the same feature at the "
        f"calibration's best setting that steers the prompt like the answer; *team*: the best {TEAM} calibrated "
        f"features together, their common scale ({', '.join(f'{s:g}' for s in TEAM_SCALES)}) chosen on the pilot; "
        f"*vector, calibrated*: `POST /v1/vectors/contrast` at layer {VECTOR_LAYER} from {len(TEMPLATES) * 4} chats about "
        f"the concept against {len(TEMPLATES) * len(NEUTRAL)} neutral ones, kept and calibrated through "
        f"`POST /v1/vectors/{{name}}/calibrate` on the pilot prompts (the same budget and judge; strengths are shares of "
        f"the stream's norm), then sent at strength 1 in unit `calibrated`; *prompting*: no "
        f"steering, the system prompt \"{system_prompt(CONCEPTS[0])}\". The team's pilot choice takes the most keyword "
        f"mentions within {BUDGET:g}x the unsteered median perplexity. Judges: keywords; embedding similarity >= "
        f"{EMBEDDING_THRESHOLD:g} to the concept's description (all-MiniLM-L6-v2); perplexity under the unsteered model "
        f"(transformers, float32); relevance, the answer's similarity to its prompt; *harmonic*, per answer the "
        f"harmonic mean of concept (keyword or embedding), fluency (unsteered median perplexity / its own, at most 1) "
        f"and relevance (over the unsteered median, at most 1), averaged, as AxBench aggregates. Run took {seconds:.0f} s.",
        "",
        f"## Calibrated steering against the bar ({len(PROMPTS)} evaluation prompts)",
        "",
        f"The bar: at least {BAR_MENTIONS:.0%} of answers mention the concept by keyword and {BAR_EMBEDDING:.0%} by the "
        f"embedding judge, within {FLUENCY_LIMIT:g}x the unsteered median perplexity. **{len(met)} of {len(results)} "
        f"concepts meet it** at a calibrated strength"
        + (f" ({', '.join(sorted({row['method'] for r in results for row, _, _ in calibrated_rows(r) if row['meets_bar']}))})." if met else "."),
        "",
        "| concept | method | steering with | calibrated setting | mentions | embedding | median ppl (x unsteered) | relevance | harmonic | meets the bar |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = r["evaluation"][0]
        for top, what, setting in calibrated_rows(r):
            lines.append(
                f"| {r['concept']} | {top['method']} | {what} | {setting} | {top['keyword_rate']:.0%} "
                f"| {top['embedding_rate']:.0%} | {ratio(top, base)} | {top['median_relevance'] / base['median_relevance']:.2f} "
                f"| {top['harmonic']:.2f} | {'yes' if top['meets_bar'] else '**no**'} |"
            )
    lines += ["", "## Every method on the evaluation prompts", "",
              "| concept | method | mentions | embedding | median ppl (x unsteered) | relevance (x unsteered) | harmonic | meets the bar |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        base = r["evaluation"][0]
        for row in r["evaluation"]:
            bar = "" if row is base else "yes" if row["meets_bar"] else "no"
            lines.append(
                f"| {r['concept']} | {row['method']} | {row['keyword_rate']:.0%} | {row['embedding_rate']:.0%} | {ratio(row, base)} "
                f"| {row['median_relevance'] / base['median_relevance']:.2f} | {row['harmonic']:.2f} | {bar} |"
            )
    lines += [""]
    for r in results:
        prompting, steered = r["evaluation"][1], r["evaluation"][2:]
        best = max(steered, key=lambda row: row["harmonic"])
        if prompting["harmonic"] >= best["harmonic"]:
            verdict = (f"**prompting wins**: harmonic {prompting['harmonic']:.2f} against {best['harmonic']:.2f} for the best "
                       f"steering ({best['method']}), with {prompting['keyword_rate']:.0%} mentions at {times(prompting, r['evaluation'][0]):.2f}x perplexity")  # fmt: skip
        else:
            verdict = f"steering wins: {best['method']} scores {best['harmonic']:.2f} against prompting's {prompting['harmonic']:.2f}"
        examples = "; ".join(f"{row['method']}: \"{row['example'][:160]}\"".replace("\n", " ") for row, _, _ in calibrated_rows(r))
        lines.append(f"- **{r['concept']}**: {verdict}. To \"{PROMPTS[0]}\", {examples}")
    lines += ["", f"## Features ranked by their effect (calibrated on the {len(PILOT_PROMPTS)} pilot prompts)", "",
              "In screening order; *effect* is the recommended setting's concept score: the share of answers in which the "
              "feature fires before steering and that the embedding judge finds about the concept.", "",
              "| concept | feature | label | recommended | effect | ppl (x unsteered) | calibration took | chosen |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        for c in r["calibrated"]:
            top = c["recommendation"]
            rec = (setting_of(top), f"{top['effect']:.2f}", f"{top['perplexity_ratio']:.2f}x") if top else ("none within budget", "", "")
            lines.append(f"| {r['concept']} | {c['index']} | {c['label']} | {' | '.join(rec)} | {c['seconds']:.0f} s | {'**best**' if c['index'] == r['best'] else ''} |")
    lines += ["", "Screened (concept score at the stronger of the two screening settings): "]
    lines += [f"- **{r['concept']}**: " + ", ".join(f"{c['index']} {c['screen']:.2f}" for c in r["screened"]) for r in results]
    lines += ["", "## Calibration curves of the best feature and of the vector (pilot)", "",
              "*concept*: for a feature, the share of answers where it fires and the judge agrees; for a vector (nothing to "
              "fire), the judge's share.", "",
              "| concept | steering with | setting | fires, tokens | fires, answers | judged | concept | relevance | ppl (x unsteered) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        best = next(c for c in r["calibrated"] if c["index"] == r["best"])
        norm = r["vector"]["stream_norm"]
        for what, cal, stream_norm in ((f"feature {r['best']}", best, None), ("vector", r["vector"], norm)):
            top = cal["recommendation"]
            chosen = (top["strength"] / norm if stream_norm else top["strength"], top["prompt_scale"]) if top else None
            for row in cal["curve"]:
                mark = " **(recommended)**" if chosen and math.isclose(row["strength"], chosen[0], rel_tol=1e-6) and row["prompt_scale"] == chosen[1] else ""
                fired = (f"{row['fired']:.0%}", f"{row['answers_fired']:.0%}") if row["fired"] is not None else ("", "")
                lines.append(f"| {r['concept']} | {what} | {setting_of(row, stream_norm)}{mark} | {' | '.join(fired)} | {row['judged']:.0%} | {row['concept']:.2f} "
                             f"| {row['relevance']:.2f} | {row['perplexity_ratio']:.2f} |")  # fmt: skip
    lines += ["", "## Pilot choices: the team's scale", "",
              "| concept | setting | mentions | embedding | median ppl (x unsteered) | chosen |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        for choice in r["pilot"].values():
            base = choice["rows"][0]
            for n, row in enumerate(choice["rows"][1:], 1):
                lines.append(f"| {r['concept']} | {row['setting']} | {row['keyword_rate']:.0%} | {row['embedding_rate']:.0%} | {ratio(row, base)} | {'yes' if n == choice['chosen'] else ''} |")
    lines += ["", "## Prompts", "", f"Pilot (choosing only): {'; '.join(PILOT_PROMPTS)}", "",
              f"Evaluation (reporting only): {'; '.join(PROMPTS)}", "", "![effect benchmark](steering_demo.png)", ""]  # fmt: skip
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Per concept: every method on the evaluation prompts (mentions against perplexity), the bar's
    region shaded; below, the best feature's and the vector's calibration curves on the pilot, their recommendations starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(2, len(results), figsize=(4.3 * len(results), 7.5), squeeze=False)
    styles = {"unsteered": ("o", "grey"), "prompting": ("s", "C1"), "feature, calibrated": ("*", "C2"),
              "feature, prompt_scale 1": ("o", "C0"), "team": ("^", "C3"), "vector, calibrated": ("D", "C4")}  # fmt: skip
    seen = {}
    for ax, calib, r in zip(axes[0], axes[1], results):
        base = r["evaluation"][0]
        ax.axvspan(0.8, FLUENCY_LIMIT, ymin=BAR_MENTIONS / 1.05, color="green", alpha=0.1, label="the bar")
        for row in r["evaluation"]:
            family = "team" if row["method"].startswith("team") else row["method"]
            marker, colour = styles[family]
            (seen[family],) = ax.plot([times(row, base)], [row["keyword_rate"]], marker, color=colour, markeredgecolor="black",
                                      markersize=15 if family in CALIBRATED else 8, linestyle="none")  # fmt: skip
        ax.set(xscale="log", xlim=(0.8, 12), ylim=(0, 1.05), title=r["concept"], xlabel="median perplexity, x unsteered")
        best = next(c for c in r["calibrated"] if c["index"] == r["best"])
        for what, cal, style in (("feature", best, "o-"), ("vector", r["vector"], "D--")):
            for scale in sorted({row["prompt_scale"] for row in cal["curve"]}):
                rows = [row for row in cal["curve"] if row["prompt_scale"] == scale]
                calib.plot([row["perplexity_ratio"] for row in rows], [row["concept"] for row in rows], style, label=f"{what}, prompt x{scale:g}")
            if (top := cal["recommendation"]) is not None:
                calib.plot([top["perplexity_ratio"]], [top["effect"]], "k*", markersize=14, label="recommended" if cal is best else None)
        calib.axvline(BUDGET, color="grey", linestyle=":", label=f"budget {BUDGET:g}x")
        calib.set(xscale="log", ylim=(0, 1.05), title=f"calibration (pilot): feature {best['index']}, vector", xlabel="median perplexity, x unsteered")
        for axis in (ax, calib):
            axis.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v in (2, 3, 5) else ""))
    axes[0][0].set_ylabel(f"answers mentioning it ({len(PROMPTS)} evaluation prompts)")
    axes[1][0].set_ylabel("concept score")
    axes[0][-1].legend(list(seen.values()), list(seen), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[1][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: list[dict], out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {"seconds": round(seconds), "budget": BUDGET, "pilot_prompts": PILOT_PROMPTS, "evaluation_prompts": PROMPTS, "results": results}
    (out / "steering_demo.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "steering_demo.md").write_text(markdown(results, seconds))
    plot(results, out / "steering_demo.png")


def served(url: str | None, server_args: list[str], log: Path, work: Callable[[str], T]) -> T:
    """`work(url)` against the steerserve at `url`, or against one started with `server_args` for it."""
    server = None
    if url is None:
        print("starting steerserve ...", flush=True)
        server = start_steerserve(server_args, log)
    try:
        return work(url or server.url)
    finally:
        if server is not None:
            stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steering_demo")
    parser.add_argument("--url", help=f"a running steerserve with the default SAE, taking inline vectors at layer {VECTOR_LAYER} (default: start one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--concepts", type=int, default=len(CONCEPTS), help="run only the first N concepts")
    args = parser.parse_args()
    started = time.monotonic()
    server_args = ["--inline-vector-layers", str(VECTOR_LAYER)]
    log = args.out / "logs" / "steering-demo-server.log"
    results = served(args.url, server_args, log, lambda url: run(url, Judges(), CONCEPTS[: args.concepts]))
    write(results, args.out, time.monotonic() - started)
    print((args.out / "steering_demo.md").read_text())


if __name__ == "__main__":
    main()
