"""The steering demo's rule for the setting it evaluates (benchmarks/steering_demo.py): it once
chose on the prompts it reported on; the rule itself is checked here on made-up pilot rows."""

from __future__ import annotations

from benchmarks.steering_demo import PILOT_PROMPTS, PROMPTS, choose


def row(keyword_rate: float, median_perplexity: float) -> dict:
    return {"keyword_rate": keyword_rate, "median_perplexity": median_perplexity}


def test_the_most_mentions_within_three_times_unsteered_perplexity():
    pilot = [row(0.0, 4.0), row(0.5, 8.0), row(0.9, 12.5), row(0.7, 12.0), row(0.7, 9.0)]
    assert choose(pilot) == (4, True)  # 0.9 is past 3 x 4.0; of the two at 0.7, the less perplexing


def test_the_unsteered_row_is_never_chosen():
    assert choose([row(0.1, 4.0), row(0.0, 5.0)]) == (1, True)


def test_with_no_fluent_setting_the_least_perplexing_and_said_so():
    assert choose([row(0.0, 2.0), row(1.0, 9.0), row(0.5, 7.0)]) == (2, False)


def test_pilot_and_evaluation_prompts_are_disjoint():
    assert not set(PILOT_PROMPTS) & set(PROMPTS)
    assert len(set(PILOT_PROMPTS)) == len(PILOT_PROMPTS) and len(set(PROMPTS)) == len(PROMPTS)
