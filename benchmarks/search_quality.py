"""How often search finds a feature about the query: the committed concept and category lists
(benchmarks/queries/search.json), searched by meaning and by words side by side.

A query hits when one of its top 5 features has, among its top contexts, an activating word the
query accepts: the concept or a synonym; for a category, one of its members (never the category
word). Writes benchmarks/results/search.{json,md,png}.

    python -m benchmarks.search_quality
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from features.catalogue import Catalogue
from features.formats import DEFAULT_SAE
from features.labels import activating_word

QUERIES = Path(__file__).parent / "queries" / "search.json"
TOP = 5
BUDGETS = {"concepts": 0.8, "categories": 0.7}


def hits(catalogue: Catalogue, found: list[dict], accept: list[str]) -> list[int]:
    """The found features with an accepted activating word in their top contexts."""
    accepted = set(accept)
    return [r["index"] for r in found if any(activating_word(c["text"]) in accepted for c in catalogue.card(r["index"])["top_contexts"])]


def evaluate(catalogue: Catalogue, queries: dict[str, list[str]], search: Callable[[str], list[dict]]) -> list[dict]:
    rows = []
    for query, accept in queries.items():
        found = search(query)[:TOP]
        hit = hits(catalogue, found, accept)
        rows.append({
            "query": query, "hit": bool(hit), "hits": hit,
            "by_exact_match": bool(hit) and all(r.get("exact") for r in found if r["index"] in hit),
            "top": [{"index": r["index"], "label": r["label"], **({"similarity": r["similarity"]} if "similarity" in r else {})} for r in found],
        })  # fmt: skip
    return rows


def run(sae_dir: Path) -> dict:
    catalogue = Catalogue.load(sae_dir)
    assert catalogue is not None and catalogue.embeddings is not None, f"{sae_dir}: label it first (steerserve features label)"
    lists = json.loads(QUERIES.read_text())
    methods = {
        "meaning": lambda q: catalogue.search(q, TOP),
        "words": lambda q: catalogue.search_words(q, TOP),
    }
    results = {}
    for kind in BUDGETS:
        for name, search in methods.items():
            rows = evaluate(catalogue, lists[kind], search)
            results[f"{kind}/{name}"] = {
                "hit_rate": round(sum(r["hit"] for r in rows) / len(rows), 4),
                "hit_by_exact_match_only": round(sum(r["by_exact_match"] for r in rows) / len(rows), 4),
                "rows": rows,
            }
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    lines = [
        "# Feature search on the default SAE",
        "",
        f"Queries: [benchmarks/queries/search.json](../queries/search.json), written before the search they measure. "
        f"A query hits when one of its top {TOP} features has, among its top contexts, an activating word the query "
        "accepts (the concept or a synonym; for a category, a member, never the category word). "
        "`meaning` is `GET /v1/saes/default/features?q=` on the labelled catalogue; `words` is the word search it replaced. "
        "Exact matches (a label with the query's words, or a feature firing on them in a quarter of its top contexts) come "
        "first in `meaning`; the column beside counts the queries whose every hit was such a match.",
        "",
        "| queries | by meaning | of which only by exact match | by words | budget | met |",
        "|---|---|---|---|---|---|",
    ]
    for kind, budget in BUDGETS.items():
        meaning, words = results[f"{kind}/meaning"], results[f"{kind}/words"]["hit_rate"]
        lines.append(
            f"| {kind} ({len(meaning['rows'])}) | {meaning['hit_rate']:.0%} | {meaning['hit_by_exact_match_only']:.0%} | "
            f"{words:.0%} | {budget:.0%} | {'yes' if meaning['hit_rate'] >= budget else 'no'} |"
        )
    for kind in BUDGETS:
        lines += ["", f"## {kind.capitalize()}", "", "| query | meaning | top by meaning | words |", "|---|---|---|---|"]
        for mine, theirs in zip(results[f"{kind}/meaning"]["rows"], results[f"{kind}/words"]["rows"]):
            top = "; ".join(f"#{t['index']} {t['label']} ({t['similarity']:.2f})" for t in mine["top"][:3]) or "(nothing close)"
            lines.append(f"| {mine['query']} | {'hit' if mine['hit'] else 'miss'} | {top.replace('|', '/')} | {'hit' if theirs['hit'] else 'miss'} |")
    (out / "search.md").write_text("\n".join(lines) + "\n")
    plot(results, out / "search.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    kinds = list(BUDGETS)
    for offset, (name, colour) in enumerate([("meaning", "tab:blue"), ("words", "tab:grey")]):
        rates = [results[f"{kind}/{name}"]["hit_rate"] for kind in kinds]
        bars = ax.bar([k + (offset - 0.5) * 0.38 for k in range(len(kinds))], rates, 0.38, label=f"by {name}", color=colour)
        ax.bar_label(bars, labels=[f"{r:.0%}" for r in rates])
    for k, kind in enumerate(kinds):
        ax.hlines(BUDGETS[kind], k - 0.45, k + 0.45, colors="tab:red", linestyles="dashed", label="budget" if k == 0 else None)
    ax.set_xticks(range(len(kinds)), [f"{kind} ({len(results[f'{kind}/meaning']['rows'])})" for kind in kinds])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"queries with a hit in the top {TOP}")
    ax.set_title("Feature search on the default SAE")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.search_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae-dir", type=Path, default=DEFAULT_SAE)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    results = run(args.sae_dir)
    write(results, args.out)
    print({k: v["hit_rate"] for k, v in results.items()})


if __name__ == "__main__":
    main()
