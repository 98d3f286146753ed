"""The API process's side of the readout: batches from the worker, however they arrive, become
each choice's positions exactly once, in order."""

from __future__ import annotations

import asyncio

from server import readout as readout_module
from server.readout import Collector
from steering.spec import ResolvedMonitor, ResolvedReadout
from steering.wire import ReadoutBatch

READ = ResolvedReadout(sae="s", layer=3, top_k=1, features=(7,), prompt=True, steered=(2,))


def _batch(req: str, positions: range, prompt_tokens: int = 3, value: float = 1.0, end: bool = False) -> ReadoutBatch:
    tokens = [(p, 100 + p, [(5, value)], [value * 2], [value * 3]) for p in positions]
    return ReadoutBatch(id="r", req=req, prompt_tokens=prompt_tokens, tokens=tokens, end=end)


def test_positions_once_in_order_across_recomputation_and_choices():
    collector = Collector(READ, (), choices=2, token_text=lambda t: f"<{t}>")
    collector.add(_batch("0_parent", range(0, 3)))  # choice 0 computes the shared prompt
    collector.add(_batch("0_parent", range(3, 5)))
    collector.add(_batch("1_parent", range(3, 4), value=9.0))  # choice 1's own first token
    collector.add(_batch("0_parent", range(2, 5)))  # preempted and recomputed: the same positions again
    first = collector.take(0)
    assert [e["position"] for e in first] == [0, 1, 2, 3, 4]
    assert first[3] == {
        "position": 3, "token": "<103>", "top": [{"index": 5, "activation": 1.0}],
        "features": {"7": 2.0}, "pre_activation": {"2": 3.0},
    }  # fmt: skip
    assert collector.take(0) == [], "taken entries are not given again"
    collector.add(_batch("0_parent", range(5, 6)))
    assert [e["position"] for e in collector.take(0)] == [5]
    second = collector.take(1)
    assert [e["position"] for e in second] == [0, 1, 2, 3], "the prompt is shared; position 3 is choice 1's own"
    assert second[3]["top"][0]["activation"] == 9.0


def test_complete_only_once_every_choice_has_ended(monkeypatch):
    monkeypatch.setattr(readout_module, "COMPLETION_TIMEOUT_S", 0.2)

    async def run() -> tuple[bool, bool, bool]:
        collector = Collector(READ, (), choices=2, token_text=str)
        collector.add(_batch("0_p", range(0), end=True))
        early = await collector.until_ended()  # choice 1 never ends: times out
        asyncio.get_running_loop().call_later(0.05, collector.add, _batch("1_p", range(0), end=True))
        return early, await collector.until_ended(0), await collector.until_ended()

    assert asyncio.run(run()) == (False, True, True)


def test_a_batch_crosses_the_wire_unchanged():
    batch = _batch("1_p", range(2, 4), end=True)
    batch.fired = [(0, 3, 103, 2.5)]
    back = ReadoutBatch.unpack(batch.pack())
    assert (back.id, back.req, back.prompt_tokens, back.end) == ("r", "1_p", 3, True)
    assert back.tokens == [[2, 102, [[5, 1.0]], [2.0], [3.0]], [3, 103, [[5, 1.0]], [2.0], [3.0]]]
    assert back.fired == [[0, 3, 103, 2.5]]
    monitor = ResolvedMonitor("s", 9, 1.0, "stop", "all", "request")
    collector = Collector(READ, (monitor,), choices=2, token_text=str)
    collector.add(back)  # as the API process reads it: lists where the worker wrote tuples
    assert [e["position"] for e in collector.take(1)] == [2, 3]
    choice = {"index": 1, "finish_reason": "stop"}
    collector.decorate(choice, [], final=True)
    assert choice["finish_reason"] == "content_filter" and choice["monitors"][0]["position"] == 3
