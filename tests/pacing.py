"""A vLLM logits processor that sets a floor under the engine's step time, for timing-bound tests.

A request that sends `vllm_xargs: {"pace_s": x}` makes every engine step that it is part of
last at least x seconds longer, for the whole batch. Decode speed varies several-fold between
machines and with their load; a request paced this way runs for at least max_tokens * x seconds
anywhere, which is what a test of the shutdown drain needs from the request that must outlast it.
"""

from __future__ import annotations

import time

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates


class Pacer(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.pace_of: dict[int, float] = {}  # batch row -> seconds added to each step it is in

    def is_argmax_invariant(self) -> bool:
        return False  # an argmax-invariant processor is skipped when every request is greedy

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.pace_of, batch_update, lambda params, _, __: (params.extra_args or {}).get("pace_s"))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.pace_of:
            time.sleep(max(self.pace_of.values()))
        return logits


def paced(pace_s: float) -> dict:
    """The request fields (extra_body) that pace a request's steps by `pace_s`; none for 0."""
    return {"vllm_xargs": {"pace_s": pace_s}} if pace_s else {}
