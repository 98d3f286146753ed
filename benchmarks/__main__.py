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
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import (
    MAX_TOKENS,
    Bench,
    benchmark_saes,
    interleaved,
    long_prompts,
    start_targets,
    steered_outputs_differing,
)
from benchmarks.loadtest import Scenario, conditioned, mixed, random_spec, unsteered
from benchmarks.report import CONDITIONAL, HEAVY, READOUT, STEERED, steering_checks, write_report
from core.local import stop_server
from server.cli import model_dtype

ROUNDS = 4  # interleaved rounds behind each budget's median, min and max
PREFILL = 8  # requests per prefill run, all in flight at once: ~18k prompt tokens
CHECKED = 8  # steered greedy answers compared with unsteered ones


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
        # First, that steering changes answers: without it, nothing below measures steering.
        differing = steered_outputs_differing(ours, four, CHECKED)
        print(f"steered greedy answers differing from unsteered: {differing} of {CHECKED}", flush=True)
        headline = {"unsteered": unsteered, STEERED: four, CONDITIONAL: conditioned(four, ids["default"]), "mixed 50/50": mixed(four, 0.5), HEAVY: heavy}
        runs = [(ours, name, spec, "steerserve", {}) for name, spec in headline.items()]
        runs += [(ours, READOUT, unsteered, "steerserve", {"readout": {"sae": "default", "top_k": 5}})]
        runs += [(plain, "unsteered", unsteered, "plain vLLM", {}), (bare, "unsteered", unsteered, "steerserve, no SAE", {})]
        for rep, (server, name, spec, target, extra) in interleaved(runs, ROUNDS):
            scenario = Scenario(name, 64, 128, MAX_TOKENS, spec, {"group": "headline", "rep": rep}, extra=extra)
            bench.measure(server, scenario, target)
        # Long prompts, 4-token answers: prefill dominates. Every target reads the same prompts in a round.
        prefill = [(ours, "unsteered", unsteered, "steerserve"), (ours, HEAVY, heavy, "steerserve"), (plain, "unsteered", unsteered, "plain vLLM")]
        for rep, (server, name, spec, target) in interleaved(prefill, ROUNDS):
            scenario = Scenario(name, PREFILL, PREFILL, 4, spec, {"group": "prefill", "rep": rep}, fresh_prefill=True)
            bench.measure(server, scenario, target, long_prompts(PREFILL, seed=rep))
        for c in (1, 4, 16, 128):
            for name, spec in (("unsteered", unsteered), (STEERED, four)):
                bench.measure(ours, Scenario(name, c, requests_for(c), MAX_TOKENS, spec, {"group": "concurrency"}), "steerserve")
        # Each sweep point beside an unsteered run of its own, alternating which goes first.
        sweeps = [("features", 64, n, f"{n} features", random_spec({"default": ids["default"]}, n)) for n in (1, 4, 16, 64)]
        sweeps += [("distinct", 128, d, f"{d} distinct specs", pool(four, d)) for d in (1, 8, 32, 128)]
        for i, (group, c, value, name, spec) in enumerate(sweeps):
            pair = [(name, spec), ("unsteered", unsteered)]
            for name_, spec_ in pair if i % 2 else pair[::-1]:
                bench.measure(ours, Scenario(name_, c, 128, MAX_TOKENS, spec_, {"group": group, group: value}), "steerserve")
        c16 = [("unsteered", unsteered), (STEERED, four)]
        for rep, (name, spec) in interleaved(c16, ROUNDS):
            bench.measure(ours, Scenario(name, 16, 32, MAX_TOKENS, spec, {"group": "c16", "rep": rep}), "steerserve")
        bench.measure(hf, Scenario(STEERED, 16, 16, MAX_TOKENS, four, {"group": "c16"}), "hf hooks")
    finally:
        for server in servers.values():
            stop_server(server)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
               "dtype": model_dtype("auto")}  # fmt: skip
    checks = steering_checks(bench.results, differing, CHECKED)
    summary = write_report(out, bench.results, machine, time.monotonic() - bench.started, checks)
    print(json.dumps({"steering_checks": checks, "budgets": summary["budgets"]}, indent=2))
    if not all(c["met"] for c in checks):
        sys.exit("benchmarks: steering was not applied; these figures do not measure steering")


if __name__ == "__main__":
    main()
