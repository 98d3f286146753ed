"""The standard load-test set: `python -m benchmarks [--out DIR]`.

Starts steerserve, plain `vllm serve` and the transformers-hooks baseline on the same checkpoint,
runs every scenario against them with the same prompts and lengths, and writes JSON, a Markdown
table and PNG plots. Ratios are taken from runs interleaved in this one process, never from
absolute times measured apart, because these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.harness import MAX_TOKENS, Bench, benchmark_saes, interleaved, start_targets
from benchmarks.loadtest import Scenario, mixed, random_spec, unsteered
from benchmarks.report import write_report
from core.local import stop_server
from server.cli import model_dtype

REPEATS = 2


def requests_for(concurrency: int) -> int:
    return min(128, max(4, 2 * concurrency))


def pool(factory, size: int):
    """`size` distinct specs, requests drawing from them in turn: distinct specs per batch."""
    import random

    specs = [factory(random.Random(i), i) for i in range(size)]
    return lambda rng, n: specs[n % size]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--out", default="benchmarks/results", help="where the JSON, table and plots go")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)

    saes = benchmark_saes()
    ids = {sae_id: d_sae for sae_id, (_, d_sae) in saes.items()}
    servers = start_targets(logs, saes, with_hf=True)
    ours, bare, plain, hf = servers["steerserve"], servers["steerserve, no SAE"], servers["plain vLLM"], servers["hf hooks"]
    bench = Bench()
    try:
        four = random_spec({"default": ids["default"]}, 4)
        heavy = random_spec(ids, 16, ("clamp",))
        headline = {
            "unsteered": unsteered,
            "steered (distinct, 4 feat)": four,
            "mixed 50/50": mixed(four, 0.5),
            "heavy (16 feat, 2 layers, clamp)": heavy,
        }
        runs = [(ours, name, spec, "steerserve") for name, spec in headline.items()]
        runs += [(plain, "unsteered", unsteered, "plain vLLM"), (bare, "unsteered", unsteered, "steerserve, no SAE")]
        for rep, (server, name, spec, target) in interleaved(runs, REPEATS):
            bench.measure(server, Scenario(name, 64, 128, MAX_TOKENS, spec, {"group": "headline", "rep": rep}), target)
        for c in (1, 4, 16, 128):
            for name, spec in (("unsteered", unsteered), ("steered (distinct, 4 feat)", four)):
                bench.measure(ours, Scenario(name, c, requests_for(c), MAX_TOKENS, spec, {"group": "concurrency"}), "steerserve")
        for n in (1, 4, 16, 64):
            spec = random_spec({"default": ids["default"]}, n)
            bench.measure(ours, Scenario(f"{n} features", 64, 128, MAX_TOKENS, spec, {"group": "features", "features": n}), "steerserve")
        for d in (1, 8, 32, 128):
            spec = pool(four, d)
            bench.measure(ours, Scenario(f"{d} distinct specs", 128, 128, MAX_TOKENS, spec, {"group": "distinct", "distinct": d}), "steerserve")
        c16 = [("unsteered", unsteered), ("steered (distinct, 4 feat)", four)]
        for rep, (name, spec) in interleaved(c16, REPEATS):
            bench.measure(ours, Scenario(name, 16, 32, MAX_TOKENS, spec, {"group": "c16", "rep": rep}), "steerserve")
        bench.measure(hf, Scenario("steered (distinct, 4 feat)", 16, 16, MAX_TOKENS, four, {"group": "c16"}), "hf hooks")
    finally:
        for server in servers.values():
            stop_server(server)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
               "dtype": model_dtype("auto")}  # fmt: skip
    summary = write_report(out, bench.results, machine, time.monotonic() - bench.started)
    print(json.dumps(summary["budgets"], indent=2))


if __name__ == "__main__":
    main()
