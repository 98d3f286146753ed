"""Budgets, the Markdown table and the PNG plots from one benchmark run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.loadtest import Result  # noqa: E402

STEERED = "steered (distinct, 4 feat)"
HEAVY = "heavy (16 feat, 2 layers, clamp)"
READOUT = "reading its top 5 (readout)"
CONDITIONAL = "steered conditionally (4 feat, each with when)"


def _by_round(results: list[Result], target: str, scenario: str, group: str, metric=lambda r: r.output_tok_s) -> dict[int, float]:
    return {r.labels.get("rep", 0): metric(r) for r in results
            if r.labels["target"] == target and r.scenario == scenario and r.labels["group"] == group}  # fmt: skip


def _ratio(num: dict[int, float], den: dict[int, float]) -> dict:
    """The ratio per round (a single baseline run divides every round), as median, min and max."""
    values = [num[k] / (den[k] if k in den else den[0]) for k in sorted(num)]
    return {"ratio": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3), "rounds": len(values)}


def budgets(results: list[Result]) -> list[dict]:
    def tok_s(target: str, scenario: str, group: str) -> dict[int, float]:
        return _by_round(results, target, scenario, group)

    def prompt_tok_s(target: str, scenario: str) -> dict[int, float]:
        return _by_round(results, target, scenario, "prefill", lambda r: r.prompt_tok_s)

    def p99_ttft(scenario: str) -> dict[int, float]:
        return _by_round(results, "steerserve", scenario, "c16", lambda r: r.ttft_ms["p99"])

    base = tok_s("steerserve", "unsteered", "headline")
    rows = [
        ("steered (100%, distinct) / unsteered, c=64", _ratio(tok_s("steerserve", STEERED, "headline"), base), ">=", 0.97),
        ("clamp-heavy / unsteered, c=64", _ratio(tok_s("steerserve", HEAVY, "headline"), base), ">=", 0.95),
        ("steerserve unsteered / plain vLLM, c=64", _ratio(base, tok_s("plain vLLM", "unsteered", "headline")), ">=", 0.97),
        ("every request reading its top 5 / unsteered, c=64", _ratio(tok_s("steerserve", READOUT, "headline"), base), ">=", 0.90),
        ("steered conditionally / unconditionally, c=64",
         _ratio(tok_s("steerserve", CONDITIONAL, "headline"), tok_s("steerserve", STEERED, "headline")), ">=", 0.95),
        ("steerserve steered / transformers hooks, c=16", _ratio(tok_s("steerserve", STEERED, "c16"), tok_s("hf hooks", STEERED, "c16")), ">=", 10.0),
        ("p99 TTFT steered / unsteered, c=16", _ratio(p99_ttft(STEERED), p99_ttft("unsteered")), "<=", 1.10),
        ("prefill: prompt tok/s, clamp-heavy / unsteered", _ratio(prompt_tok_s("steerserve", HEAVY), prompt_tok_s("steerserve", "unsteered")), ">=", 0.97),
        ("prefill: prompt tok/s, steerserve unsteered / plain vLLM",
         _ratio(prompt_tok_s("steerserve", "unsteered"), prompt_tok_s("plain vLLM", "unsteered")), ">=", 0.97),
    ]  # fmt: skip
    return [
        {"budget": name, **ratio, "target": f"{op} {target}",
         "met": ratio["ratio"] >= target if op == ">=" else ratio["ratio"] <= target}  # fmt: skip
        for name, ratio, op, target in rows
    ]


def steering_checks(results: list[Result], differing: int, sampled: int) -> list[dict]:
    """Whether steering happened at all: a run that fails these measured no steering, whatever its ratios."""
    unechoed = sum(r.unechoed for r in results if r.labels["target"] == "steerserve")
    steered = sum(r.requests for r in results if r.labels["target"] == "steerserve" and r.scenario != "unsteered")
    return [
        {"check": "steered greedy answers that differ from the unsteered answer", "value": f"{differing} of {sampled}",
         "target": "at least half", "met": 2 * differing >= sampled},
        {"check": "steered requests whose stream did not echo their steering", "value": f"{unechoed} of about {steered}",
         "target": "none", "met": unechoed == 0},
    ]  # fmt: skip


def diagnostics(results: list[Result]) -> list[dict]:
    """Ratios that say where a cost comes from (no targets)."""
    plain = _by_round(results, "plain vLLM", "unsteered", "headline")
    bare = _by_round(results, "steerserve, no SAE", "unsteered", "headline")
    ours = _by_round(results, "steerserve", "unsteered", "headline")
    return [
        {"ratio_of": "steerserve without SAEs / plain vLLM, c=64 (API layer and plugins, no hooks)", **_ratio(bare, plain)},
        {"ratio_of": "steerserve with SAEs / without, unsteered, c=64 (the hooks at rest)", **_ratio(ours, bare)},
    ]


def _table(results: list[Result]) -> str:
    head = ("| target | scenario | group | round | c | requests | errors | tok/s | prompt tok/s | req/s "
            "| TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for r in results:
        t, i = r.ttft_ms, r.itl_ms
        lines.append(
            f"| {r.labels['target']} | {r.scenario} | {r.labels['group']} | {r.labels.get('rep', '')} | {r.concurrency} "
            f"| {r.requests} | {r.errors} | {r.output_tok_s} | {r.prompt_tok_s} | {r.req_s} "
            f"| {t['p50']}/{t['p90']}/{t['p99']} | {i['p50']}/{i['p90']}/{i['p99']} |"
        )
    return "\n".join(lines)


def _failures(results: list[Result]) -> str:
    lines = [
        f"- {r.labels['target']}, {r.scenario}, c={r.concurrency}: {count} x {kind}"
        for r in results for kind, count in r.error_kinds.items()
    ]  # fmt: skip
    return "\n\n## Failed requests\n\n" + "\n".join(lines) if lines else ""


def _sweep_overhead(results: list[Result], group: str) -> list[tuple[int, float]]:
    """(sweep value, % throughput lost against the unsteered run measured beside it)."""
    runs = [r for r in results if r.labels["group"] == group]
    base = {r.labels[group]: r.output_tok_s for r in runs if r.scenario == "unsteered"}
    return sorted((r.labels[group], 100 * (1 - r.output_tok_s / base[r.labels[group]])) for r in runs if r.scenario != "unsteered")


def _plots(out: Path, results: list[Result]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for scenario in ("unsteered", STEERED):
        by_c: dict[int, list[float]] = {}
        for r in results:
            if r.labels["target"] == "steerserve" and r.scenario == scenario and r.labels["group"] in ("concurrency", "headline"):
                by_c.setdefault(r.concurrency, []).append(r.output_tok_s)
        points = sorted((c, statistics.median(v)) for c, v in by_c.items())
        ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=scenario)
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s (median of runs)", title="Throughput vs concurrency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_concurrency.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, group, label in ((axes[0], "features", "features per request (c=64)"), (axes[1], "distinct", "distinct specs per batch (c=128)")):
        points = _sweep_overhead(results, group)
        ax.plot([n for n, _ in points], [o for _, o in points], marker="o")
        ax.axhline(3, color="grey", linestyle="--", label="3% budget")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set(xscale="log", xlabel=label, title="against the unsteered run beside it")
        ax.legend()
    axes[0].set_ylabel("throughput overhead vs unsteered (%)")
    fig.tight_layout()
    fig.savefig(out / "overhead_vs_features.png", dpi=120)
    plt.close(fig)


def write_report(out: Path, results: list[Result], machine: dict, seconds: float, checks: list[dict]) -> dict:
    summary = {
        "machine": machine, "seconds": round(seconds), "steering_checks": checks, "budgets": budgets(results),
        "diagnostics": diagnostics(results), "results": [r.row() for r in results],
    }  # fmt: skip
    (out / "latest.json").write_text(json.dumps(summary, indent=2))
    check_lines = ["| check | value | target | met |", "|---|---|---|---|"] + [
        f"| {c['check']} | {c['value']} | {c['target']} | {'yes' if c['met'] else '**no**'} |" for c in checks
    ]
    budget_lines = ["| budget | median | min | max | rounds | target | met |", "|---|---|---|---|---|---|---|"] + [
        f"| {b['budget']} | {b['ratio']} | {b['min']} | {b['max']} | {b['rounds']} | {b['target']} | {'yes' if b['met'] else '**no**'} |"
        for b in summary["budgets"]
    ]
    (out / "latest.md").write_text(
        f"# Load test, {machine}\n\nRun took {summary['seconds']} s.\n\n## Steering happened\n\n"
        + "\n".join(check_lines)
        + "\n\n## Budgets\n\nEach ratio is taken per interleaved round; the median is the figure, min and max its spread.\n\n"
        + "\n".join(budget_lines)
        + "\n\n## Where the cost comes from\n\n"
        + "\n".join(f"- {d['ratio_of']}: {d['ratio']} (min {d['min']}, max {d['max']})" for d in summary["diagnostics"])
        + "\n\n## All runs\n\n"
        + _table(results)
        + _failures(results)
        + "\n\n![throughput](throughput_vs_concurrency.png)\n![overhead](overhead_vs_features.png)\n"
    )
    _plots(out, results)
    return summary
