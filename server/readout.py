"""Readouts and monitors in the API process: where the worker's `ReadoutBatch`es arrive, and how
they join the response.

Each API process binds one ZeroMQ PULL socket (its address rides in every readout request it
sends) and reads it as messages come, so a slow client never holds the worker back: its entries
wait here. A request's `Collector` keeps each choice's entries by position, so a position read
twice (a preempted request recomputed) appears once, and knows a choice is complete when the
worker says its state is gone (every position the engine fed has been read by then).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import uuid
from collections.abc import Callable

import torch
import zmq
import zmq.asyncio

from core.vllm_internals import choice_of
from server import metrics
from steering.spec import ResolvedMonitor, ResolvedReadout
from steering.wire import ReadoutBatch

logger = logging.getLogger("steerserve.readout")
# How long a finished choice waits for the rest of its readout (the worker sends it as the
# request's state leaves, within a step or two of the last token).
COMPLETION_TIMEOUT_S = 30.0

Token = tuple[int, int, list[tuple[int, float]], list[float], list[float]]


class Collector:
    """One request's readout and monitor firings so far, per choice."""

    def __init__(
        self, readout: ResolvedReadout | None, monitors: tuple[ResolvedMonitor, ...], choices: int, token_text: Callable[[int], str]
    ):
        self.readout, self.monitors, self.choices, self._text = readout, monitors, choices, token_text
        self._fired: list[dict[int, tuple[int, int, float]]] = [{} for _ in range(choices)]  # monitor -> its first firing
        self._tokens: list[dict[int, Token]] = [{} for _ in range(choices)]
        self._prompt: dict[int, Token] = {}  # shared by the choices, whichever computed them
        self._ended = [False] * choices
        self._sent: list[set[int]] = [set() for _ in range(choices)]
        self._new = [False] * choices  # entries arrived that `take` has not given yet
        self._changed = asyncio.Event()

    def add(self, batch: ReadoutBatch) -> None:
        choice = choice_of(batch.req, self.choices)
        if batch.end:
            self._ended[choice] = True
        for token in batch.tokens:
            prompt = token[0] < batch.prompt_tokens
            (self._prompt if prompt else self._tokens[choice])[token[0]] = token
            for c in range(self.choices) if prompt else (choice,):
                self._new[c] = True
        fired = self._fired[choice]
        for n, position, token_id, value in batch.fired:
            if n not in fired:
                monitor = self.monitors[n]
                metrics.MONITOR_FIRINGS.labels(monitor.source, monitor.action).inc()
                logger.info("monitor %s/%d (%s, %s) fired at position %d", monitor.sae, monitor.index, monitor.source, monitor.action, position)
            if n not in fired or position < fired[n][0]:  # a recomputed position may report it again
                fired[n] = (position, token_id, value)
        self._changed.set()

    async def until_ended(self, choice: int | None = None) -> bool:
        """Wait until the choice's (or every choice's) readout is complete; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COMPLETION_TIMEOUT_S
        while not (self._ended[choice] if choice is not None else all(self._ended)):
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
            except TimeoutError:
                logger.warning("readout: incomplete after %.0f s", COMPLETION_TIMEOUT_S)
                return False
        return True

    @property
    def pending(self) -> bool:
        """Whether some choice has entries not yet taken."""
        return any(self._new)

    def take(self, choice: int) -> list[dict]:
        """The choice's entries not yet taken, in position order, as the response shows them."""
        self._new[choice] = False
        ready = {**self._prompt, **self._tokens[choice]}
        new = sorted(p for p in ready if p not in self._sent[choice])
        self._sent[choice].update(new)
        return [self._entry(ready[p]) for p in new]

    def decorate(self, choice: dict, tokens: list[dict], final: bool) -> None:
        """Add to a response's choice (or a stream event's) its readout entries `tokens` and, on
        its last, the monitors that fired; a stop monitor's firing makes it `content_filter`."""
        if self.readout is not None:
            choice["readout"] = {"sae": self.readout.sae, "layer": self.readout.layer, "tokens": tokens}
        if final and self.monitors:
            fired = sorted(self._fired[choice["index"]].items(), key=lambda item: item[1][0])
            choice["monitors"] = [
                {"sae": self.monitors[n].sae, "index": self.monitors[n].index, "position": position,
                 "token": self._text(token_id), "activation": value, "action": self.monitors[n].action}
                for n, (position, token_id, value) in fired
            ]  # fmt: skip
            if any(self.monitors[n].action == "stop" for n, _ in fired):
                choice["finish_reason"] = "content_filter"

    def _entry(self, token: Token) -> dict:
        position, token_id, top, listed, pre = token
        entry = {
            "position": position,
            "token": self._text(token_id),
            "top": [{"index": i, "activation": v} for i, v in top],
            "features": {str(i): v for i, v in zip(self.readout.features, listed)},
        }
        if self.readout.steered:
            entry["pre_activation"] = {str(i): v for i, v in zip(self.readout.steered, pre)}
        return entry


class ResidualSum:
    """One request's residual sum (`WireResidual`), as the worker's steps send it."""

    def __init__(self) -> None:
        self.count, self.total, self.last = 0, None, None
        self._ended = asyncio.Event()

    def add(self, batch: ReadoutBatch) -> None:
        if batch.residual is not None:
            count, total, last = batch.residual
            self.count += count
            self.total = torch.tensor(total) if self.total is None else self.total + torch.tensor(total)
            if last is not None:
                self.last = torch.tensor(last)
        if batch.end:
            self._ended.set()

    async def until_ended(self) -> bool:
        """Wait until the worker has sent all of it; False on timeout."""
        try:
            await asyncio.wait_for(self._ended.wait(), COMPLETION_TIMEOUT_S)
        except TimeoutError:
            return False
        return True


class ReadoutHub:
    """This API process's end of the readout channel."""

    def __init__(self) -> None:
        self.address = f"ipc://{tempfile.gettempdir()}/steerserve-readout-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._collectors: dict[str, Collector | ResidualSum] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.bind(self.address)
        self._task = asyncio.get_running_loop().create_task(self._receive(socket))

    async def _receive(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            batch = ReadoutBatch.unpack(await socket.recv())
            collector = self._collectors.get(batch.id)
            if collector is not None:  # else: its response has gone (finished, or the client left)
                collector.add(batch)

    def open(
        self, readout: ResolvedReadout | None, monitors: tuple[ResolvedMonitor, ...], choices: int, token_text: Callable[[int], str]
    ) -> tuple[str, Collector]:
        collector = Collector(readout, monitors, choices, token_text)
        return self.add(collector), collector

    def add(self, collector: Collector | ResidualSum) -> str:
        """Route the batches of a new readout id to `collector`; the id."""
        readout_id = uuid.uuid4().hex
        self._collectors[readout_id] = collector
        return readout_id

    def close(self, readout_id: str) -> None:
        self._collectors.pop(readout_id, None)
