"""Do vectors derived by contrast steer? `python -m benchmarks.contrast_demo [--url URL]`

Per concept, `POST /v1/vectors/contrast` derives a difference-of-means direction at each of
LAYERS from 32 chats about the concept against 32 neutral ones (the same 8 requests, each about 4
subjects of the concept or 4 neutral ones, so the pairs differ in their subject only). On the
pilot prompts the directions are added at each of SETTINGS (layers, and a strength as a fraction
of the stream's norm there), and the setting with the most mentions whose median perplexity stays
within 3x unsteered is chosen; only that setting then answers the evaluation prompts, which neither the
derivation nor the choice saw. Answers, judges and prompts are the steering demo's
(benchmarks/steering_demo.py). Writes contrast.json, .md and .png under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import httpx

from benchmarks.steering_demo import (
    CONCEPTS,
    FLUENCY_LIMIT,
    MAX_TOKENS,
    PILOT_PROMPTS,
    PROMPTS,
    Concept,
    Judges,
    answers,
    choose,
    ratio,
    score,
    served,
    times,
)

# Where each concept's directions are added (each layer its own direction, derived there) and how
# hard: a fraction of the examples' mean stream norm at that layer (unit `norm`). Fractions carry
# over between concepts where multiples of the difference do not (a concept named in fewer tokens
# differs less on average). Chosen on the pilot prompts of the bridge and dogs: at layers 8, 15
# and 22 with 2-6x the difference, layer 8 was never both fluent and on topic and layer 22 stayed
# under 70% of mentions; at layer 15, 0.35-0.4 of the stream norm moved from half to most answers.
SETTINGS = [((15,), f) for f in (0.35, 0.4, 0.45, 0.5)] + [((14, 15, 16), f) for f in (0.12, 0.15)]
LAYERS = sorted({layer for layers, _ in SETTINGS for layer in layers})
TEMPLATES = [
    "Tell me about {}.", "Write a short poem about {}.", "What is the history of {}?", "Describe {} to a child.",
    "Why do people like {}?", "Give me three facts about {}.", "What comes to mind when you think of {}?",
    "Write a short story about {}.",
]  # fmt: skip
SUBJECTS = {
    "the Golden Gate Bridge / San Francisco": ["the Golden Gate Bridge", "San Francisco's red suspension bridge",
                                               "the bridge over the Golden Gate strait", "crossing the Golden Gate Bridge in the fog"],
    "dogs": ["dogs", "my puppy", "a loyal dog", "dogs playing fetch in the park"],
    "the ocean": ["the ocean", "the deep blue sea", "ocean waves crashing on the shore", "sailing across the sea"],
    "music": ["music", "playing the guitar", "a piano concert", "singing a song"],
}  # fmt: skip
NEUTRAL = ["a kitchen table", "the alphabet", "filing taxes", "a spreadsheet"]
BAR = 0.7  # the share of held-out answers that should mention the concept, within FLUENCY_LIMIT


def chats(subjects: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": template.format(subject)}] for template in TEMPLATES for subject in subjects]


def slug(concept: Concept, layer: int) -> str:
    return f"{re.sub(r'[^a-z0-9]+', '-', concept.name.lower()).strip('-')[:40]}-{layer}"


def derive(url: str, concept: Concept) -> dict[int, dict]:
    """The concept's direction at each layer, kept on the server under `slug`, by layer."""
    derived = {}
    for layer in LAYERS:
        body = {"positive": chats(SUBJECTS[concept.name]), "negative": chats(NEUTRAL), "layer": layer, "name": slug(concept, layer)}
        reply = httpx.post(f"{url}/v1/vectors/contrast", json=body, timeout=1800)
        reply.raise_for_status()
        derived[layer] = found = {k: v for k, v in reply.json().items() if k != "vector"}
        print(f"  layer {layer}: |v| {found['norm']:.1f} (stream {found['stream_norm']:.1f}), accuracy {found['accuracy']:.0%}", flush=True)
    return derived


def add(concept: Concept, derived: dict[int, dict], layers: tuple[int, ...], fraction: float) -> dict:
    """Each layer's direction added at `fraction` of the stream's norm there."""
    features = [{"vector": slug(concept, layer), "layer": layer, "mode": "add", "strength": fraction * derived[layer]["stream_norm"], "unit": "norm"}
                for layer in layers]  # fmt: skip
    return {"features": features}


def name(layers: list[int] | tuple[int, ...]) -> str:
    return "unsteered" if not layers else f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"


def setting(row: dict) -> str:
    return f"{name(row['layers'])} at {row['fraction']:g}" if row["layers"] else "unsteered"


def measure(url: str, concept: Concept, judges: Judges, derived: dict[int, dict], prompts: list[str],
            settings: list[tuple[tuple[int, ...], float]]) -> list[dict]:  # fmt: skip
    target = judges.embed([concept.description])[0]
    rows = []
    for (layers, fraction), texts in zip(settings, answers(url, [add(concept, derived, *s) for s in settings], prompts)):
        row = {"layers": list(layers), "fraction": fraction, **score(concept, judges, texts, prompts, target)}
        print(f"  {setting(row)} of the stream norm on {len(prompts)} prompts: mentions {row['keyword_rate']:.0%} "
              f"(embedding {row['embedding_rate']:.0%}), median ppl {row['median_perplexity']:.1f}", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def run(url: str, judges: Judges, concepts: list[Concept]) -> list[dict]:
    unsteered = {"pilot": answers(url, [None], PILOT_PROMPTS)[0], "evaluation": answers(url, [None], PROMPTS)[0]}
    results = []
    for concept in concepts:
        print(f"{concept.name}: deriving", flush=True)
        derived = derive(url, concept)
        target = judges.embed([concept.description])[0]
        pilot = [{"layers": [], "fraction": 0.0, **score(concept, judges, unsteered["pilot"], PILOT_PROMPTS, target)}]
        pilot += measure(url, concept, judges, derived, PILOT_PROMPTS, SETTINGS)
        chosen, fluent = choose(pilot)
        top = pilot[chosen]
        print(f"{concept.name}: chose {setting(top)} on the pilot; evaluating it", flush=True)
        evaluation = [
            {"layers": [], "fraction": 0.0, **score(concept, judges, unsteered["evaluation"], PROMPTS, target)},
            *measure(url, concept, judges, derived, PROMPTS, [(tuple(top["layers"]), top["fraction"])]),
        ]
        results.append({"concept": concept.name, "derived": list(derived.values()), "pilot": pilot, "chosen": chosen,
                        "fluent_on_pilot": fluent, "evaluation": evaluation})  # fmt: skip
    return results


def markdown(results: list[dict], seconds: float) -> str:
    lines = [
        "# Steering with vectors derived by contrast",
        "",
        f"Per concept, `POST /v1/vectors/contrast` derived a difference-of-means direction at layers {LAYERS} from "
        f"{len(TEMPLATES) * 4} chats about the concept against {len(TEMPLATES) * len(NEUTRAL)} neutral ones (each of "
        f"{len(TEMPLATES)} requests about 4 subjects of the concept, or about {', '.join(NEUTRAL)}). On {len(PILOT_PROMPTS)} "
        f"pilot prompts the directions were added, each at its own layer, at a fraction of the examples' mean stream "
        f"norm there (unit `norm`; the reply's `stream_norm`): {'; '.join(f'{name(layers)} at {f:g}' for layers, f in SETTINGS)}. "
        f"The setting with the most keyword mentions whose median perplexity stayed within {FLUENCY_LIMIT:g}x unsteered was "
        f"chosen. Only it, and the unsteered model, then answered the {len(PROMPTS)} evaluation prompts, which neither "
        f"the derivation nor the choice saw. {MAX_TOKENS} tokens, temperature 0.7, seeded; judges, prompts and "
        f"perplexity as in the [steering demo](steering_demo.md). Run took {seconds:.0f} s.",
        "",
        f"## On the evaluation prompts ({len(PROMPTS)}, never used for choosing)",
        "",
        f"| concept | setting, chosen on the pilot | mentions, keywords (unsteered) | mentions, embedding (unsteered) | median ppl (x unsteered) | repetition (unsteered) | >= {BAR:.0%} within {FLUENCY_LIMIT:g}x |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base, row = r["evaluation"]
        met = row["keyword_rate"] >= BAR and times(row, base) <= FLUENCY_LIMIT
        lines.append(
            f"| {r['concept']} | {setting(row)} | {row['keyword_rate']:.0%} ({base['keyword_rate']:.0%}) "
            f"| {row['embedding_rate']:.0%} ({base['embedding_rate']:.0%}) | {ratio(row, base)} "
            f"| {row['repetition']:.2f} ({base['repetition']:.2f}) | {'yes' if met else '**no**'} |"
        )
    lines += [""]
    for r in results:
        row = r["evaluation"][1]
        example = row["example"][:160].replace("\n", " ")
        lines.append(f"- **{r['concept']}** ({PROMPTS[0]!r}): \"{example}\"")
    lines += ["", f"## On the pilot ({len(PILOT_PROMPTS)} prompts): every setting, and the one chosen", "",
              "| concept | setting (fraction of the stream norm) | mentions | embedding | median ppl (x unsteered) | chosen |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        base = r["pilot"][0]
        for n, row in enumerate(r["pilot"]):
            lines.append(
                f"| {r['concept']} | {setting(row)} | {row['keyword_rate']:.0%} | {row['embedding_rate']:.0%} "
                f"| {ratio(row, base)} | {'yes' if n == r['chosen'] else ''} |"
            )
    lines += ["", "## The derived directions", "", "| concept | layer | length | mean stream norm | accuracy on its examples |", "|---|---|---|---|---|"]
    for r in results:
        for d in r["derived"]:
            lines.append(f"| {r['concept']} | {d['layer']} | {d['norm']:.1f} | {d['stream_norm']:.1f} | {d['accuracy']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        base = r["pilot"][0]
        for layers in dict.fromkeys(layers for layers, _ in SETTINGS):
            rows = [row for row in r["pilot"] if tuple(row["layers"]) == layers]
            ax.plot([times(row, base) for row in rows], [row["keyword_rate"] for row in rows], "o-", label=f"{name(layers)} (pilot)")
        ev_base, ev = r["evaluation"]
        ax.plot([times(ev, ev_base)], [ev["keyword_rate"]], "k*", markersize=14, label="chosen, evaluation")
        ax.axvline(FLUENCY_LIMIT, color="grey", linestyle=":")
        ax.axhline(BAR, color="grey", linestyle=":")
        ax.set_title(r["concept"], fontsize=9)
        ax.set_xlabel("median perplexity, x unsteered")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("answers mentioning the concept")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.contrast_demo")
    parser.add_argument("--url", help=f"a running steerserve taking inline vectors at layers {LAYERS} (default: start one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--concepts", type=int, default=len(CONCEPTS), help="run only the first N concepts")
    args = parser.parse_args()
    started = time.monotonic()
    server_args = ["--inline-vector-layers", ",".join(map(str, LAYERS))]
    results = served(args.url, server_args, args.out / "logs" / "contrast-demo-server.log", lambda url: run(url, Judges(), CONCEPTS[: args.concepts]))
    seconds = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"seconds": round(seconds), "settings": SETTINGS, "positive_subjects": SUBJECTS,
              "neutral_subjects": NEUTRAL, "templates": TEMPLATES, "results": results}  # fmt: skip
    (args.out / "contrast.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "contrast.md").write_text(markdown(results, seconds))
    plot(results, args.out / "contrast.png")
    print((args.out / "contrast.md").read_text())


if __name__ == "__main__":
    main()
