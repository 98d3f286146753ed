"""What using features as signals costs: `python -m benchmarks.signal_cost [--rounds N]`

The standard set's readout and conditional-steering budgets alone, over more rounds (the same
servers, scenario and harness as `python -m benchmarks`): 128 chat requests at concurrency 64
on steerserve, as
- unsteered and unread, against every one reading the top 5 features of the default SAE at each
  of its generated tokens, and against plain vLLM (readout available, nobody reading);
- every one steering 4 distinct default-SAE features, against the same 4 each gated by a `when`
  condition on another default-SAE feature (token or sticky scope, alternately).
Rounds are interleaved, every other one backwards; each ratio is taken within a round. Writes
signal_cost.json and signal_cost.md under benchmarks/results/.
"""

from __future__ import annotations

import json
import statistics
import time

from benchmarks.harness import MAX_TOKENS, Bench, benchmark_saes, interleaved, rounds_args, start_targets
from benchmarks.loadtest import Scenario, conditioned, random_spec, unsteered
from benchmarks.report import CONDITIONAL, READOUT, STEERED
from core.local import stop_server


def runs(d_sae: int) -> dict:
    """name -> (target, spec factory, extra request fields)"""
    four = random_spec({"default": d_sae}, 4)
    return {
        READOUT: ("steerserve", unsteered, {"readout": {"sae": "default", "top_k": 5}}),
        "unsteered": ("steerserve", unsteered, {}),
        "plain vLLM": ("plain vLLM", unsteered, {}),
        STEERED: ("steerserve", four, {}),
        CONDITIONAL: ("steerserve", conditioned(four, d_sae), {}),
    }


RATIOS = {
    "every request reading its top 5 / unsteered (target >= 0.90)": (READOUT, "unsteered"),
    "readout available, nobody reading: steerserve unsteered / plain vLLM (target >= 0.98)": ("unsteered", "plain vLLM"),
    "every request steered conditionally / unconditionally, 4 features (target >= 0.95)": (CONDITIONAL, STEERED),
}


def main() -> None:
    args = rounds_args("benchmarks.signal_cost", 4)
    logs = args.out / "logs"
    saes = benchmark_saes()
    plan = runs(saes["default"][1])
    servers = start_targets(logs, saes, with_hf=False)
    stop_server(servers.pop("steerserve, no SAE"))
    bench = Bench()
    tok_s: dict[str, list[float]] = {name: [] for name in plan}
    try:
        for rep, (name, (target, spec, extra)) in interleaved(list(plan.items()), args.rounds):
            scenario = Scenario(name, 64, 128, MAX_TOKENS, spec, {"group": "signals", "rep": rep}, extra=extra)
            tok_s[name].append(bench.measure(servers[target], scenario, target).output_tok_s)
    finally:
        for server in servers.values():
            stop_server(server)
    seconds = time.monotonic() - bench.started
    ratios = {}
    for label, (a, b) in RATIOS.items():
        per_round = [x / y for x, y in zip(tok_s[a], tok_s[b])]
        ratios[label] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round), "rounds": per_round}
    (args.out / "signal_cost.json").write_text(json.dumps({"seconds": round(seconds), "tok_s": tok_s, "ratios": ratios}, indent=2) + "\n")
    lines = [
        "# What using features as signals costs",
        "",
        f"{args.rounds} interleaved rounds of 128 chat requests at concurrency 64, {MAX_TOKENS} output tokens each; "
        f"ratios of output tokens/s within a round, their median and range. Run took {seconds:.0f} s.",
        "",
        "| ratio | median | min | max |",
        "|---|---|---|---|",
        *(f"| {label} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} |" for label, r in ratios.items()),
        "",
        "| round | " + " | ".join(tok_s) + " |",
        "|---" * (len(tok_s) + 1) + "|",
        *(f"| {n} | " + " | ".join(f"{tok_s[name][n]:.1f}" for name in tok_s) + " |" for n in range(args.rounds)),
    ]
    (args.out / "signal_cost.md").write_text("\n".join(lines) + "\n")
    print((args.out / "signal_cost.md").read_text())


if __name__ == "__main__":
    main()
