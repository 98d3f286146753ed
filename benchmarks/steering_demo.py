"""Does steering with the default SAE work? `python -m benchmarks.steering_demo [--url URL]`

For each concept: find candidate features through the server's search API (by words, and by a
text about the concept), clamp each on the pilot prompts, and keep the best one and a team of the
best few. Then, still on the pilot, clamp the best feature alone (with the prompt steered as hard
as the answer, and with the prompt steered PROMPT_SCALE times harder) and the team together at
several strengths, and choose the setting with the most mentions whose median perplexity stays
within 3x unsteered. Only that setting, and the unsteered model, then answer the 30 evaluation
prompts, which nothing was chosen on; those are the figures reported. Mentions are judged by
keywords and by sentence-embedding similarity; fluency by perplexity under the unsteered model and
the share of repeated 3-grams. Writes steering_demo.json, .md and .png under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
# Clamp targets, in multiples of each feature's max activation: one feature alone, and a team of
# TEAM features at once (each one lower, since their pushes add up).
STRENGTHS = [2.0, 3.0, 4.0, 6.0]
TEAM_STRENGTHS = [0.75, 1.0, 1.25, 1.5, 2.0]
# The best feature once more with `prompt_scale`: the prompt read PROMPT_SCALE times more strongly
# steered than the answer is written. 4 was chosen with transformers and the same hook on the
# first 8 pilot prompts and 8 more of the same kind, never on the evaluation prompts: for the
# bridge feature it gave far more mentions at the same perplexity than steering every token alike.
PROMPT_SCALE = 4.0
PROMPT_WEIGHTED_STRENGTHS = [1.0, 1.25, 1.5, 2.0]
PILOT_STRENGTH = 4.0
TEAM = 5
MAX_TOKENS = 80
EMBEDDING_THRESHOLD = 0.3  # cosine similarity to the concept's description that counts as about it
FLUENCY_LIMIT = 3.0  # a setting may be chosen if its median perplexity is at most this x unsteered
SAE = "default"
T = TypeVar("T")


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
    """Perplexity under the unsteered model, and sentence embeddings (features.embedding)."""

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


async def _answers(url: str, steerings: list[dict | None], prompts: list[str]) -> list[list[str]]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)

    async def one(steering: dict | None, n: int, prompt: str) -> str:
        extra = {"steering": steering} if steering else {}
        reply = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
            temperature=0.7, seed=n, extra_body=extra,
        )  # fmt: skip
        return reply.choices[0].message.content or ""

    try:
        flat = await asyncio.gather(*(one(s, n, p) for s in steerings for n, p in enumerate(prompts)))
    finally:
        await client.close()
    return [flat[i : i + len(prompts)] for i in range(0, len(flat), len(prompts))]


def answers(url: str, steerings: list[dict | None], prompts: list[str]) -> list[list[str]]:
    """Each steering's answers to every prompt (seed = the prompt's position, the same for every
    steering). All are sent at once: the engine batches a whole sweep, far faster on a CPU than one
    steering at a time."""
    return asyncio.run(_answers(url, steerings, prompts))


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


def screen(url: str, concept: Concept, judges: Judges, found: list[dict]) -> list[dict]:
    """Each candidate clamped alone on the pilot prompts: the share of answers that mention the
    concept and their median perplexity, best first."""
    rows = []
    answered = answers(url, [clamp([c["index"]], PILOT_STRENGTH) for c in found], PILOT_PROMPTS)
    for candidate, texts in zip(found, answered):
        ppl = statistics.median(judges.perplexity(p, t) for p, t in zip(PILOT_PROMPTS, texts))
        rows.append({"index": candidate["index"], "label": candidate["label"],
                     "keyword_rate": sum(mentions(concept, t) for t in texts) / len(texts), "median_perplexity": ppl})  # fmt: skip
    return sorted(rows, key=lambda r: (-r["keyword_rate"], r["median_perplexity"]))


def measure(url: str, concept: Concept, judges: Judges, target: torch.Tensor, prompts: list[str],
            settings: list[tuple[list[int], float, float]]) -> list[dict]:  # fmt: skip
    """Each clamp setting's (features, strength, prompt_scale) answers to `prompts`, scored."""
    answered = answers(url, [clamp(*setting) for setting in settings], prompts)
    rows = []
    for (features, strength, prompt_scale), texts in zip(settings, answered):
        row = {"features": features, "strength": strength, "prompt_scale": prompt_scale, **score(concept, judges, texts, prompts, target)}
        print(f"  {steering_name(row)} at {strength:g} x max_act on {len(prompts)} prompts: mentions {row['keyword_rate']:.0%} "
              f"(embedding {row['embedding_rate']:.0%}), median ppl {row['median_perplexity']:.1f}, "
              f"repetition {row['repetition']:.2f}", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def unsteered_row(concept: Concept, judges: Judges, target: torch.Tensor, prompts: list[str], texts: list[str]) -> dict:
    """The unsteered answers to `prompts`, scored for `concept`: the baseline every row is compared with."""
    return {"features": [], "strength": 0.0, "prompt_scale": 1.0, **score(concept, judges, texts, prompts, target)}


def choose(pilot: list[dict]) -> tuple[int, bool]:
    """The pilot row (after the unsteered one, row 0) with the most mentions whose median perplexity
    is within FLUENCY_LIMIT x unsteered, the less perplexing on a tie, and True; if no row is that
    fluent, the least perplexing one and False."""
    limit = FLUENCY_LIMIT * pilot[0]["median_perplexity"]
    steered = range(1, len(pilot))
    fluent = [n for n in steered if pilot[n]["median_perplexity"] <= limit]
    if fluent:
        return max(fluent, key=lambda n: (pilot[n]["keyword_rate"], -pilot[n]["median_perplexity"])), True
    return min(steered, key=lambda n: pilot[n]["median_perplexity"]), False


def run(url: str, judges: Judges, concepts: list[Concept]) -> list[dict]:
    results = []
    # Answered once, scored per concept.
    unsteered = {"pilot": answers(url, [None], PILOT_PROMPTS)[0], "evaluation": answers(url, [None], PROMPTS)[0]}
    for concept in concepts:
        found = candidates(url, concept)
        ranked = [r for r in screen(url, concept, judges, found) if r["keyword_rate"] > 0]
        if not ranked:
            print(f"{concept.name}: no candidate feature made the model mention it on the pilot", flush=True)
            continue
        team = [r["index"] for r in ranked[:TEAM]]
        print(f"{concept.name}: {len(found)} candidates; best {ranked[0]['index']} ({ranked[0]['label']}), team {team}", flush=True)
        target = judges.embed([concept.description])[0]
        best_one = [ranked[0]["index"]]
        settings = [(best_one, s, 1.0) for s in STRENGTHS] + [(best_one, s, PROMPT_SCALE) for s in PROMPT_WEIGHTED_STRENGTHS]
        settings += [(team, s, 1.0) for s in TEAM_STRENGTHS] if len(team) > 1 else []
        pilot = [unsteered_row(concept, judges, target, PILOT_PROMPTS, unsteered["pilot"])]
        pilot += measure(url, concept, judges, target, PILOT_PROMPTS, settings)
        chosen, fluent = choose(pilot)
        top = pilot[chosen]
        print(f"{concept.name}: chose {steering_name(top)} at {top['strength']:g} on the pilot; evaluating it", flush=True)
        evaluation = [
            unsteered_row(concept, judges, target, PROMPTS, unsteered["evaluation"]),
            *measure(url, concept, judges, target, PROMPTS, [(top["features"], top["strength"], top["prompt_scale"])]),
        ]
        results.append({"concept": concept.name, "queries": concept.queries, "candidates": ranked, "pilot": pilot,
                        "chosen": chosen, "fluent_on_pilot": fluent, "evaluation": evaluation})  # fmt: skip
    return results


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


def times(row: dict, base: dict) -> float:
    """A row's median perplexity as a multiple of the unsteered row's on the same prompts."""
    return row["median_perplexity"] / base["median_perplexity"]


def ratio(row: dict, base: dict) -> str:
    return f"{row['median_perplexity']:.1f} ({times(row, base):.2f}x)"


def markdown(results: list[dict], seconds: float) -> str:
    n_pilot, n_eval = len(PILOT_PROMPTS), len(PROMPTS)
    method = (
        f"Every choice was made on {n_pilot} pilot prompts; the figures under *On the evaluation prompts* come from "
        f"{n_eval} other neutral prompts that nothing was chosen on. On the pilot, per concept: candidate features "
        f"from the server's search, each clamped alone at {PILOT_STRENGTH:g}x max_act and ranked by mentions; the best "
        f"one clamped alone (at {', '.join(f'{s:g}' for s in STRENGTHS)}x), the same with `prompt_scale` {PROMPT_SCALE:g} "
        f"(the prompt's tokens steered {PROMPT_SCALE:g}x as hard as the answer's; at "
        f"{', '.join(f'{s:g}' for s in PROMPT_WEIGHTED_STRENGTHS)}x), and a team of the best {TEAM} together "
        f"(at {', '.join(f'{s:g}' for s in TEAM_STRENGTHS)}x each). Chosen: the setting with the most keyword mentions "
        f"on the pilot whose median perplexity there is within {FLUENCY_LIMIT:g}x the unsteered median there (the "
        f"less perplexing on a tie). Only that setting and the unsteered model then answered the evaluation prompts. "
        f"{MAX_TOKENS} tokens, temperature 0.7, seeded; clamp strength in multiples of each feature's max activation. "
        f"Mentions: keyword match; embedding: cosine similarity >= {EMBEDDING_THRESHOLD:g} to the concept's "
        f"description (all-MiniLM-L6-v2). Perplexity of the answer under the unsteered model, given the prompt. "
        f"Run took {seconds:.0f} s."
    )
    lines = [
        "# Steering demo: clamping the default SAE's features",
        "",
        method,
        "",
        f"## On the evaluation prompts ({n_eval}, never used for choosing)",
        "",
        (
            "| concept | setting, chosen on the pilot | mentions, keywords (unsteered) | mentions, embedding "
            "(unsteered) | median ppl (x unsteered) | repetition (unsteered) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        base, top = result["evaluation"]
        lines.append(
            f"| {result['concept']} | {steering_name(top)} at {top['strength']:g}x | {top['keyword_rate']:.0%} "
            f"({base['keyword_rate']:.0%}) | {top['embedding_rate']:.0%} ({base['embedding_rate']:.0%}) | "
            f"{ratio(top, base)} | {top['repetition']:.2f} ({base['repetition']:.2f}) |"
        )
    lines.append("")
    for result in results:
        (base, top), pilot_base, pilot_top = result["evaluation"], result["pilot"][0], result["pilot"][result["chosen"]]
        fluent = "" if result["fluent_on_pilot"] else f" (no pilot setting was within {FLUENCY_LIMIT:g}x: the least perplexing)"
        lines.append(
            f"- **{result['concept']}**: {steering_name(top)} at {top['strength']:g}x max_act{fluent}. On the evaluation "
            f"prompts {top['keyword_rate']:.0%} of answers mention it by keyword and {top['embedding_rate']:.0%} by "
            f"embedding (unsteered {base['keyword_rate']:.0%} and {base['embedding_rate']:.0%}), at "
            f"{times(top, base):.2f}x the unsteered median perplexity; on the pilot it had {pilot_top['keyword_rate']:.0%} "
            f"and {pilot_top['embedding_rate']:.0%} at {times(pilot_top, pilot_base):.2f}x. "
            f"Example (\"{PROMPTS[0]}\"): \"{top['example'][:160]}\""
        )
    lines += [
        "",
        f"## On the pilot ({n_pilot} prompts): every setting, and the one chosen",
        "",
        "| concept | steering | strength | mentions | embedding | median ppl (x unsteered) | repetition | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        base = result["pilot"][0]
        for n, row in enumerate(result["pilot"]):
            lines.append(
                f"| {result['concept']} | {steering_name(row)} | {row['strength']:g} | {row['keyword_rate']:.0%} | "
                f"{row['embedding_rate']:.0%} | {ratio(row, base)} | {row['repetition']:.2f} | "
                f"{'**chosen**' if n == result['chosen'] else ''} |"
            )
    lines += ["", f"## On the pilot: each candidate clamped alone at {PILOT_STRENGTH:g}x max_act", ""]
    for result in results:
        screened = ", ".join(f"{r['index']} {r['keyword_rate']:.0%}" for r in result["candidates"])
        lines.append(f"- **{result['concept']}** (searched {', '.join(result['queries'])}): {screened}")
    lines += [
        "",
        "## Prompts",
        "",
        f"Pilot (choosing only): {'; '.join(PILOT_PROMPTS)}",
        "",
        f"Evaluation (reporting only): {'; '.join(PROMPTS)}",
        "",
        "![steering demo](steering_demo.png)",
        "",
    ]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Each concept's pilot sweep as curves, and its chosen setting on the evaluation prompts as a
    star, joined to the same setting's pilot point: how far the choice carried over."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(11, 5.5))
    ax.axvspan(0.8, FLUENCY_LIMIT, ymin=0.7 / 1.05, color="green", alpha=0.08,
               label=f"target: >= 70% mention, <= {FLUENCY_LIMIT:g}x perplexity")  # fmt: skip
    for n, result in enumerate(results):
        pilot = result["pilot"]
        families = dict.fromkeys(family(r) for r in pilot[1:])
        for name, style in zip(families, ("-", ":", "--")):
            rows = [pilot[0]] + [r for r in pilot[1:] if family(r) == name]
            ax.plot([times(r, pilot[0]) for r in rows], [r["keyword_rate"] for r in rows], style,
                    marker="o", markersize=3, linewidth=1, color=f"C{n}", alpha=0.6,
                    label=f"{result['concept']}: {name} (pilot)")  # fmt: skip
        chosen, (eval_base, top) = pilot[result["chosen"]], result["evaluation"]
        x, y = times(top, eval_base), top["keyword_rate"]
        ax.plot([times(chosen, pilot[0]), x], [chosen["keyword_rate"], y], color=f"C{n}", linewidth=0.8)
        ax.plot([x], [y], marker="*", markersize=16, color=f"C{n}", markeredgecolor="black", linestyle="none",
                label=f"{result['concept']}: chosen, on the evaluation prompts")  # fmt: skip
    ax.set(xscale="log", xlim=(0.8, None), ylim=(0, 1.05), xlabel="median perplexity / unsteered (log)",
           ylabel="answers mentioning the concept (keywords)")  # fmt: skip
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 2, not 2x10^0
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v in (2, 3, 5) else ""))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, never over them
    ax.set_title(f"Clamping default-SAE features: settings tried on {len(PILOT_PROMPTS)} pilot prompts (curves),\n"
                 f"the one chosen there on {len(PROMPTS)} evaluation prompts (stars)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: list[dict], out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {"seconds": round(seconds), "pilot_prompts": PILOT_PROMPTS, "evaluation_prompts": PROMPTS, "results": results}
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
    parser.add_argument("--url", help="a running steerserve with the default SAE (default: start one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--concepts", type=int, default=len(CONCEPTS), help="run only the first N concepts")
    args = parser.parse_args()
    started = time.monotonic()
    results = served(args.url, [], args.out / "logs" / "steering-demo-server.log", lambda url: run(url, Judges(), CONCEPTS[: args.concepts]))
    write(results, args.out, time.monotonic() - started)
    print((args.out / "steering_demo.md").read_text())


if __name__ == "__main__":
    main()
