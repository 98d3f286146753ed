"""Where does steerserve's unsteered cost against plain vLLM come from? `python -m benchmarks.overhead`

The standard set measures steerserve unsteered / plain vLLM from 2 interleaved rounds, which puts
the ratio within a few percent of its budget but cannot say whether a shortfall is real. This
runs only that comparison, many rounds over (same servers, scenario and harness as the standard
set), and reports each ratio's mean and spread across rounds: steerserve with its SAEs / plain
vLLM, steerserve with no SAE / plain vLLM (the API layer and plugins), and steerserve with / without
SAEs (the hooks at rest). Writes overhead.json and overhead.md under benchmarks/results/.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from benchmarks.harness import MAX_TOKENS, Bench, benchmark_saes, interleaved, rounds_args, start_targets
from benchmarks.loadtest import Scenario, unsteered
from core.local import stop_server

PAIRS = {
    "steerserve unsteered / plain vLLM": ("steerserve", "plain vLLM"),
    "steerserve, no SAE / plain vLLM (API layer and plugins)": ("steerserve, no SAE", "plain vLLM"),
    "steerserve / steerserve, no SAE (hooks at rest)": ("steerserve", "steerserve, no SAE"),
}


def summarise(throughput: dict[str, list[float]]) -> dict[str, dict]:
    """Per pair: the ratio of each round's throughputs, their mean, standard deviation and range."""
    out = {}
    for label, (a, b) in PAIRS.items():
        ratios = [x / y for x, y in zip(throughput[a], throughput[b])]
        out[label] = {"ratios": [round(r, 4) for r in ratios], "mean": statistics.mean(ratios),
                      "sd": statistics.stdev(ratios), "min": min(ratios), "max": max(ratios)}  # fmt: skip
    return out


def write(out: Path, throughput: dict[str, list[float]], summary: dict[str, dict], seconds: float) -> None:
    rounds = len(next(iter(throughput.values())))
    (out / "overhead.json").write_text(
        json.dumps({"seconds": round(seconds), "tok_s": throughput, "ratios": summary}, indent=2) + "\n"
    )
    lines = [
        "# Unsteered overhead against plain vLLM",
        "",
        f"{rounds} interleaved rounds (every other one backwards) of 128 unsteered chat requests at concurrency 64, "
        f"{MAX_TOKENS} output tokens each, on each server; ratios of throughputs within a round. Run took {seconds:.0f} s.",
        "",
        "| ratio | mean | sd | min | max |",
        "|---|---|---|---|---|",
    ]
    for label, r in summary.items():
        lines.append(f"| {label} | {r['mean']:.3f} | {r['sd']:.3f} | {r['min']:.3f} | {r['max']:.3f} |")
    lines += ["", "| round | " + " | ".join(throughput) + " |", "|---" * (len(throughput) + 1) + "|"]
    for n in range(rounds):
        lines.append(f"| {n} | " + " | ".join(f"{throughput[t][n]:.1f}" for t in throughput) + " |")
    (out / "overhead.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    args = rounds_args("benchmarks.overhead", 8)
    logs = args.out / "logs"
    servers = start_targets(logs, benchmark_saes(), with_hf=False)
    bench = Bench()
    throughput: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for rep, (name, server) in interleaved(list(servers.items()), args.rounds):
            scenario = Scenario("unsteered", 64, 128, MAX_TOKENS, unsteered, {"group": "overhead", "rep": rep})
            throughput[name].append(bench.measure(server, scenario, name).output_tok_s)
    finally:
        for server in servers.values():
            stop_server(server)
    summary = summarise(throughput)
    write(args.out, throughput, summary, time.monotonic() - bench.started)
    print((args.out / "overhead.md").read_text())


if __name__ == "__main__":
    main()
