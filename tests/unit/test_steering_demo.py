"""The effect benchmark's rule for the settings it chooses on the pilot (benchmarks/steering_demo.py):
an earlier demo chose on the prompts it reported on; the rule itself is checked here on made-up rows."""

from __future__ import annotations

from benchmarks.steering_demo import PILOT_PROMPTS, PROMPTS, choose


def row(keyword_rate: float, median_perplexity: float) -> dict:
    return {"keyword_rate": keyword_rate, "median_perplexity": median_perplexity}


def test_the_most_mentions_within_the_budget():
    pilot = [row(0.0, 4.0), row(0.5, 8.0), row(0.9, 10.5), row(0.7, 10.0), row(0.7, 9.0)]
    assert choose(pilot, 2.5) == (4, True)  # 0.9 is past 2.5 x 4.0; of the two at 0.7, the less perplexing
    assert choose(pilot, 3.0) == (2, True)


def test_the_unsteered_row_is_never_chosen():
    assert choose([row(0.1, 4.0), row(0.0, 5.0)]) == (1, True)


def test_with_no_fluent_setting_the_least_perplexing_and_said_so():
    assert choose([row(0.0, 2.0), row(1.0, 9.0), row(0.5, 7.0)]) == (2, False)


def test_pilot_and_evaluation_prompts_are_disjoint():
    assert not set(PILOT_PROMPTS) & set(PROMPTS)
    assert len(set(PILOT_PROMPTS)) == len(PILOT_PROMPTS) and len(set(PROMPTS)) == len(PROMPTS)
