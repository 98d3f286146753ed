"""The table-fed hook against the independent reference, on small tensors (no engine)."""

from __future__ import annotations

import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.op import peak_transient_bytes
from steering.hook import MAX_DELTA, SAESteering, TokenIndex
from tests.helpers import assert_hook_matches_reference, mixed_batches, route, token_weights
from tests.saes import D_SAE, ROWS, WIDTH, D, make_sae


@settings(max_examples=60, deadline=None)
@given(
    architecture=st.sampled_from(["standard", "jumprelu", "topk"]),
    normalize=st.sampled_from(["none", "constant_norm_rescale", "expected_average_only_in"]),
    requests=mixed_batches,
    seed=st.integers(0, 3),
    weights=token_weights,
)
def test_hook_matches_reference(tmp_path_factory, architecture, normalize, requests, seed, weights):
    """Each token's weight (a request's prompt_scale on its prompt tokens) multiplies its delta."""
    sae = make_sae(tmp_path_factory.mktemp("sae"), architecture, normalize, seed)
    assert_hook_matches_reference(sae, requests, weights, seed)


# Requests laid out as vLLM's batch has them: each (unsteered tokens before it, its tokens, its
# features (index, c0, c1) in this SAE; none when it steers only other SAEs).
coefficients = st.tuples(st.integers(0, D_SAE - 1), st.floats(-5, 5, width=32), st.sampled_from([0.0, -1.0, 0.5, 2.0]))
span_batches = st.lists(
    st.tuples(st.integers(0, 4), st.integers(1, 9), st.lists(coefficients, max_size=WIDTH, unique_by=lambda f: f[0])),
    min_size=1,
    max_size=ROWS - 1,
)


# A step for the CPU op: every architecture and normalisation, its chunk size and how small a
# span must be to be gathered with others (none, some, all), token weights.
op_steps = {
    "architecture": st.sampled_from(["standard", "jumprelu", "topk"]),
    "normalize": st.sampled_from(["none", "constant_norm_rescale", "expected_average_only_in"]),
    "requests": span_batches,
    "tail": st.integers(0, 4),
    "chunk": st.integers(1, 8),
    "small_span": st.sampled_from([0, 2 * D, 8 * D, 10**9]),
    "seed": st.integers(0, 3),
    "weights": token_weights,
}


def _op_step(path, architecture, normalize, requests, tail, chunk, small_span, seed, weights):
    """A hook with each request in a row of its own, routed as laid out, and the step's hidden and
    residual: (hook, spans, hidden, residual)."""
    sae = make_sae(path, architecture, normalize, seed)
    hook = SAESteering(sae, TokenIndex.zeros(64, weight=torch.tensor(weights)), ROWS, WIDTH, torch.float32)
    hook.chunk, hook.small_span = chunk, small_span
    spans, end = [], 0
    for row, (gap, tokens, features) in enumerate(requests, start=1):
        hook.set_row(row, features)
        spans.append((row, end + gap, end + gap + tokens))
        end += gap + tokens
    route(hook, spans)
    g = torch.Generator().manual_seed(seed)
    return hook, spans, torch.randn(end + tail, D, generator=g) * 3, torch.randn(end + tail, D, generator=g) * 3


@settings(max_examples=80, deadline=None)
@given(**op_steps)
def test_cpu_op_equals_the_gathered_path(tmp_path_factory, **step):
    """The CPU op, request by request in chunks (small spans gathered together), against the
    gathered path (what a GPU runs) on the same mixed batch: every token within 2e-6 of its own
    largest magnitude (|x| or |delta|, a few float32 roundings: the two contract the same sums in
    different orders), unsteered tokens bit for bit."""
    hook, _, hidden, residual = _op_step(tmp_path_factory.mktemp("sae"), **step)
    gathered = hidden + hook.delta(hidden + residual)
    out, _ = hook(hidden.clone(), residual)
    scale = torch.maximum(hidden.abs(), (gathered - hidden).abs()).amax(dim=-1, keepdim=True)
    assert ((out - gathered).abs() <= 2e-6 * scale).all()
    unsteered = hook.slot_of_token[: len(hidden)] == 0
    assert torch.equal(out[unsteered], hidden[unsteered])


@settings(max_examples=40, deadline=None)
@given(**op_steps)
def test_cpu_op_steers_each_request_as_if_alone(tmp_path_factory, **step):
    """The isolation the server promises, at the op: each request's tokens come out bit for bit as
    in a step of its own (its tokens first, nothing else routed), whatever its batchmates steer."""
    hook, spans, hidden, residual = _op_step(tmp_path_factory.mktemp("sae"), **step)
    together, _ = hook(hidden.clone(), residual)
    for (row, start, end), (_, _, features) in zip(spans, step["requests"]):
        weights = torch.ones(64)
        weights[: end - start] = hook.weight_of_token[start:end]
        alone = SAESteering(hook.sae, TokenIndex.zeros(64, weight=weights), ROWS, WIDTH, torch.float32)
        alone.chunk, alone.small_span = hook.chunk, hook.small_span
        alone.set_row(row, features)
        route(alone, [(row, 0, end - start)])
        out, _ = alone(hidden[start:end].clone(), residual[start:end].clone())
        assert torch.equal(out, together[start:end]), row


def test_unsteered_rows_are_bit_exact(tmp_path):
    sae = make_sae(tmp_path, "jumprelu", "none")
    hook = SAESteering(sae, TokenIndex.zeros(8), ROWS, WIDTH, torch.float32)
    hook.set_row(2, [(3, 0.0, 0.0)])  # add with strength 0
    route(hook, [(2, 4, 8)])
    hidden, residual = torch.randn(8, D), torch.randn(8, D)
    out, _ = hook(hidden.clone(), residual)
    assert torch.equal(out, hidden)
    assert torch.equal(hook.delta(hidden + residual), torch.zeros_like(hidden))


def test_reused_row_forgets_previous_request(tmp_path):
    sae = make_sae(tmp_path, "standard", "none")
    hook = SAESteering(sae, TokenIndex.zeros(4), ROWS, WIDTH, torch.float32)
    route(hook, [(1, 0, 4)])
    hook.set_row(1, [(i, 5.0, 0.0) for i in range(WIDTH)])
    hook.set_row(1, [(7, 2.0, 0.0)])
    x = torch.randn(4, D)
    out, _ = hook(x.clone(), torch.zeros_like(x))
    torch.testing.assert_close(out, x + 2.0 * sae.W_dec[7])
    torch.testing.assert_close(hook.delta(x), 2.0 * sae.W_dec[7].expand(4, D))


def test_guard_keeps_every_delta_finite_and_bounded(tmp_path):
    """The hook's guard alone, on both paths: extreme rows come out finite and bounded, every
    other row exactly as without them (end to end: tests/server/test_reliability.py)."""
    sae = make_sae(tmp_path, "jumprelu", "none")
    hook = SAESteering(sae, TokenIndex.zeros(6), 5, 4, torch.float32)
    route(hook, [(1, 1, 2), (2, 2, 3), (3, 3, 4), (4, 4, 6)])
    hook.set_row(1, [(0, float("inf"), 0.0)])  # add, inf
    hook.set_row(2, [(1, 3e38, -1.0), (2, 3e38, -1.0), (3, -3e38, 0.0)])  # sums past float32
    hook.set_row(3, [(4, 0.0, 1e39)])  # scale mode: inf * f, NaN where f = 0
    hook.set_row(4, [(5, 2.0, 0.0)])  # ordinary
    hidden, residual = torch.randn(6, D), torch.randn(6, D)
    paths = {"cpu op": lambda: hook(hidden.clone(), residual)[0], "gathered": lambda: hidden + hook.delta(hidden + residual)}
    extreme = {name: steer() for name, steer in paths.items()}
    for row in (1, 2, 3):
        hook.set_row(row, [])
    for name, steer in paths.items():
        out = extreme[name]
        assert torch.isfinite(out).all(), name
        assert (out - hidden)[1:4].abs().amax() <= MAX_DELTA, name
        assert torch.equal(out[0], hidden[0]), name
        assert torch.equal(out[[0, 4, 5]], steer()[[0, 4, 5]]), name


def test_cpu_op_memory_follows_its_chunk_not_the_step(tmp_path):
    """Issue 13: the gathered path holds [T, K, d_in] gathers whatever is steered; the CPU op
    holds a few [chunk, d_in] transients at a time, however many tokens the step steers."""
    sae, d_in, width, chunk = make_sae(tmp_path, "jumprelu", "constant_norm_rescale", d_in=64), 64, WIDTH, 16
    peaks = {}
    for n_tokens in (512, 4096):
        hook = SAESteering(sae, TokenIndex.zeros(n_tokens), ROWS, width, torch.float32)
        hook.chunk, hook.small_span = chunk, 0
        share = n_tokens // (ROWS - 1)
        for row in range(1, ROWS):
            hook.set_row(row, [(i, 1.0, -1.0) for i in range(width)])
        route(hook, [(row, (row - 1) * share, row * share) for row in range(1, ROWS)])
        hidden, residual = torch.randn(n_tokens, d_in), torch.randn(n_tokens, d_in)
        peaks[n_tokens] = peak_transient_bytes(functools.partial(hook, hidden, residual))
        assert peak_transient_bytes(functools.partial(hook.delta, hidden + residual)) >= n_tokens * width * d_in * 4
    assert peaks[512] == peaks[4096] <= 8 * chunk * d_in * 4
