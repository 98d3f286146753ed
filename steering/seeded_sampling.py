"""A fix for vLLM 0.32 on CPU: a request with a `seed` that is prefilled in chunks kills the engine.

When a step only prefills part of a prompt, the token it samples is discarded, and the runner's
`_bookkeeping_sync` rewinds that request's generator with `set_offset`, which only CUDA
generators have: a CPU generator raises, and the exception ends the engine for every request.
Here the CPU generators of such requests are saved before sampling and restored after it, and
kept out of the rewind, so the seeded stream is exactly as if the discarded draw never happened.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def _discarded_cpu_generators(runner) -> dict[int, torch.Generator]:
    num_reqs = runner.input_batch.num_reqs
    generators = runner.input_batch.generators
    found = {}
    for i in np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]:
        generator = generators.get(int(i))
        if generator is not None and generator.device.type == "cpu":
            found[int(i)] = generator
    return found


def _wrap_sample(original):
    @functools.wraps(original)
    def _sample(self, *args, **kwargs):
        saved = [(g, g.get_state()) for g in _discarded_cpu_generators(self).values()]
        output = original(self, *args, **kwargs)
        for generator, state in saved:
            generator.set_state(state)
        return output

    return _sample


def _wrap_bookkeeping_sync(original):
    @functools.wraps(original)
    def _bookkeeping_sync(self, *args, **kwargs):
        hidden = _discarded_cpu_generators(self)
        generators = self.input_batch.generators
        for i in hidden:
            del generators[i]
        try:
            return original(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    return _bookkeeping_sync


def patch(runner_cls: type) -> None:
    runner_cls._sample = _wrap_sample(runner_cls._sample)
    runner_cls._bookkeeping_sync = _wrap_bookkeeping_sync(runner_cls._bookkeeping_sync)
