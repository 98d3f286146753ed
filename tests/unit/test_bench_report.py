"""The load test's report (benchmarks/report.py) on synthetic runs: each budget is the median of
per-round ratios with its min and max, and a full report (tables, plots) is written from them."""

from __future__ import annotations

import json

from benchmarks.loadtest import Result
from benchmarks.report import CONDITIONAL, HEAVY, READOUT, STEERED, budgets, steering_checks, write_report


def result(target: str, scenario: str, group: str, tok_s: float, rep: int | None = None, prompt_tok_s: float = 0.0,
           p99: float = 100.0, unechoed: int = 0, **labels) -> Result:  # fmt: skip
    ms = {"p50": p99 / 2, "p90": p99, "p99": p99}
    return Result(scenario, 64, 128, 0, {}, 10.0, int(tok_s * 10), tok_s, int(prompt_tok_s * 10), prompt_tok_s, 12.8, ms, ms,
                  unechoed, {"target": target, "group": group, **({"rep": rep} if rep is not None else {}), **labels})  # fmt: skip


def runs(steered_rounds: list[float], unechoed: int = 0) -> list[Result]:
    out = []
    for rep, steered in enumerate(steered_rounds):
        out += [result("steerserve", "unsteered", "headline", 100.0, rep), result("steerserve", STEERED, "headline", steered, rep, unechoed=unechoed),
                result("steerserve", HEAVY, "headline", 99.0, rep), result("plain vLLM", "unsteered", "headline", 100.0, rep),
                result("steerserve", READOUT, "headline", 93.0, rep), result("steerserve", CONDITIONAL, "headline", 0.96 * steered, rep),
                result("steerserve, no SAE", "unsteered", "headline", 100.0, rep),
                result("steerserve", "unsteered", "prefill", 0, rep, prompt_tok_s=500.0), result("steerserve", HEAVY, "prefill", 0, rep, prompt_tok_s=490.0),
                result("plain vLLM", "unsteered", "prefill", 0, rep, prompt_tok_s=500.0),
                result("steerserve", "unsteered", "c16", 100.0, rep, p99=100.0), result("steerserve", STEERED, "c16", 100.0, rep, p99=105.0)]  # fmt: skip
    out.append(result("hf hooks", STEERED, "c16", 8.0))
    for n in (1, 64):
        out += [result("steerserve", "unsteered", "features", 100.0, features=n), result("steerserve", f"{n} features", "features", 98.0, features=n)]
        out += [result("steerserve", "unsteered", "distinct", 100.0, distinct=n), result("steerserve", f"{n} distinct specs", "distinct", 97.0, distinct=n)]
    return out


def test_a_budget_is_the_median_of_its_rounds_with_their_spread():
    rows = {b["budget"]: b for b in budgets(runs([90.0, 99.0, 100.0, 101.0]))}
    steered = rows["steered (100%, distinct) / unsteered, c=64"]
    assert (steered["ratio"], steered["min"], steered["max"], steered["rounds"]) == (0.995, 0.9, 1.01, 4)
    assert steered["met"]  # one slow round does not sink the median
    assert rows["steerserve steered / transformers hooks, c=16"]["ratio"] == 12.5
    assert rows["prefill: prompt tok/s, clamp-heavy / unsteered"]["ratio"] == 0.98
    assert rows["every request reading its top 5 / unsteered, c=64"]["ratio"] == 0.93
    assert rows["steered conditionally / unconditionally, c=64"]["ratio"] == 0.96  # against steered, not unsteered
    assert rows["p99 TTFT steered / unsteered, c=16"]["met"]
    assert not {b["budget"]: b for b in budgets(runs([90.0, 91.0, 100.0, 101.0]))}["steered (100%, distinct) / unsteered, c=64"]["met"]


def test_steering_checks_fail_a_run_that_did_not_steer():
    assert all(c["met"] for c in steering_checks(runs([100.0] * 4), differing=7, sampled=8))
    assert not steering_checks(runs([100.0] * 4), differing=3, sampled=8)[0]["met"]
    assert not steering_checks(runs([100.0] * 4, unechoed=1), differing=8, sampled=8)[1]["met"]


def test_the_report_is_written(tmp_path):
    checks = steering_checks(runs([100.0] * 4), 8, 8)
    summary = write_report(tmp_path, runs([100.0] * 4), {"cpu": "test"}, 1.0, checks)
    assert json.loads((tmp_path / "latest.json").read_text())["budgets"] == summary["budgets"]
    text = (tmp_path / "latest.md").read_text()
    assert "| steered (100%, distinct) / unsteered, c=64 | 1.0 | 1.0 | 1.0 | 4 |" in text and "## Steering happened" in text
    assert (tmp_path / "throughput_vs_concurrency.png").stat().st_size and (tmp_path / "overhead_vs_features.png").stat().st_size
