"""Gated steering at the op: windows and `when` conditions (token and sticky), over two steps,
by the CPU op (each span alone, and gathered) and the gathered path, against the rule written
out token by token with the reference's own SAE math (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch

from steering.hook import SAESteering, TokenIndex
from steering.wire import OPEN, Gate
from tests.helpers import route
from tests.reference import Intervention, _activations, steered_residual
from tests.saes import ROWS, make_sae

D = 576
# Per request: its table row, its features (index, strength, gate), its conditions (column, index, sticky).
REQUESTS = {
    1: ([(0, 2.0, Gate(when=1)), (1, -1.5, Gate(when=2, after_n=1)), (2, 1.0, Gate(prompt=False, first_n=3))],
        [(1, 5, False), (2, 6, True)]),
    2: ([(3, 1.0, Gate(when=1, prompt=False)), (4, 3.0, OPEN)], [(1, 5, True)]),
    3: ([(5, 1.0, Gate(after_n=2))], []),  # a window alone
    4: ([(7, 1.0, OPEN), (8, -2.0, OPEN), (9, 1.5, OPEN)], []),  # ungated, as many slots as row 2: gathered with it
}  # fmt: skip
# Two steps, as (row, generated index of each token): a prompt prefilled in two chunks then decoding,
# requests decoding, and an unsteered one (row 0) in between.
STEPS = [
    [(1, range(-4, 0)), (0, range(2)), (2, range(0, 3)), (3, range(-2, 3)), (4, range(-1, 1))],
    [(1, range(0, 3)), (0, range(2, 3)), (2, range(3, 5)), (4, range(1, 2)), (3, range(3, 4))],
]


def _thresholds(sae, x: torch.Tensor) -> dict[int, float]:
    """Each condition's threshold: midway between two middle values of its feature over the tokens,
    so it holds on some and not others, and no value sits within rounding of it."""
    f, _ = _activations(sae, x)
    thresholds = {}
    for index in (5, 6):
        values = f[:, index].unique()  # sorted
        middle = max(1, len(values) // 2)
        thresholds[index] = float(values[middle - 1] + values[middle]) / 2
    return thresholds


def _expected(sae, x: torch.Tensor, steps: list, thresholds: dict[int, float]) -> list[torch.Tensor]:
    """Each step's stream with the rule applied token by token."""
    f, _ = _activations(sae, torch.cat(x))
    f_of_step = list(torch.split(f, [len(s) for s in x]))
    first_firing: dict[tuple[int, int], float] = {}  # (row, condition feature) -> generated index
    out = []
    for step, xs, fs in zip(steps, x, f_of_step):
        expected, t = xs.clone(), 0
        for row, generated in step:
            tokens = list(range(t, t + len(generated)))
            t += len(generated)
            if not row:
                continue
            features, conditions = REQUESTS[row]
            holds = {}
            for column, index, sticky in conditions:
                fired = [g for g, tok in zip(generated, tokens) if fs[tok, index] > thresholds[index]]
                key = (row, index)
                first_firing[key] = min([first_firing.get(key, float("inf")), *fired])
                holds[column] = [
                    (first_firing[key] <= g) if sticky else bool(fs[tok, index] > thresholds[index]) for g, tok in zip(generated, tokens)
                ]  # fmt: skip
            for index, strength, gate in features:
                delta = steered_residual(xs[tokens], [Intervention(sae, index, "add", strength)]) - xs[tokens]
                for n, g in enumerate(generated):
                    in_window = gate.prompt if g < 0 else gate.after_n <= g < (gate.first_n if gate.first_n is not None else 10**9)
                    if in_window and (gate.when == 0 or holds[gate.when][n]):
                        expected[tokens[n]] += delta[n]
        out.append(expected)
    return out


@pytest.mark.parametrize("architecture", ["jumprelu", "standard"])
@pytest.mark.parametrize("path", ["CPU op, each span alone", "CPU op, gathered", "gathered path"])
def test_gates_follow_the_rule(tmp_path, architecture, path):
    sae = make_sae(tmp_path, architecture, "none", d_in=D)
    x = [torch.randn(sum(len(g) for _, g in step), D, generator=torch.Generator().manual_seed(s)) * 3 for s, step in enumerate(STEPS)]
    thresholds = _thresholds(sae, torch.cat(x))
    hook = SAESteering(sae, TokenIndex.zeros(64), ROWS, 8, torch.float32)
    hook.small_span = 0 if path == "CPU op, each span alone" else 10**9
    for row, (features, conditions) in REQUESTS.items():
        hook.set_row(row, [(i, s, 0.0, gate) for i, s, gate in features], [(c, i, thresholds[i], sticky) for c, i, sticky in conditions])
    expected = _expected(sae, x, STEPS, thresholds)
    for step, xs, want in zip(STEPS, x, expected):
        spans, t = [], 0
        for row, generated in step:
            hook.index.generated[t : t + len(generated)] = torch.tensor(list(generated))
            if row:
                spans.append((row, t, t + len(generated)))
            t += len(generated)
        route(hook, spans)
        if path == "gathered path":
            got = xs + hook.delta(xs)
        else:
            got, _ = hook(xs.clone(), torch.zeros_like(xs))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(expected[0], x[0] + sum(
        steered_residual(x[0], [Intervention(sae, i, "add", s)]) - x[0] for f, _ in REQUESTS.values() for i, s, _ in f
    )), "the gates must close somewhere, or this test could not tell gated from ungated steering"  # fmt: skip


def test_a_condition_read_at_an_earlier_hook_gates_a_later_one(tmp_path):
    """Hooks share the token index: an earlier layer's hook writes the condition's gate column,
    a later one's feature reads it; a row reassigned starts with its sticky state cleared."""
    early, late = (make_sae(tmp_path, "jumprelu", "none", seed=s, d_in=D, layer=layer) for s, layer in ((1, 1), (2, 3)))
    index = TokenIndex.zeros(16)
    hooks = [SAESteering(sae, index, ROWS, 8, torch.float32) for sae in (early, late)]
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(0)) * 3
    f_early, _ = _activations(early, x)
    values = f_early[:, 5].unique()
    above = float(values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    index.generated[:8] = torch.arange(8)
    for sticky in (False, True):
        hooks[0].set_row(1, [], [(1, 5, above, sticky)])
        hooks[1].set_row(1, [(2, 4.0, 0.0, Gate(when=1))])
        for hook in hooks:
            route(hook, [(1, 0, 8)])
        h, _ = hooks[0](x.clone(), torch.zeros_like(x))
        assert torch.equal(h, x), "a condition alone steers nothing"
        got, _ = hooks[1](h, torch.zeros_like(x))
        holds = f_early[:, 5] > above
        if sticky:
            holds = holds.cumsum(0) > 0
        delta = steered_residual(x, [Intervention(late, 2, "add", 4.0)]) - x
        torch.testing.assert_close(got, x + holds[:, None] * delta, rtol=1e-4, atol=1e-4)
        assert 0 < int(holds.sum()) < 8


def test_compiled_gathered_path_keeps_its_gate_state(tmp_path):
    """The gathered path (what a GPU runs), traced once by Dynamo with a symbolic token count and
    compiled by inductor, step after step: the same steering and the same sticky state as eager.
    Its gates write the shared index and the hook's state in place, which a compiled graph must keep."""
    sae = make_sae(tmp_path, "jumprelu", "none", d_in=D)
    hooks = [SAESteering(sae, TokenIndex.zeros(64), ROWS, 8, torch.float32) for _ in range(2)]
    x = [torch.randn(sum(len(g) for _, g in step), D, generator=torch.Generator().manual_seed(s)) * 3 for s, step in enumerate(STEPS)]
    thresholds = _thresholds(sae, torch.cat(x))
    for hook in hooks:
        for row, (features, conditions) in REQUESTS.items():
            hook.set_row(row, [(i, s, 0.0, gate) for i, s, gate in features], [(c, i, thresholds[i], sticky) for c, i, sticky in conditions])
    compiled = torch.compile(lambda x: hooks[1].delta(x), dynamic=True, fullgraph=True)
    for step, xs in zip(STEPS, x):
        for hook in hooks:
            spans, t = [], 0
            for row, generated in step:
                hook.index.generated[t : t + len(generated)] = torch.tensor(list(generated))
                spans.append((row, t, t + len(generated)))
                t += len(generated)
            route(hook, [s for s in spans if s[0]])
        eager = hooks[0].delta(xs)
        torch.testing.assert_close(compiled(xs), eager, rtol=1e-5, atol=1e-5)
        assert torch.equal(hooks[1].fired, hooks[0].fired)
        assert torch.equal(hooks[1].index.gate[: len(xs)], hooks[0].index.gate[: len(xs)])
    assert (hooks[1].fired < float("inf")).any(), "some sticky condition fired"
