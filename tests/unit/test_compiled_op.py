"""The CPU op inside a compiled graph, as vLLM's CPU runner builds one: traced once by Dynamo with
a symbolic token count, compiled by inductor, then run step after step while the worker rewrites
the routing and the tables between steps (on GPU the gathered path runs instead: test_cuda_graph.py)."""

from __future__ import annotations

import numpy as np
import torch

from steering.hook import SMALL_SPAN
from steering.worker import Steerer
from tests.helpers import Model, request
from tests.saes import make_sae


def test_compiled_op_steers_as_eager_step_after_step(tmp_path):
    sae = make_sae(tmp_path, "topk", "constant_norm_rescale")
    model = Model()
    steerer = Steerer(model, [("t", str(sae.path))], rows=4, width=2, max_num_tokens=32, device=torch.device("cpu"))
    layer = model.layers[sae.cfg.layer]
    compiled = torch.compile(lambda h, r: layer(h, r), dynamic=True, fullgraph=True)
    reqs = {"a": request(sae, 1, prompt_scale=0.5), "b": request(sae, None), "c": request(sae, 7)}
    steps = [(["a"], [5]), (["b", "a", "c"], [3, 1, 6]), (["c", "b"], [1, 9]), (["b"], [2])]
    for step, (batch, tokens) in enumerate(steps):
        n = len(batch)
        steerer.hooks["t"].small_span = SMALL_SPAN * (step % 2)  # requests gathered together, or one by one
        steerer.route(batch, np.array(tokens), reqs.get, np.zeros(n, dtype=np.int64), np.full(n, 3))
        hidden, residual = torch.randn(sum(tokens), sae.cfg.d_in), torch.randn(sum(tokens), sae.cfg.d_in)
        eager, _ = layer(hidden.clone(), residual)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):  # one trace, any token count
            steered, _ = compiled(hidden.clone(), residual)
        assert torch.equal(steered, eager)
        assert torch.equal(steered, hidden) == (batch == ["b"])
