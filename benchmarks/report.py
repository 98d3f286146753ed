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


def _tok_s(results: list[Result], target: str, scenario: str, group: str) -> float:
    values = [r.output_tok_s for r in results
              if r.labels["target"] == target and r.scenario == scenario and r.labels["group"] == group]  # fmt: skip
    return statistics.mean(values)


def _p99_ttft(results: list[Result], scenario: str, group: str) -> float:
    values = [r.ttft_ms["p99"] for r in results
              if r.labels["target"] == "steerserve" and r.scenario == scenario and r.labels["group"] == group]  # fmt: skip
    return statistics.mean(values)


def budgets(results: list[Result]) -> list[dict]:
    base = _tok_s(results, "steerserve", "unsteered", "headline")
    c16 = _tok_s(results, "steerserve", STEERED, "c16")
    rows = [
        ("steered (100%, distinct) / unsteered, c=64", _tok_s(results, "steerserve", STEERED, "headline") / base, ">=", 0.97),
        ("clamp-heavy / unsteered, c=64", _tok_s(results, "steerserve", "heavy (16 feat, 2 layers, clamp)", "headline") / base, ">=", 0.95),
        ("steerserve unsteered / plain vLLM, c=64", base / _tok_s(results, "plain vLLM", "unsteered", "headline"), ">=", 0.97),
        ("steerserve steered / transformers hooks, c=16", c16 / _tok_s(results, "hf hooks", STEERED, "c16"), ">=", 10.0),
        ("p99 TTFT steered / unsteered, c=16", _p99_ttft(results, STEERED, "c16") / _p99_ttft(results, "unsteered", "c16"), "<=", 1.10),
    ]
    return [
        {"budget": name, "ratio": round(value, 3), "target": f"{op} {target}",
         "met": value >= target if op == ">=" else value <= target}  # fmt: skip
        for name, value, op, target in rows
    ]


def diagnostics(results: list[Result]) -> list[dict]:
    """Ratios that say where a cost comes from (no targets)."""
    plain = _tok_s(results, "plain vLLM", "unsteered", "headline")
    bare = _tok_s(results, "steerserve, no SAE", "unsteered", "headline")
    return [
        {"ratio_of": "steerserve without SAEs / plain vLLM, c=64 (API layer and plugins, no hooks)", "ratio": round(bare / plain, 3)},
        {"ratio_of": "steerserve with SAEs / without, unsteered, c=64 (the hooks themselves)",
         "ratio": round(_tok_s(results, "steerserve", "unsteered", "headline") / bare, 3)},
    ]  # fmt: skip


def _table(results: list[Result]) -> str:
    head = "| target | scenario | group | c | requests | errors | tok/s | req/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms |"
    lines = [head, "|" + "---|" * 10]
    for r in results:
        t, i = r.ttft_ms, r.itl_ms
        lines.append(
            f"| {r.labels['target']} | {r.scenario} | {r.labels['group']} | {r.concurrency} | {r.requests} | {r.errors} "
            f"| {r.output_tok_s} | {r.req_s} | {t['p50']}/{t['p90']}/{t['p99']} | {i['p50']}/{i['p90']}/{i['p99']} |"
        )
    return "\n".join(lines)


def _failures(results: list[Result]) -> str:
    lines = [
        f"- {r.labels['target']}, {r.scenario}, c={r.concurrency}: {count} x {kind}"
        for r in results for kind, count in r.error_kinds.items()
    ]  # fmt: skip
    return "\n\n## Failed requests\n\n" + "\n".join(lines) if lines else ""


def _plots(out: Path, results: list[Result]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for scenario in ("unsteered", STEERED):
        points = sorted((r.concurrency, r.output_tok_s) for r in results
                        if r.labels["target"] == "steerserve" and r.scenario == scenario
                        and r.labels["group"] in ("concurrency", "headline"))  # fmt: skip
        ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=scenario)
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s", title="Throughput vs concurrency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_concurrency.png", dpi=120)
    plt.close(fig)

    base = _tok_s(results, "steerserve", "unsteered", "headline")
    points = sorted((r.labels["features"], 100 * (1 - r.output_tok_s / base)) for r in results if r.labels["group"] == "features")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([n for n, _ in points], [o for _, o in points], marker="o")
    ax.axhline(3, color="grey", linestyle="--", label="3% budget")
    ax.set(xscale="log", xlabel="features per request (c=64)", ylabel="throughput overhead vs unsteered (%)",
           title="Steering overhead vs features per request")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "overhead_vs_features.png", dpi=120)
    plt.close(fig)


def write_report(out: Path, results: list[Result], machine: dict, seconds: float) -> dict:
    summary = {
        "machine": machine, "seconds": round(seconds), "budgets": budgets(results), "diagnostics": diagnostics(results),
        "results": [r.row() for r in results],
    }  # fmt: skip
    (out / "latest.json").write_text(json.dumps(summary, indent=2))
    budget_lines = ["| budget | ratio | target | met |", "|---|---|---|---|"] + [
        f"| {b['budget']} | {b['ratio']} | {b['target']} | {'yes' if b['met'] else '**no**'} |" for b in summary["budgets"]
    ]
    (out / "latest.md").write_text(
        f"# Load test, {machine}\n\nRun took {summary['seconds']} s.\n\n## Budgets\n\n"
        + "\n".join(budget_lines)
        + "\n\n## Where the cost comes from\n\n"
        + "\n".join(f"- {d['ratio_of']}: {d['ratio']}" for d in summary["diagnostics"])
        + "\n\n## All runs\n\n"
        + _table(results)
        + _failures(results)
        + "\n\n![throughput](throughput_vs_concurrency.png)\n![overhead](overhead_vs_features.png)\n"
    )
    _plots(out, results)
    return summary
