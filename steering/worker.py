"""Steering inside vLLM's worker: a `vllm.general_plugins` entry point.

It wraps three methods of the V1 model runner, each at the moment the data it needs exists:

- `load_model`: after the weights load and before torch.compile first traces the model,
  attach one `SAESteering` per SAE to its decoder layer (a hook added later would be
  silently missing from a compiled graph);
- `_prepare_inputs`: once the runner has updated and reordered its persistent batch for
  the step, give each new steered request a table row (from the spec it carries in
  `SamplingParams.extra_args`) and write the token -> row index, and each token's weight
  (its request's prompt_scale on prompt tokens), in place;
- `_on_request_state_removed`: free the row when the request finishes or is aborted.

It also carries a fix for vLLM's CPU runner (`steering.seeded_sampling`): without it, a seeded
request prefilled in chunks kills the engine.

The plugin does nothing unless the engine was started with the steering config in
`additional_config`, which is also part of vLLM's compile-cache hash: a graph compiled
without these hooks can never be reused by a steering server.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn

from features.sae import load_sae
from steering import seeded_sampling
from steering.hook import SAESteering
from steering.spec import parse_wire

logger = logging.getLogger("steerserve.worker")

CONFIG_KEY = "steerserve"  # key in vllm_config.additional_config and in SamplingParams.extra_args


class Steerer:
    """Per-worker steering state: the hooks, the token -> row index and weight, and the row allocator."""

    def __init__(self, model: nn.Module, config: dict[str, Any], max_num_tokens: int, device: torch.device):
        self.rows = int(config["rows"])
        self.slot_of_token = torch.zeros(max_num_tokens, dtype=torch.long, device=device)
        self.weight_of_token = torch.ones(max_num_tokens, dtype=torch.float32, device=device)
        self._routed = 0  # tokens written by the previous step; the rest of the index is already 0
        self._free = list(range(self.rows - 1, 0, -1))  # row 0 is "no steering"
        self._row_of_req: dict[str, int] = {}
        self._prompt_scale = np.ones(self.rows, dtype=np.float32)  # per row
        dtype = next(model.parameters()).dtype
        self.hooks: dict[str, SAESteering] = {}
        by_layer: dict[int, list[SAESteering]] = defaultdict(list)
        for entry in config["saes"]:
            sae = load_sae(entry["id"], entry["path"])
            hook = SAESteering(sae, self.slot_of_token, self.rows, int(config["width"]), dtype, self.weight_of_token)
            self.hooks[sae.id] = hook
            by_layer[sae.cfg.layer].append(hook)
        layers = decoder_layers(model)
        for layer_index, hooks in by_layer.items():
            layer = layers[layer_index]
            if type(layer).__name__ == "PPMissingLayer":
                continue  # this pipeline rank does not own the layer; the rank that does steers it
            for n, hook in enumerate(hooks):
                layer.add_module(f"steerserve_{n}", hook)  # inside the model tree, so it is traced
            layer.register_forward_hook(functools.partial(_steer_layer_output, tuple(hooks)))
        logger.info("steering %d SAE(s) with %d table rows", len(self.hooks), self.rows)

    def release(self, req_id: str) -> None:
        row = self._row_of_req.pop(req_id, 0)
        if row:
            self._free.append(row)

    def route(
        self,
        req_ids: list[str],
        num_scheduled_tokens: np.ndarray,
        requests: dict[str, Any],
        num_computed: np.ndarray,
        num_prompt: np.ndarray,
    ) -> None:
        """Write this step's token -> row index and token weights, in the runner's final batch order.

        `num_computed` and `num_prompt` give, per request in that order, the tokens computed
        before this step and the prompt's length: a token at position < num_prompt is the prompt's.
        """
        rows = np.fromiter((self._row(r, requests) for r in req_ids), dtype=np.int64, count=len(req_ids))
        if not rows.any() and not self._routed:
            return  # nobody steers now or last step: the index is already all zeros
        n = int(num_scheduled_tokens.sum())
        token_rows = np.repeat(rows, num_scheduled_tokens)
        # Tokens past n keep stale weights: their row is 0, whose delta is 0 whatever its weight.
        slots = np.zeros(max(n, self._routed), dtype=np.int64)
        slots[:n] = token_rows
        _write(self.slot_of_token, slots)
        _write(self.weight_of_token, self._weights(token_rows, num_scheduled_tokens, num_computed, num_prompt))
        self._routed = n if rows.any() else 0

    def _weights(
        self, token_rows: np.ndarray, num_scheduled_tokens: np.ndarray, num_computed: np.ndarray, num_prompt: np.ndarray
    ) -> np.ndarray:
        """Each token's delta multiplier: its row's prompt_scale where it is a prompt token, else 1."""
        first = np.cumsum(num_scheduled_tokens) - num_scheduled_tokens  # each request's first token in the batch
        positions = np.repeat(num_computed - first, num_scheduled_tokens) + np.arange(len(token_rows))
        in_prompt = positions < np.repeat(num_prompt, num_scheduled_tokens)
        return np.where(in_prompt, self._prompt_scale[token_rows], np.float32(1.0)).astype(np.float32)

    def _row(self, req_id: str, requests: dict[str, Any]) -> int:
        row = self._row_of_req.get(req_id)
        if row is None:
            params = requests[req_id].sampling_params
            wire = (params.extra_args or {}).get(CONFIG_KEY) if params is not None else None
            row = self._assign(wire) if wire else 0
            self._row_of_req[req_id] = row
        return row

    def _assign(self, wire: str) -> int:
        if not self._free:
            # The server admits fewer steered requests than there are rows; running out is a bug,
            # and running the request unsteered would be a silent wrong answer.
            raise RuntimeError("steerserve: steering table rows exhausted")
        row = self._free.pop()
        features, self._prompt_scale[row] = parse_wire(wire)
        by_sae: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for sae_id, index, c0, c1 in features:
            by_sae[sae_id].append((index, c0, c1))
        for sae_id, hook in self.hooks.items():
            hook.set_row(row, by_sae.get(sae_id, []))
        return row


def _write(target: torch.Tensor, values: np.ndarray) -> None:
    """Write values into the start of a persistent tensor, in place: directly on CPU, and on GPU
    through pinned memory, copied in stream order."""
    source = torch.from_numpy(values)
    if target.device.type == "cpu":
        target[: len(values)] = source
    else:
        target[: len(values)].copy_(source.pin_memory(), non_blocking=True)


def _steer_layer_output(hooks: tuple[SAESteering, ...], module: nn.Module, args: Any, output: Any) -> Any:
    hidden, residual = output
    for hook in hooks:
        hidden, residual = hook(hidden, residual)
    return hidden, residual


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (`model.layers` in vLLM's Llama-style models)."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"steerserve: no decoder layer stack found in {type(model).__name__}")


def _wrap_load_model(original):
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        config = (self.vllm_config.additional_config or {}).get(CONFIG_KEY)
        self._steerer = Steerer(self.model, config, self.max_num_tokens, self.device) if config else None

    return load_model


def _wrap_prepare_inputs(original):
    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        if getattr(self, "_steerer", None) is not None:
            batch = self.input_batch
            n = batch.num_reqs
            self._steerer.route(
                batch.req_ids, num_scheduled_tokens, self.requests,
                batch.num_computed_tokens_cpu[:n], batch.num_prompt_tokens[:n],
            )  # fmt: skip
        return result

    return _prepare_inputs


def _wrap_state_removed(original):
    @functools.wraps(original)
    def _on_request_state_removed(self, req_id, req_state):
        if getattr(self, "_steerer", None) is not None:
            self._steerer.release(req_id)
        return original(self, req_id, req_state)

    return _on_request_state_removed


def _configure_logging() -> None:
    """steerserve's loggers print INFO in every vLLM process, in vLLM's own style."""
    root = logging.getLogger("steerserve")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def register() -> None:
    """Entry point: patch the V1 model runners (idempotent; vLLM calls it in every process)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _configure_logging()
    runners: list[type] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in runners:
        if cls.__dict__.get("_steerserve_patched"):
            continue
        if "load_model" in cls.__dict__:
            cls.load_model = _wrap_load_model(cls.__dict__["load_model"])
        if cls is GPUModelRunner:
            cls._prepare_inputs = _wrap_prepare_inputs(cls._prepare_inputs)
            cls._on_request_state_removed = _wrap_state_removed(cls._on_request_state_removed)
            seeded_sampling.patch(cls)
        cls._steerserve_patched = True
