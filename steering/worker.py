"""Steering inside vLLM's worker: a `vllm.general_plugins` entry point.

Through core/vllm_internals.py it wraps three private methods of the V1 model runner, each at the
moment the data it needs exists:

- `load_model`: after the weights load and before torch.compile first traces the model,
  attach one `SAESteering` per SAE to its decoder layer (a hook added later would be
  silently missing from a compiled graph);
- `_prepare_inputs`: once the runner has updated and reordered its persistent batch for
  the step, give each new steered request a table row (from the spec it carries in
  `SamplingParams.extra_args`) and write the per-token index in place (each token's row, its
  weight: its request's prompt_scale on prompt tokens, and its generated index, which gates read),
  and the host-side spans (each steered request's row and token range) that the CPU op reads;
- `_on_request_state_removed`: free the row when the request finishes or is aborted;
- `execute_model`: after the step's forward, send what the CPU op read for requests that asked
  for a readout to the API process that asked (tensor-parallel rank 0 only), without blocking.

The same module carries a fix for vLLM's CPU runner: without it, a seeded request prefilled in
chunks kills the engine.

The plugin does nothing unless the engine was started with the steering settings in
`additional_config` (steering/wire.py), which is also part of vLLM's compile-cache hash: a graph
compiled without these hooks can never be reused by a steering server.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch
import zmq
from torch import nn

from core import vllm_internals
from features.formats import load_sae
from features.sae import SAE
from features.vectors import DirectionSAE
from steering import wire
from steering.hook import ReadoutSpan, SAESteering, StepRouting, TokenIndex, table_bytes
from steering.wire import CONFIG_KEY, READOUT_KEY, EngineSettings, ReadoutBatch, ReadoutRequest

logger = logging.getLogger("steerserve.worker")


class Steerer:
    """Per-worker steering state: the hooks, the token -> row index and weight, the step's spans,
    and the row allocator."""

    def __init__(
        self,
        model: nn.Module,
        saes: list[tuple[str, str]] | dict[str, SAE],
        rows: int,
        width: int,
        max_num_tokens: int,
        device: torch.device,
        send: Callable[[str, ReadoutBatch], None] | None = None,
    ):
        """`saes`: loaded, or (id, source) each (features/formats.py); `rows` table rows per SAE (row 0: unsteered); `width` features
        per SAE per request; `send(address, batch)` delivers a readout (None: on tensor-parallel
        ranks past 0, which watch as rank 0 does, so that all stop alike, but send nothing)."""
        self.rows = rows
        self._send = send
        self._readout_of_req: dict[str, ReadoutRequest | None] = {}
        self._computed_to: dict[str, int] = {}  # per reading request, the end of the positions computed so far
        self.index = TokenIndex.zeros(max_num_tokens, device)
        self.routing = StepRouting()
        self._routed = 0  # tokens written by the previous step; the rest of the index is already 0
        self._free = list(range(self.rows - 1, 0, -1))  # row 0 is "no steering"
        self._row_of_req: dict[str, int] = {}
        self._prompt_scale = np.ones(self.rows, dtype=np.float32)  # per row
        dtype = next(model.parameters()).dtype
        loaded = list(saes.values()) if isinstance(saes, dict) else [load_sae(sae_id, path) for sae_id, path in saes]
        check_table_memory(sum(table_bytes(sae, rows, _width(sae, width), dtype) for sae in loaded), rows, width, device)
        self.hooks: dict[str, SAESteering] = {}
        by_layer: dict[int, list[SAESteering]] = defaultdict(list)
        for sae in loaded:
            hook = SAESteering(sae, self.index, self.rows, _width(sae, width), dtype, self.routing)
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


    def release(self, req_id: str) -> None:
        row = self._row_of_req.pop(req_id, 0)
        if row:
            self._free.append(row)
        self.routing.stop.discard(req_id)
        readout = self._readout_of_req.pop(req_id, None)
        self._computed_to.pop(req_id, None)
        if readout is not None and self._send is not None:
            self._send(readout.to, ReadoutBatch(id=readout.id, req=req_id, end=True))

    def force_stops(self, req_ids: list[str], logits: torch.Tensor) -> None:
        """Make each stopped request's next token its stop token: logits [requests, vocab], one
        row per request in batch order."""
        for i, req_id in enumerate(req_ids):
            if req_id in self.routing.stop:
                stop_token = self._readout_of_req[req_id].stop_token  # type: ignore[union-attr]
                logits[i] = float("-inf")
                logits[i, stop_token] = 0.0

    def flush(self) -> None:
        """Send what the step read (after its forward)."""
        for hook in self.hooks.values():
            for batch in hook.read if self._send is not None else ():
                self._send(self._readout_of_req[batch.req].to, batch)  # type: ignore[union-attr]
            hook.read.clear()

    def route(
        self,
        req_ids: list[str],
        num_scheduled_tokens: np.ndarray,
        extra_args: Callable[[str], dict | None],
        num_computed: np.ndarray,
        num_prompt: np.ndarray,
        input_ids: np.ndarray | None = None,
    ) -> None:
        """Write this step's token -> row index, token weights and spans, in the runner's final batch order.

        `extra_args(req_id)` is a request's SamplingParams.extra_args, where its steering rides.
        `num_computed` and `num_prompt` give, per request in that order, the tokens computed
        before this step and the prompt's length: a token at position < num_prompt is the prompt's.
        `input_ids`, the step's input tokens, are reported with a readout.
        """
        rows = np.fromiter((self._row(r, extra_args) for r in req_ids), dtype=np.int64, count=len(req_ids))
        ends = np.cumsum(num_scheduled_tokens)
        self.routing.spans = [(int(rows[i]), int(ends[i] - num_scheduled_tokens[i]), int(ends[i])) for i in np.flatnonzero(rows)]
        self.routing.readout = self._readout_spans(req_ids, ends - num_scheduled_tokens, ends, extra_args, num_computed, num_prompt, input_ids)
        if not rows.any() and not self._routed:
            return  # nobody steers now or last step: the index is already all zeros
        n = int(num_scheduled_tokens.sum())
        token_rows = np.repeat(rows, num_scheduled_tokens)
        # Tokens past n keep stale weights and generated indices: their row is 0, whose delta is 0 whatever they are.
        slots = np.zeros(max(n, self._routed), dtype=np.int64)
        slots[:n] = token_rows
        # Each token's position minus its prompt's length: negative on the prompt.
        first = ends - num_scheduled_tokens  # each request's first token in the batch
        generated = np.repeat(num_computed - num_prompt - first, num_scheduled_tokens) + np.arange(n)
        _write(self.index.slot, slots)
        _write(self.index.generated, generated)
        # A token's delta multiplier: its row's prompt_scale where it is a prompt token, else 1.
        _write(self.index.weight, np.where(generated < 0, self._prompt_scale[token_rows], np.float32(1.0)).astype(np.float32))
        self._routed = n if rows.any() else 0

    def _readout_spans(
        self,
        req_ids: list[str],
        starts: np.ndarray,
        ends: np.ndarray,
        extra_args: Callable[[str], dict | None],
        num_computed: np.ndarray,
        num_prompt: np.ndarray,
        input_ids: np.ndarray | None,
    ) -> list[ReadoutSpan]:
        """Each request's tokens this step, where it reads or watches (the hooks choose which)."""
        spans = []
        for i, req_id in enumerate(req_ids):
            if req_id not in self._readout_of_req:
                encoded = (extra_args(req_id) or {}).get(READOUT_KEY)
                self._readout_of_req[req_id] = ReadoutRequest.model_validate_json(encoded) if encoded else None
            request = self._readout_of_req[req_id]
            if request is None:
                continue
            start, end, position = int(starts[i]), int(ends[i]), int(num_computed[i])
            if start < end:
                ids = input_ids[start:end].tolist() if input_ids is not None else [-1] * (end - start)
                fresh = self._computed_to.get(req_id, 0)
                self._computed_to[req_id] = max(fresh, position + end - start)
                spans.append(ReadoutSpan(req_id, request, start, end, position, ids, int(num_prompt[i]), fresh))
        return spans

    def _row(self, req_id: str, extra_args: Callable[[str], dict | None]) -> int:
        row = self._row_of_req.get(req_id)
        if row is None:
            encoded = (extra_args(req_id) or {}).get(CONFIG_KEY)
            row = self._assign(encoded) if encoded else 0
            self._row_of_req[req_id] = row
        return row

    def _assign(self, encoded: str) -> int:
        if not self._free:
            # The server admits fewer steered requests than there are rows; running out is a bug,
            # and running the request unsteered would be a silent wrong answer.
            raise RuntimeError("steerserve: steering table rows exhausted")
        row = self._free.pop()
        features, conditions, self._prompt_scale[row], vectors = wire.decode(encoded)
        by_sae: dict[str, list[tuple[int, float, float, wire.Gate, float]]] = defaultdict(list)
        for f in features:
            by_sae[f.sae].append((f.index, f.c0, f.c1, f.gate, f.bias))
        conditions_of: dict[str, list[tuple[int, int, float, bool]]] = defaultdict(list)
        for column, c in enumerate(conditions, start=1):
            conditions_of[c.sae].append((column, c.index, c.above, c.sticky))
        for sae_id, hook in self.hooks.items():
            hook.set_row(row, by_sae.get(sae_id, []), conditions_of.get(sae_id, []), vectors)
        return row


class ReadoutSender:
    """ZeroMQ PUSH sockets to the API processes that asked for readouts, one per address.

    Never blocks the engine loop: sends are non-blocking with no high-water mark, so a message
    waits in the socket's queue until the API process takes it (which it does as it arrives,
    whatever its clients read); a vanished API process's queue is dropped with the socket."""

    def __init__(self) -> None:
        self._context = zmq.Context.instance()
        self._sockets: dict[str, zmq.Socket] = {}

    def send(self, address: str, batch: ReadoutBatch) -> None:
        socket = self._sockets.get(address)
        if socket is None:
            socket = self._sockets[address] = self._context.socket(zmq.PUSH)
            socket.setsockopt(zmq.SNDHWM, 0)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(address)
        socket.send(batch.pack(), zmq.NOBLOCK)


def _write(target: torch.Tensor, values: np.ndarray) -> None:
    """Write values into the start of a persistent tensor, in place: directly on CPU, and on GPU
    through pinned memory, copied in stream order."""
    source = torch.from_numpy(values)
    if target.device.type == "cpu":
        target[: len(values)] = source
    else:
        target[: len(values)].copy_(source.pin_memory(), non_blocking=True)


def _width(sae: SAE, width: int) -> int:
    """Its table's features per row: `width`, or for a layer's steering vectors the slots a
    request can use there, where fewer."""
    return min(width, sae.slots) if isinstance(sae, DirectionSAE) else width


def check_table_memory(total: int, rows: int, width: int, device: torch.device) -> None:
    """Log what the steering tables take, and refuse to start if they would not fit in what the
    device has free (a worker that began allocating them would die part-way, or starve the KV cache)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    mib = total / 2**20
    if total > free:
        raise RuntimeError(
            f"steerserve: the steering tables need {mib:.0f} MiB ({rows} rows x {width} features per SAE), more than "
            f"the {free / 2**20:.0f} MiB free on {device}. Lower --max-features-per-sae (features per row), or "
            "--max-steered-requests or --max-num-seqs (rows = 1 + the two)."
        )
    logger.info("steering tables: %.1f MiB on %s (%d rows x %d features per SAE)", mib, device, rows, width)


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


def _on_load(runner: Any) -> None:
    settings = EngineSettings.from_additional_config(vllm_internals.additional_config(runner))
    runner._steerer = None
    if settings is not None:
        send = ReadoutSender().send if vllm_internals.tensor_parallel_rank() == 0 else None
        runner._steerer = Steerer(runner.model, settings.load_saes(), settings.rows, settings.width, runner.max_num_tokens, runner.device, send)


def _on_prepared(runner: Any, num_scheduled_tokens: np.ndarray) -> None:
    steerer = getattr(runner, "_steerer", None)
    if steerer is not None:
        batch = vllm_internals.step_batch(runner, int(num_scheduled_tokens.sum()))
        extra_args = functools.partial(vllm_internals.request_extra_args, runner)
        steerer.route(batch.req_ids, num_scheduled_tokens, extra_args, batch.num_computed, batch.num_prompt, batch.input_ids)


def _before_sampling(runner: Any, logits: torch.Tensor | None) -> None:
    steerer = getattr(runner, "_steerer", None)
    if steerer is not None and steerer.routing.stop and logits is not None:
        steerer.force_stops(vllm_internals.step_batch(runner, 0).req_ids, logits)


def _on_executed(runner: Any) -> None:
    steerer = getattr(runner, "_steerer", None)
    if steerer is not None:
        steerer.flush()


def _on_removed(runner: Any, req_id: str) -> None:
    steerer = getattr(runner, "_steerer", None)
    if steerer is not None:
        steerer.release(req_id)


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
    _configure_logging()
    vllm_internals.patch_model_runners(_on_load, _on_prepared, _on_removed, _on_executed, _before_sampling)
