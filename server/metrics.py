"""steerserve's Prometheus counters, served at /metrics beside vLLM's own."""

from __future__ import annotations

import re

from prometheus_client import Counter

REQUESTS = Counter(
    "steerserve_requests", "Completion requests admitted, by whether they steer and by preset", ["steered", "preset"]
)
POLICY_DENIALS = Counter("steerserve_policy_denials", "Requests refused by the access policy, by rule", ["rule"])
VALIDATION_ERRORS = Counter("steerserve_validation_errors", "Steering specs refused as invalid, by field", ["param"])
CAPACITY_REFUSALS = Counter("steerserve_capacity_refusals", "Steered requests refused because every slot was in use")
MONITOR_FIRINGS = Counter(
    "steerserve_monitor_firings", "Monitors that fired, by who attached them (request, preset:NAME, policy:KEY) and action",
    ["source", "action"],
)  # fmt: skip


def field_label(param: str) -> str:
    """`steering.features[3].index` -> `steering.features.index`: bounded label cardinality."""
    return re.sub(r"\[\d+\]", "", param)
