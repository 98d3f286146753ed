"""The worker's readout and monitors on small tensors: what the CPU op reads and where monitors
fire, per scope, against the SAE's own encode; and a stop forcing the request's stop token."""

from __future__ import annotations

import numpy as np
import torch

from steering.spec import ResolvedMonitor, ResolvedReadout
from steering.wire import READOUT_KEY, ReadoutRequest, WireResidual
from steering.worker import Steerer
from tests.helpers import Model
from tests.saes import D, make_sae

PROMPT = 5  # the request's prompt length


def _steerer(tmp_path, monitors: tuple[ResolvedMonitor, ...], readout: ResolvedReadout | None):
    sae = make_sae(tmp_path, "jumprelu", "none")
    sent = []
    steerer = Steerer(Model(), [("t", str(sae.path))], rows=3, width=2, max_num_tokens=16, device=torch.device("cpu"),
                      send=lambda to, batch: sent.append(batch))  # fmt: skip
    request = ReadoutRequest.of("r1", "ipc://nowhere", readout, monitors, stop_token=7)
    return sae, steerer, sent, {"a": {READOUT_KEY: request.model_dump_json()}}


def _step(steerer, args, computed: int, n: int, x: torch.Tensor) -> None:
    """One step: request "a" (after an unrelated 2-token one) with `n` tokens from position `computed`."""
    steerer.route(["b", "a"], np.array([2, n]), args.get, np.array([0, computed]), np.array([9, PROMPT]), np.arange(2 + n))
    steerer.hooks["t"](x[: 2 + n].clone(), torch.zeros(2 + n, D))
    steerer.flush()


def test_readout_and_monitors_read_the_stream_as_the_sae_encodes_it(tmp_path):
    readout = ResolvedReadout("t", 3, top_k=2, features=(4,), prompt=False, steered=())
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(0)) * 3
    sae = make_sae(tmp_path / "probe", "jumprelu", "none")
    f = sae.encode(x)
    index = int(f[2 : 2 + 8].gt(0).sum(0).argmax())  # a feature active somewhere in the request's tokens
    positions = [p for p in range(8) if f[2 + p, index] > 0]
    above = 0.0
    monitors = tuple(ResolvedMonitor("t", index, above, "flag", scope, "request") for scope in ("prompt", "completion", "all"))
    _, steerer, sent, args = _steerer(tmp_path / "sae", monitors, readout)
    _step(steerer, args, computed=0, n=8, x=x)  # the whole prompt and 3 answer tokens, in one step

    (batch,) = sent
    assert (batch.id, batch.req, batch.prompt_tokens) == ("r1", "a", PROMPT)
    assert [t[0] for t in batch.tokens] == [5, 6, 7], "prompt false: the answer's positions only"
    for position, token_id, top, listed, pre in batch.tokens:
        row = f[2 + position]
        assert token_id == 2 + position  # the step's input ids, in batch order
        assert [i for i, _ in top] == row.topk(2).indices.tolist()
        assert listed == [float(row[4])] and pre == []
    first = {"prompt": [p for p in positions if p < PROMPT], "completion": [p for p in positions if p >= PROMPT], "all": positions}
    fired = {n: position for n, position, _, _ in batch.fired}
    for n, monitor in enumerate(monitors):
        assert fired.get(n) == (first[monitor.scope][0] if first[monitor.scope] else None), monitor.scope
    assert not steerer.routing.stop, "flags stop nothing"


def test_a_stop_forces_the_stop_token_until_the_request_leaves(tmp_path):
    monitor = ResolvedMonitor("t", 0, -1.0, "stop", "completion", "request")  # fires on the first answer token
    _, steerer, sent, args = _steerer(tmp_path, (monitor,), None)
    x = torch.randn(16, D)
    _step(steerer, args, computed=0, n=PROMPT, x=x)  # the prompt: out of scope
    assert not steerer.routing.stop and not sent
    _step(steerer, args, computed=PROMPT, n=1, x=x)
    assert steerer.routing.stop == {"a"} and sent[-1].fired[0][:2] == (0, PROMPT)
    logits = torch.randn(2, 10)
    before = logits[0].clone()
    steerer.force_stops(["b", "a"], logits)
    assert torch.equal(logits[0], before), "the other request samples as it would"
    assert logits[1].argmax() == 7 and torch.isinf(logits[1]).sum() == 9
    steerer.release("a")
    assert not steerer.routing.stop and sent[-1].end


def test_a_residual_sum_counts_each_prompt_position_once_across_chunks_and_recompute(tmp_path):
    sae = make_sae(tmp_path, "jumprelu", "none")
    sent = []
    steerer = Steerer(Model(), [("t", str(sae.path))], rows=3, width=2, max_num_tokens=16, device=torch.device("cpu"),
                      send=lambda to, batch: sent.append(batch))  # fmt: skip
    request = ReadoutRequest(id="r1", to="ipc://nowhere", residual=WireResidual(sae="t", first=1))
    args = {"a": {READOUT_KEY: request.model_dump_json()}}
    stream = torch.randn(PROMPT + 1, D, generator=torch.Generator().manual_seed(1))  # the stream at each position

    def step(computed: int, n: int) -> None:
        x = torch.cat([torch.randn(2, D), stream[computed : computed + n]])
        half = x / 2  # hidden and residual: the stream is their sum
        steerer.route(["b", "a"], np.array([2, n]), args.get, np.array([0, computed]), np.array([9, PROMPT]), np.arange(2 + n))
        steerer.hooks["t"](half.clone(), half.clone())
        steerer.flush()

    step(0, 3)  # a chunk of the prompt
    step(3, 2)  # the rest
    step(0, PROMPT)  # preempted and recomputed: nothing new
    step(PROMPT, 1)  # an answer token: not the prompt's
    count = sum(b.residual[0] for b in sent if b.residual)
    total = sum(torch.tensor(b.residual[1]) for b in sent if b.residual)
    (last,) = [b.residual[2] for b in sent if b.residual and b.residual[2] is not None]
    assert count == PROMPT - 1
    assert torch.allclose(total, stream[1:PROMPT].sum(0), atol=1e-5)
    assert torch.allclose(torch.tensor(last), stream[PROMPT - 1], atol=1e-6)
