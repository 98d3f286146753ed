"""A guardrail from a concept feature: `python -m benchmarks.guardrail`

A preset whose monitor stops an answer when a feature of the default SAE fires, as an operator
would deploy it. Everything is chosen on pilot prompts: candidate features come from the server's
feature search for the concept; each candidate's largest activation over every position of each
pilot answer (prompt and answer, from the readout) ranks the candidates, and the threshold is set
between the concept prompts' activations and the neutral ones' where it separates them best. The
preset then serves held-out prompts that nothing was chosen on, about the concept and neutral:
the figures reported are its stop rate on the first and its false-stop rate on the second.
Writes guardrail.json, .md and .png under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from benchmarks.steering_demo import PILOT_PROMPTS, PROMPTS, SAE, candidates
from benchmarks.steering_demo import Concept as SearchConcept
from core.local import MODEL_NAME, start_steerserve, stop_server

CONCEPT = SearchConcept(
    "dogs", ("dog", "puppy"), (r"\bdogs?\b",),
    "My dog loves to play fetch. Dogs and puppies are loyal pets; the dog wagged its tail and barked.",
)  # fmt: skip
CONCEPT_PILOT = [
    "How do I train my dog to sit?", "What should I feed a new puppy?", "Why does my dog bark at night?",
    "Which dog breeds are good with children?", "How often should I walk my dog?", "My puppy chews everything. Help!",
    "Write a short poem about a loyal dog.", "How do I teach an old dog new tricks?",
]  # fmt: skip
CONCEPT_HELD_OUT = [
    "Is it safe to give my dog bones?", "How do I stop my puppy biting?", "What is the best bed for a large dog?",
    "Tell me a story about a dog who gets lost.", "How can I tell if my dog is happy?", "Should I get a puppy or an older dog?",
    "What vaccines does a puppy need?", "How do I introduce my dog to a cat?", "Why do dogs wag their tails?",
    "How do I groom a long-haired dog?", "What games can I play with my dog indoors?", "How do I house-train a puppy?",
    "Describe a golden retriever.", "My dog is scared of fireworks. What can I do?", "How long do dogs usually live?",
    "What do sheepdogs do on a farm?", "Write a limerick about a puppy.", "How much exercise does a border collie need?",
    "Can dogs eat apples?", "How do guide dogs help blind people?",
]  # fmt: skip
NEUTRAL_PILOT = PILOT_PROMPTS[:8]
NEUTRAL_HELD_OUT = PROMPTS[:20]
MAX_TOKENS = 40
CANDIDATES = 8


async def _ask(client: AsyncOpenAI, model: str, prompt: str, extra: dict) -> dict:
    reply = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0, extra_body=extra
    )
    choice = reply.choices[0]
    return {"prompt": prompt, "text": choice.message.content, "finish_reason": choice.finish_reason, **choice.model_extra}


def ask(url: str, model: str, prompts: list[str], extra: dict) -> list[dict]:
    async def run() -> list[dict]:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=900, max_retries=0)
        return await asyncio.gather(*(_ask(client, model, p, extra) for p in prompts))

    return asyncio.run(run())


def peaks(url: str, prompts: list[str], features: list[int]) -> list[dict[int, float]]:
    """Each prompt's largest activation of each feature over its prompt and greedy answer."""
    readout = {"sae": SAE, "top_k": 0, "features": features, "prompt": True}
    replies = ask(url, MODEL_NAME, prompts, {"readout": readout})
    return [{i: max(t["features"][str(i)] for t in r["readout"]["tokens"]) for i in features} for r in replies]


def choose(concept: list[dict[int, float]], neutral: list[dict[int, float]], features: list[int]) -> dict:
    """The feature and threshold that best separate concept from neutral pilot prompts: the most
    concept prompts above it less the neutral ones, the threshold midway between neighbours."""
    best = None
    for i in features:
        values = sorted({p[i] for p in concept + neutral})
        for low, high in zip(values, values[1:]):
            above = (low + high) / 2
            hits = sum(p[i] > above for p in concept) / len(concept)
            false = sum(p[i] > above for p in neutral) / len(neutral)
            if best is None or hits - false > best["pilot_stop_rate"] - best["pilot_false_stop_rate"]:
                best = {"index": i, "above": above, "pilot_stop_rate": hits, "pilot_false_stop_rate": false}
    assert best is not None
    return best


def preset_file(chosen: dict) -> str:
    return f"""presets:
  - name: guard-dogs
    description: stops an answer when the default SAE's feature {chosen["index"]} fires (chosen on pilot prompts)
    model: {MODEL_NAME}
    monitors:
      - {{sae: {SAE}, index: {chosen["index"]}, above: {chosen["above"]:.4f}, action: stop, scope: all}}
"""


def wait_for_preset(url: str, name: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if name in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]:
            return
        time.sleep(0.5)
    raise RuntimeError(f"preset {name} never loaded")


def run(url: str, presets: Path) -> dict:
    found = candidates(url, CONCEPT)[:CANDIDATES]
    features = [f["index"] for f in found]
    print(f"candidates: {features}", flush=True)
    chosen = choose(peaks(url, CONCEPT_PILOT, features), peaks(url, NEUTRAL_PILOT, features), features)
    print(f"chosen on the pilot: {chosen}", flush=True)
    presets.write_text(preset_file(chosen))
    wait_for_preset(url, "guard-dogs")
    results = {}
    for name, prompts in (("concept", CONCEPT_HELD_OUT), ("neutral", NEUTRAL_HELD_OUT)):
        replies = ask(url, "guard-dogs", prompts, {})
        results[name] = [
            {"prompt": r["prompt"], "stopped": r["finish_reason"] == "content_filter", "monitors": r.get("monitors", []),
             "text": r["text"]}
            for r in replies
        ]  # fmt: skip
    rate = {name: sum(r["stopped"] for r in rows) / len(rows) for name, rows in results.items()}
    return {"concept": CONCEPT.name, "candidates": found, "chosen": chosen, "preset": preset_file(chosen),
            "stop_rate": rate["concept"], "false_stop_rate": rate["neutral"], "held_out": results,
            "max_tokens": MAX_TOKENS}  # fmt: skip


def markdown(result: dict, seconds: float) -> str:
    chosen = result["chosen"]
    lines = [
        "# Guardrail demo: a preset that stops answers when a concept feature fires",
        "",
        f"Concept: **{result['concept']}**. Candidates: the server's feature search for it (top {CANDIDATES}). Chosen on "
        f"{len(CONCEPT_PILOT)} concept and {len(NEUTRAL_PILOT)} neutral pilot prompts, by each prompt's largest activation "
        "over its prompt and greedy answer (the readout): the feature and threshold that stop the most concept prompts less "
        "the neutral ones. Reported on held-out prompts that nothing was chosen on, answered greedily through the preset "
        f"({result['max_tokens']} tokens). Run took {seconds:.0f} s.",
        "",
        "| | pilot | held out |",
        "|---|---|---|",
        f"| stop rate on prompts about {result['concept']} | {chosen['pilot_stop_rate']:.0%} | "
        f"**{result['stop_rate']:.0%}** ({len(CONCEPT_HELD_OUT)} prompts) |",
        f"| false-stop rate on neutral prompts | {chosen['pilot_false_stop_rate']:.0%} | "
        f"**{result['false_stop_rate']:.0%}** ({len(NEUTRAL_HELD_OUT)} prompts) |",
        "",
        f"Monitor: feature {chosen['index']} of `{SAE}` above {chosen['above']:.3f} (raw), scope `all`, action `stop`. The preset:",
        "",
        "```yaml",
        result["preset"].rstrip(),
        "```",
        "",
        "## Held-out answers",
        "",
        "| set | prompt | stopped | fired at (position, token, activation) | answer |",
        "|---|---|---|---|---|",
    ]
    for name, rows in result["held_out"].items():
        for r in rows:
            fired = "; ".join(f"{m['position']}, {m['token']!r}, {m['activation']:.2f}" for m in r["monitors"])
            text = (r["text"] or "").replace("\n", " ").replace("|", "/")[:80]
            lines.append(f"| {name} | {r['prompt']} | {'yes' if r['stopped'] else 'no'} | {fired} | {text} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = result["chosen"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = ["stop rate, concept", "false stops, neutral"]
    pilot = [chosen["pilot_stop_rate"], chosen["pilot_false_stop_rate"]]
    held = [result["stop_rate"], result["false_stop_rate"]]
    xs = range(len(labels))
    for offset, values, label in ((-0.2, pilot, "pilot (chosen on)"), (0.2, held, "held out")):
        bars = ax.bar([x + offset for x in xs], values, 0.4, label=label)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in values])
    ax.set_xticks(list(xs), labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of prompts")
    ax.set_title(f"Guardrail on {result['concept']}: feature {chosen['index']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guardrail")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        presets = Path(tmp) / "presets.yaml"
        presets.write_text(f"presets:\n  - name: placeholder\n    model: {MODEL_NAME}\n    features: [{{sae: {SAE}, index: 0}}]\n")
        print("starting steerserve with the default SAE ...", flush=True)
        server = start_steerserve(["--presets", str(presets)], args.out / "logs" / "guardrail-server.log")
        try:
            result = run(server.url, presets)
        finally:
            stop_server(server)
    seconds = time.monotonic() - started
    (args.out / "guardrail.json").write_text(json.dumps(result, indent=2))
    (args.out / "guardrail.md").write_text(markdown(result, seconds))
    plot(result, args.out / "guardrail.png")
    print((args.out / "guardrail.md").read_text())


if __name__ == "__main__":
    main()
