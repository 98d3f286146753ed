"""The hook's ops captured in a CUDA graph keep steering correctly as the tables change in place.

vLLM captures decode steps in CUDA graphs on GPUs; the graph is replayed with whatever the
tables hold at replay time. This needs a CUDA device (the `device` tool's GPU machine), and is
skipped where there is none: CPU CI runs the same ops in vLLM's compiled mode instead.
"""

from __future__ import annotations

import pytest
import torch

from steering.hook import SAESteering
from tests.test_hook_math import ROWS, WIDTH, make_sae

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("architecture", ["jumprelu", "topk", "standard"])
def test_graph_replay_follows_tables(tmp_path, architecture):
    device = torch.device("cuda")
    sae = make_sae(tmp_path, architecture, "constant_norm_rescale")
    slots = torch.zeros(16, dtype=torch.long, device=device)
    hook = SAESteering(sae, slots, ROWS, WIDTH, torch.float32)  # tables live where `slots` does
    hidden = torch.randn(16, sae.cfg.d_in, device=device)
    residual = torch.randn(16, sae.cfg.d_in, device=device)

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
        hidden.copy_(torch.randn_like(hidden))
        graph.replay()
        eager, _ = hook(hidden, residual)
        torch.testing.assert_close(captured, eager)
        assert not torch.equal(captured, hidden), "the replay steered nothing"
