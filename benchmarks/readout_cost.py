"""What reading features costs: `python -m benchmarks.readout_cost [--rounds N]`

The standard set's readout budget alone, over more rounds (the same servers, scenario and harness
as `python -m benchmarks`): 128 chat requests at concurrency 64 on steerserve, every one reading
the top 5 features of the default SAE at each of its generated tokens, against the same requests
unsteered and unread; and steerserve unsteered against plain vLLM (readout available, nobody
reading). Rounds are interleaved, every other one backwards; each ratio is taken within a round.
Writes readout_cost.json and readout_cost.md under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.harness import MAX_TOKENS, Bench, benchmark_saes, interleaved, start_targets
from benchmarks.loadtest import Scenario, unsteered
from benchmarks.report import READOUT
from core.local import stop_server

RUNS = {  # name -> (target, extra request fields)
    READOUT: ("steerserve", {"readout": {"sae": "default", "top_k": 5}}),
    "unsteered": ("steerserve", {}),
    "plain vLLM": ("plain vLLM", {}),
}
RATIOS = {
    "every request reading its top 5 / unsteered (target >= 0.90)": (READOUT, "unsteered"),
    "readout available, nobody reading: steerserve unsteered / plain vLLM (target >= 0.98)": ("unsteered", "plain vLLM"),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readout_cost")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers = start_targets(logs, benchmark_saes(), with_hf=False)
    stop_server(servers.pop("steerserve, no SAE"))
    bench = Bench()
    tok_s: dict[str, list[float]] = {name: [] for name in RUNS}
    try:
        for rep, (name, (target, extra)) in interleaved(list(RUNS.items()), args.rounds):
            scenario = Scenario(name, 64, 128, MAX_TOKENS, unsteered, {"group": "readout", "rep": rep}, extra=extra)
            tok_s[name].append(bench.measure(servers[target], scenario, target).output_tok_s)
    finally:
        for server in servers.values():
            stop_server(server)
    seconds = time.monotonic() - bench.started
    ratios = {}
    for label, (a, b) in RATIOS.items():
        per_round = [x / y for x, y in zip(tok_s[a], tok_s[b])]
        ratios[label] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round), "rounds": per_round}
    (args.out / "readout_cost.json").write_text(json.dumps({"seconds": round(seconds), "tok_s": tok_s, "ratios": ratios}, indent=2) + "\n")
    lines = [
        "# What reading features costs",
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
    (args.out / "readout_cost.md").write_text("\n".join(lines) + "\n")
    print((args.out / "readout_cost.md").read_text())


if __name__ == "__main__":
    main()
