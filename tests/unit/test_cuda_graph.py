"""The hook's ops captured in a CUDA graph keep steering correctly as the tables change in place.

vLLM captures decode steps in CUDA graphs on GPUs; the graph is replayed with whatever the
tables hold at replay time. This needs a CUDA device (the `device` tool's GPU machine), and is
skipped where there is none: CPU CI runs the same ops in vLLM's compiled mode instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steering.hook import SAESteering, TokenIndex
from steering.worker import Steerer
from tests.helpers import Model, request
from tests.saes import ROWS, WIDTH, make_sae

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the exact path; the Triton fast path
@pytest.mark.parametrize("architecture", ["jumprelu", "topk", "standard"])
def test_graph_replay_follows_tables(tmp_path, architecture, dtype):
    device = torch.device("cuda")
    sae = make_sae(tmp_path, architecture, "constant_norm_rescale")
    index = TokenIndex.zeros(16, device)
    slots, weights = index.slot, index.weight
    hook = SAESteering(sae, index, ROWS, WIDTH, dtype)  # tables live where the index does
    hidden = torch.randn(16, sae.cfg.d_in, device=device, dtype=dtype)
    residual = torch.randn(16, sae.cfg.d_in, device=device, dtype=dtype)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the graph, as vLLM does
            hook(hidden, residual)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = hook(hidden, residual)

    for step in range(4):  # new requests, new rows, new routing, new inputs: all in place
        hook.set_row(1 + step % (ROWS - 1), [(step, 3.0 + step, -1.0), (step + 5, 0.0, 0.5)])
        slots.copy_(torch.randint(0, ROWS, (16,), generator=torch.Generator().manual_seed(step)).to(device))
        weights.copy_(torch.rand(16, generator=torch.Generator().manual_seed(step)).to(device) * 3)
        hidden.copy_(torch.randn_like(hidden))
        graph.replay()
        eager, _ = hook(hidden, residual)
        torch.testing.assert_close(captured, eager)
        assert not torch.equal(captured, hidden), "the replay steered nothing"


def test_steerer_writes_routing_onto_the_device(tmp_path):
    """The runner's per-step routing, staged in pinned memory, lands in the GPU tensors the graph reads."""
    sae = make_sae(tmp_path, "jumprelu", "none")
    steerer = Steerer(Model(), [("t", str(sae.path))], rows=3, width=2, max_num_tokens=16, device=torch.device("cuda"))
    reqs = {"a": request(sae, 1, prompt_scale=0.5), "b": request(sae, None)}
    for step in range(3):  # b decodes; a's 3-token prompt, then its first generated tokens
        steerer.route(["b", "a"], np.array([2, 4]), reqs.get, np.array([7 + step, step]), np.array([3, 3]))
        torch.cuda.synchronize()
        row = int(steerer.index.slot[2])
        assert row > 0 and steerer.index.slot[:6].tolist() == [0, 0, row, row, row, row]
        expected = [1.0, 1.0] + [0.5 if step + t < 3 else 1.0 for t in range(4)]
        assert steerer.index.weight[:6].tolist() == expected
