"""The steering op at one SAE's hook point, fed by persistent tables.

Table row r holds up to K features of one request (row 0 is all zeros: no steering), and
`weight_of_token[t]` multiplies token t's delta (its request's prompt_scale on prompt tokens,
else 1). Two paths read them, chosen by device, equal to float32 rounding:

- On CPU, a custom op (`steer_spans_`), opaque to torch.compile, reads the step's host-side
  routing (`StepRouting`: each steered request's row and its contiguous token range) and adds
  each request's delta in place, a chunk of its tokens at a time. Work and transient memory
  follow the steered tokens times their features; a step nobody steers costs a Python loop over
  nothing. A TopK SAE encodes only the steered tokens at full width. Requests with only a few
  tokens in the step (decoding) are gathered together, token by token as the gathered path does:
  a pass of their own would cost more in per-op overhead than gathering their rows.
- Elsewhere (a GPU), the gathered path (`delta`): routing is tensor content, never Python.
  `slot_of_token[t]` names the row token t reads; nothing branches on data or leaves the device,
  and every shape is fixed by T, so a CUDA graph can replay it while the runner rewrites the
  tables in place between steps. Its two products over each token's row are steering/kernels.py's:
  for a half-precision model where Triton is installed, kernels that read rows in place and skip
  unsteered tokens; else the torch reference, which gathers two [T, K, d_in] transients per SAE
  every step. A TopK SAE encodes every token at full width. It is also the CPU op's reference.

Any feature may be gated (steering/spec.py): its term is multiplied per token by 1 or 0, from its
row's gate tables and two more per-token tensors (`TokenIndex`): each token's generated index
(position - prompt length) and its gate columns, which the step's conditions write. A condition is
a slot of its SAE's row like a steered feature (c0 = c1 = 0), so its activation comes with the
others; its hook writes whether it holds into the token's gate column before any of its features
read one, and hooks run in layer order. A sticky condition keeps, per row, the generated index of
its first firing (`fired`, a minimum: recomputing a preempted request's tokens finds the same one).
Ungated rows skip all of this on CPU; the gathered path computes it for every token, [T, K] each.

The d_in-wide tables are in the model's dtype; every product accumulates in float32, so a
float32 model's paths are exact to float32 rounding. In half precision a table entry carries a
relative error near 2^-9 (float16) or 2^-8 (bfloat16); a pre-activation that close to a JumpReLU
threshold or TopK's k-th value can land on either side of it, switching that feature at that token.
The feature math itself (input pipeline, pre-activation, f) is the SAE class's.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from features.sae import SAE
from steering import kernels
from steering.spec import MAX_CONDITIONS
from steering.wire import OPEN, Gate, ReadoutBatch, ReadoutRequest

# Largest element a token's steering delta may have. Far above what steering can use (the default
# model's residual stream peaks near 2e4; a delta well past that has swamped it already) and far
# below what overflows float32 or bfloat16 in the next layer's RMSNorm (d_in squares summed).
MAX_DELTA = 1e6
# The CPU op's largest [chunk, width] float32 transient (width d_in, or d_sae for a dense
# architecture); a handful are alive at once, so an op's transients stay within a few tens of MiB.
CHUNK_BYTES = 8 << 20
# A steered request's span whose rows, gathered per token, hold at most this many elements
# (tokens x features x d_in) is gathered with others like it rather than given a pass of its own.
SMALL_SPAN = 1 << 16


# Gate columns per token: 0 is always 1 (ungated), 1..MAX_CONDITIONS the conditions of the token's
# request, and the last takes the writes of slots that are not conditions, and is never read.
GATE_COLUMNS = MAX_CONDITIONS + 2
DISCARD = GATE_COLUMNS - 1


@dataclass(frozen=True)
class TokenIndex:
    """The step's per-token routing, shared by every SAE's hook and rewritten in place by the
    worker before each forward (so a CUDA graph replays over it): vLLM LoRA's per-token index."""

    slot: torch.Tensor  # [T] long: the table row each token reads (0: unsteered)
    weight: torch.Tensor  # [T] float32: its delta's multiplier (its request's prompt_scale on prompt tokens, else 1)
    generated: torch.Tensor  # [T] long: its position minus its prompt's length (negative on the prompt)
    gate: torch.Tensor  # [T, GATE_COLUMNS] float32: which of its request's conditions hold there (hooks write it)

    @classmethod
    def zeros(cls, tokens: int, device: torch.device | str = "cpu", weight: torch.Tensor | None = None) -> TokenIndex:
        """An index routing every token to row 0, weight 1 unless given, generated index 0."""
        gate = torch.zeros(tokens, GATE_COLUMNS, device=device)
        gate[:, 0] = 1.0
        return cls(
            slot=torch.zeros(tokens, dtype=torch.long, device=device),
            weight=torch.ones(tokens, device=device) if weight is None else weight,
            generated=torch.zeros(tokens, dtype=torch.long, device=device),
            gate=gate,
        )


@dataclass(frozen=True)
class ReadoutSpan:
    """Tokens [start, end) of the step, one request's, to read and watch."""

    req_id: str
    request: ReadoutRequest
    start: int
    end: int
    position: int  # the position of token `start` in its sequence
    token_ids: list[int]  # the input token at each
    prompt_tokens: int  # the prompt's length
    fresh: int = 0  # the first position no earlier step computed (a preempted request recomputes its tokens)


@dataclass
class StepRouting:
    """The step's steered and read requests, host-side: what the CPU op reads, as the worker
    writes it before each forward (vLLM lays each request's tokens out contiguously in the step's
    batch). Shared by every SAE's hook, like the per-token index."""

    spans: list[tuple[int, int, int]] = field(default_factory=list)  # (row, first token, end token), row > 0
    readout: list[ReadoutSpan] = field(default_factory=list)  # requests that read or watch
    stop: set[str] = field(default_factory=set)  # requests a stop monitor ended: their next token is their stop token


# The live hooks by name: the CPU op gets a hook's name, a string constant in the compiled graph.
_HOOKS: weakref.WeakValueDictionary[str, SAESteering] = weakref.WeakValueDictionary()


class SAESteering(nn.Module):
    """Adds sum_k (c0 + c1 * f_k(x)) * d_k to each token's residual x, per its request's row."""

    def __init__(
        self, sae: SAE, index: TokenIndex, rows: int, width: int, dtype: torch.dtype, routing: StepRouting | None = None
    ):
        super().__init__()
        self.cfg = sae.cfg
        d_in, device = sae.cfg.d_in, index.slot.device
        self.index = index  # shared by every SAE; updated in place per step
        self.slot_of_token, self.weight_of_token = index.slot, index.weight

        def table(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(rows, width, *shape, dtype=dtype, device=device)

        # The d_in-wide tables, nearly all the memory, in the model's dtype; the products that
        # read them accumulate in float32.
        self.register_buffer("enc", table(d_in, dtype=dtype), persistent=False)  # W_enc[:, i]
        self.register_buffer("enc_bias", table(), persistent=False)  # b_enc[i]
        self.register_buffer("dec", table(d_in, dtype=dtype), persistent=False)  # W_dec[i]
        self.register_buffer("c0", table(), persistent=False)
        self.register_buffer("c1", table(), persistent=False)
        self.register_buffer("feature", torch.zeros(rows, width, dtype=torch.long, device=device), persistent=False)
        for name in sae.per_feature:  # the architecture's own per-feature tensors, e.g. JumpReLU's threshold
            self.register_buffer(name, table(), persistent=False)
        self.register_buffer("b_dec", sae.b_dec.to(device), persistent=False)
        if sae.dense:
            # f_i depends on every pre-activation (TopK), so the full encoder is needed.
            self.register_buffer("W_enc", sae.W_enc.to(device, dtype), persistent=False)
            self.register_buffer("b_enc", sae.b_enc.to(device), persistent=False)
        # The gates (see the module's docstring), each reset to its value for an ungated slot.
        self.gate_defaults = {"when": 0, "writes": DISCARD, "above": math.inf, "sticky": False, "fired": math.inf,
                              "on_prompt": 1.0, "after_n": 0.0, "first_n": math.inf}  # fmt: skip
        for name, value in self.gate_defaults.items():
            kind = torch.long if name in ("when", "writes") else torch.bool if name == "sticky" else torch.float32
            self.register_buffer(name, torch.full((rows, width), value, dtype=kind, device=device), persistent=False)
        self.table_names = ("enc", "enc_bias", "dec", "c0", "c1", "feature", *sae.per_feature, *self.gate_defaults)
        self.gated = [False] * rows  # host-side, for the CPU op: whether a row has a gate here
        self.sae = sae
        self.model_dtype = dtype
        self.kernels = kernels.for_model(device, dtype)
        self.max_delta = min(MAX_DELTA, torch.finfo(dtype).max / 8)  # and what a half-precision model can hold
        # The CPU path's host-side state: the step's spans, and how many features each row holds
        # here (a request may steer only other SAEs; the rest of a row is zeros, skipped).
        self.routing = StepRouting() if routing is None else routing
        self.features_in_row = [0] * rows
        self.chunk = max(1, CHUNK_BYTES // (4 * (sae.cfg.d_sae if sae.dense else d_in)))
        self.small_span = SMALL_SPAN
        self.read: list[ReadoutBatch] = []  # what the CPU op read since the worker last collected it
        self.name = _register(self)

    @torch.no_grad()
    def set_row(
        self, row: int, features: list[tuple[int, float, float] | tuple[int, float, float, Gate] | tuple[int, float, float, Gate, float]],
        conditions: list[tuple[int, int, float, bool]] = (),  # type: ignore[assignment]
        vectors: Sequence[torch.Tensor] = (),
    ) -> None:  # fmt: skip
        """Write one request's features (index, c0, c1[, gate[, bias added to its pre-activation]])
        into table row `row`, then its conditions at this SAE (gate column, index, above, sticky) as
        features that steer nothing. A negative index names one of the request's own `vectors`
        (features/vectors.py's DirectionSAE), whose values are written directly."""
        width = self.c0.shape[1]
        slots = [(f[0], f[1], f[2], f[3] if len(f) > 3 else OPEN) for f in features]  # type: ignore[misc]
        biases = [f[4] if len(f) > 4 else 0.0 for f in features]  # type: ignore[misc]
        slots += [(index, 0.0, 0.0, OPEN) for _, index, _, _ in conditions]
        assert len(slots) <= width, "the server caps features and conditions per SAE at the table width"
        for name in self.table_names:
            getattr(self, name)[row].fill_(self.gate_defaults.get(name, 0))
        self.features_in_row[row] = len(slots)
        self.gated[row] = bool(conditions) or any(gate != OPEN for *_, gate in slots)
        if not slots:
            return
        n, sae, device = len(slots), self.sae, self.enc.device
        indices = [i for i, _, _, _ in slots]
        enc, dec = torch.zeros(n, self.cfg.d_in), torch.zeros(n, self.cfg.d_in)
        enc_bias, params = torch.tensor(biases + [0.0] * (n - len(biases))), {name: torch.zeros(n) for name in sae.params}
        if known := [s for s, i in enumerate(indices) if i >= 0]:
            idx = torch.tensor([indices[s] for s in known], dtype=torch.long)
            enc[known], dec[known] = sae.W_enc[:, idx].T, sae.W_dec[idx]
            enc_bias[known] += sae.b_enc[idx]
            for name, values in sae.params.items():
                params[name][known] = values[idx]
        for s in (s for s, i in enumerate(indices) if i < 0):
            enc[s], dec[s], params["linear"][s] = sae.inline_slot(indices[s], vectors)  # type: ignore[attr-defined]
        self.feature[row, :n] = torch.tensor(indices, dtype=torch.long, device=device)
        self.enc[row, :n], self.dec[row, :n], self.enc_bias[row, :n] = enc.to(device), dec.to(device), enc_bias.to(device)
        for name, values in params.items():
            getattr(self, name)[row, :n] = values.to(device)
        self.c0[row, :n] = torch.tensor([c0 for _, c0, _, _ in slots], device=device)
        self.c1[row, :n] = torch.tensor([c1 for _, _, c1, _ in slots], device=device)
        gates = [gate for *_, gate in slots]
        self.when[row, :n] = torch.tensor([g.when for g in gates], device=device)
        self.on_prompt[row, :n] = torch.tensor([float(g.prompt) for g in gates], device=device)
        self.after_n[row, :n] = torch.tensor([float(g.after_n) for g in gates], device=device)
        self.first_n[row, :n] = torch.tensor([math.inf if g.first_n is None else float(g.first_n) for g in gates], device=device)
        for slot, (column, _, above, sticky) in enumerate(conditions, start=len(features)):
            self.writes[row, slot], self.above[row, slot], self.sticky[row, slot] = column, above, sticky

    def _gates(self, f: torch.Tensor, slots: torch.Tensor, tokens: slice | torch.Tensor, k: int) -> torch.Tensor:
        """Each token's gate [T, K] (1 or 0) on its row's first k slots, given their activations
        f [T, K] at tokens `tokens` (of the step) reading rows `slots` [T]. First writes the step's
        conditions held at this SAE into the tokens' gate columns, and notes sticky first firings."""
        g = self.index.generated[tokens].to(torch.float32)[:, None]
        holds = f > self.above[slots, :k]
        # The earliest firing so far of each row's sticky conditions; a token's is open from there.
        self.fired[:, :k].scatter_reduce_(0, slots[:, None].expand(-1, k), torch.where(holds, g, math.inf), "amin")
        held = torch.where(self.sticky[slots, :k], self.fired[slots, :k] <= g, holds)
        columns = self.index.gate[tokens]
        columns.scatter_(1, self.writes[slots, :k], held.to(columns.dtype))
        self.index.gate[tokens] = columns
        window = torch.where(g < 0, self.on_prompt[slots, :k] > 0, (g >= self.after_n[slots, :k]) & (g < self.first_n[slots, :k]))
        return columns.gather(1, self.when[slots, :k]) * window

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The steering delta [T, d_in] for residual vectors x [T, d_in]: the gathered path."""
        n_tokens, width = x.shape[0], self.c0.shape[1]
        return self._gathered(x, slice(0, n_tokens), width, gated=True)

    def _gathered(self, x: torch.Tensor, tokens: slice | torch.Tensor, k: int, gated: bool) -> torch.Tensor:
        """The delta [T, d_in] of residual vectors x [T, d_in] at the step's tokens `tokens`, each
        through its row's first k features, weighted, and gated unless no row here is."""
        slots, weights = self.slot_of_token[tokens], self.weight_of_token[tokens, None]
        xin, scale = self.sae.sae_in(x, self.b_dec)
        row = {name: getattr(self, name)[slots, :k] for name in ("enc_bias", "c0", "c1", "feature", *self.sae.per_feature)}

        def project(xin: torch.Tensor) -> torch.Tensor:
            return self.kernels.shrink(xin, self.enc[:, :k], slots) + row["enc_bias"]

        f = self.sae.selected_activations(xin, project, row, row["feature"], self._dense())
        coef = (row["c0"] + row["c1"] * f) * weights
        if gated:
            coef = coef * self._gates(f, slots, tokens, k)
        # The reconstruction lives in the SAE's normalised space; map the delta back.
        return _bounded(self.kernels.expand(coef, self.dec[:, :k], slots) / scale, self.max_delta)

    def steer_spans(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Add the steering delta into hidden [T, d_in] in place, for the steered requests only;
        residual [T, d_in] (stream = hidden + residual). The CPU op's body.

        Semantics:
            for row, start, end in routing.spans:            # a steered request's tokens
                K = features_in_row[row]                     # 0: it steers other SAEs only
                if (end - start) * K * d_in <= small_span:   # decode steps, mostly
                    set it aside with the other small spans whose rows hold K features
                else, for [a, b) in chunks of [start, min(end, T)), at most `chunk` tokens:
                    xin, scale = sae_in(hidden[a:b] + residual[a:b])
                    f = activations of tables[row, :K] at xin                       # [b-a, K]
                    coef = (c0[row, :K] + c1[row, :K] * f) * weight_of_token[a:b]   # [b-a, K]
                    hidden[a:b] += bounded(coef @ dec[row, :K] / scale)
            for each K, the tokens set aside, idx [n], in groups of at most CHUNK_BYTES of rows:
                hidden[idx] += the gathered path's delta of those tokens, through K features
        The gathered path's delta, token for token, to float32 rounding. No matmul mixes two
        requests' tokens (tokens set aside get one product each, batched, at their own row's K),
        so a request's result never depends on its batchmates.
        """
        watched = [w for w in self.routing.readout if w.request.touches(self.sae.id)]
        before = [self._before(hidden, residual, w) for w in watched]
        n_tokens, small = hidden.shape[0], defaultdict(list)
        for row, start, end in self.routing.spans:
            k, end = self.features_in_row[row], min(end, n_tokens)
            if not k or start >= end:
                continue
            # A span this small costs less gathered than a pass of its own, whose few dozen ops
            # each cost microseconds. Not for a dense SAE: its full-width encoder would be one
            # matmul over several requests' tokens.
            if (end - start) * k * self.cfg.d_in <= self.small_span and not self.sae.dense:
                small[k].append((row, start, end))
            else:
                self._steer_row(hidden, residual, row, k, start, end)
        for k, spans in small.items():
            tokens = [t for _, start, end in spans for t in range(start, end)]
            per_group = max(1, CHUNK_BYTES // (4 * k * self.cfg.d_in))
            gated = any(self.gated[row] for row, _, _ in spans)
            for g in range(0, len(tokens), per_group):
                idx = torch.tensor(tokens[g : g + per_group])
                delta = self._gathered(hidden[idx] + residual[idx], idx, k, gated)
                hidden.index_add_(0, idx, delta.to(hidden.dtype))
        if watched:
            self._observe(hidden, residual, watched, before)

    @torch.no_grad()
    def _activations(self, stream: torch.Tensor, features: list[int]) -> torch.Tensor:
        """f [n, len(features)] of the listed features at residual vectors stream [n, d_in]."""
        if not features:
            return stream.new_zeros(stream.shape[0], 0, dtype=torch.float32)
        sae, idx = self.sae, torch.tensor(features)
        w_enc, b_enc = sae.W_enc[:, idx], sae.b_enc[idx]
        params = {name: values[idx] for name, values in sae.params.items()}
        dense = {"W_enc": sae.W_enc, "b_enc": sae.b_enc}
        xin, _ = sae.sae_in(stream)
        return sae.selected_activations(xin, lambda xin: xin @ w_enc + b_enc, params, idx, dense)

    def _first_read(self, span: ReadoutSpan) -> int:
        """The span's first token to read: its first, or its first past the prompt."""
        readout = span.request.readout
        if readout is None or readout.sae != self.sae.id:
            return span.end  # nothing to read here
        return span.start + (0 if readout.prompt else max(0, min(span.end - span.start, span.prompt_tokens - span.position)))

    def _before(self, hidden: torch.Tensor, residual: torch.Tensor, span: ReadoutSpan) -> torch.Tensor:
        """The read tokens' values of the request's steered features, before steering."""
        first, readout = self._first_read(span), span.request.readout
        steered = readout.steered if first < span.end and readout is not None else []
        return self._activations(hidden[first : span.end] + residual[first : span.end], steered)

    @torch.no_grad()
    def _observe(self, hidden: torch.Tensor, residual: torch.Tensor, spans: list[ReadoutSpan], before: list[torch.Tensor]) -> None:
        """What the spans' tokens show on the stream as the next layer sees it (after steering):
        each request's readout at this SAE, and its monitors at this SAE that fire (a stop one
        marks the request to stop), added to `read`."""
        tokens = self._readout(hidden, residual, spans, before)
        for span, read in zip(spans, tokens):
            fired = self._watch(hidden, residual, span)
            summed = self._residual(hidden, residual, span)
            if read or fired or summed:
                self.read.append(ReadoutBatch.model_construct(
                    id=span.request.id, req=span.req_id, prompt_tokens=span.prompt_tokens, tokens=read, fired=fired,
                    residual=summed, end=False,
                ))  # fmt: skip

    def _readout(self, hidden: torch.Tensor, residual: torch.Tensor, spans: list[ReadoutSpan], before: list[torch.Tensor]) -> list[list]:
        """Each span's read tokens: (position, token id, top_k (index, activation) pairs, the
        listed features' activations, the steered ones' before steering). The step's read tokens
        are encoded together at full width, a chunk of them at a time: one matmul, not one per
        request (so a value's rounding may follow how many tokens the step reads)."""
        firsts = [self._first_read(span) for span in spans]
        rows = [torch.arange(first, span.end) for first, span in zip(firsts, spans)]
        index = torch.cat(rows)
        if not len(index):
            return [[] for _ in spans]
        per_chunk = max(1, CHUNK_BYTES // (4 * self.cfg.d_sae))
        top_k = max(span.request.readout.top_k for span, r in zip(spans, rows) if len(r))  # type: ignore[union-attr]
        f = torch.cat([self.sae.encode(hidden[index[a : a + per_chunk]] + residual[index[a : a + per_chunk]])
                       for a in range(0, len(index), per_chunk)])  # fmt: skip
        top = torch.topk(f, top_k, dim=-1)
        indices, values = top.indices.tolist(), top.values.tolist()
        out, at = [], 0
        for span, first, r, pre in zip(spans, firsts, rows, before):
            n, readout = len(r), span.request.readout
            if not n:
                out.append([])
                continue
            k, listed = readout.top_k, f[at : at + n, readout.features].tolist()  # type: ignore[union-attr]
            offset, pre_values = first - span.start, pre.tolist()
            out.append([
                (span.position + offset + t, span.token_ids[offset + t], list(zip(indices[at + t][:k], values[at + t][:k])),
                 listed[t], pre_values[t])
                for t in range(n)
            ])  # fmt: skip
            at += n
        return out

    def _watch(self, hidden: torch.Tensor, residual: torch.Tensor, span: ReadoutSpan) -> list[tuple[int, int, int, float]]:
        """The monitors at this SAE that fire in the span, each at its first token in scope."""
        mine = [(n, m) for n, m in enumerate(span.request.monitors) if m.sae == self.sae.id]
        if not mine:
            return []
        f = self._activations(hidden[span.start : span.end] + residual[span.start : span.end], [m.index for _, m in mine])
        in_prompt = torch.arange(span.position, span.position + span.end - span.start) < span.prompt_tokens
        scopes = {"prompt": in_prompt, "completion": ~in_prompt, "all": torch.ones_like(in_prompt)}
        fired = []
        for j, (n, monitor) in enumerate(mine):
            hits = torch.nonzero((f[:, j] > monitor.above) & scopes[monitor.scope])
            if len(hits):
                t = int(hits[0])
                fired.append((n, span.position + t, span.token_ids[t], float(f[t, j])))
                if monitor.stop:
                    self.routing.stop.add(span.req_id)
        return fired

    def _residual(self, hidden: torch.Tensor, residual: torch.Tensor, span: ReadoutSpan) -> tuple | None:
        """The span's part of the request's residual sum (`WireResidual`): the stream at each prompt
        position from the request's `first` on that no earlier step computed, summed in float32,
        and the stream at the prompt's last position if this span holds it."""
        wanted = span.request.residual
        if wanted is None or wanted.sae != self.sae.id:
            return None
        end = min(span.position + span.end - span.start, span.prompt_tokens)
        start = max(span.position, span.fresh, wanted.first)
        if start >= end:
            return None
        rows = slice(span.start + start - span.position, span.start + end - span.position)
        stream = hidden[rows].float() + residual[rows].float()
        last = stream[-1].tolist() if end == span.prompt_tokens else None
        return end - start, stream.sum(0).tolist(), last

    def _steer_row(self, hidden: torch.Tensor, residual: torch.Tensor, row: int, k: int, start: int, end: int) -> None:
        """hidden[start:end] [n, d_in] += the delta of one request's tokens through its row's K features."""
        tables = {name: getattr(self, name)[row, :k] for name in self.table_names}
        enc, dec = tables["enc"].float(), tables["dec"].float()

        def project(xin: torch.Tensor) -> torch.Tensor:
            return xin @ enc.T + tables["enc_bias"]

        for a in range(start, end, self.chunk):
            b = min(a + self.chunk, end)
            xin, scale = self.sae.sae_in(hidden[a:b] + residual[a:b], self.b_dec)
            f = self.sae.selected_activations(xin, project, tables, tables["feature"], self._dense())
            coef = (tables["c0"] + tables["c1"] * f) * self.weight_of_token[a:b, None]
            if self.gated[row]:
                coef = coef * self._gates(f, self.slot_of_token[a:b], slice(a, b), k)
            hidden[a:b] += _bounded(coef @ dec / scale, self.max_delta).to(hidden.dtype)

    def _dense(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc} if self.sae.dense else {}

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Steer a decoder layer's output in vLLM's fused-residual layout (stream = hidden + residual).

        On CPU, `hidden` itself is steered, in place; elsewhere the steered hidden is a new tensor."""
        if hidden.device.type == "cpu":
            torch.ops.steerserve.steer_spans_(hidden, residual, self.name)
            return hidden, residual
        delta = self.delta(hidden + residual)
        return hidden + delta.to(hidden.dtype), residual


def table_bytes(sae: SAE, rows: int, width: int, dtype: torch.dtype) -> int:
    """The memory one SAE's hook holds for a model in `dtype`: per row and feature its encoder
    column and decoder row (d_in each, in `dtype`), bias, c0, c1 and the architecture's own values
    in float32, and the feature index; b_dec; and for a dense architecture its whole encoder
    (W_enc in `dtype`, b_enc in float32)."""
    d_in, d_sae, size = sae.cfg.d_in, sae.cfg.d_sae, dtype.itemsize
    # float32: enc_bias, c0, c1, the architecture's own, above, fired, on_prompt, after_n, first_n;
    # long: feature, when, writes; bool: sticky
    per_feature = 2 * size * d_in + 4 * (8 + len(sae.per_feature)) + 3 * 8 + 1
    return rows * width * per_feature + 4 * d_in + ((size * d_in + 4) * d_sae if sae.dense else 0)


def _bounded(delta: torch.Tensor, max_delta: float) -> torch.Tensor:
    """Each token's delta [T, d_in], finite and at most `max_delta` in any element."""
    # The numerical guard. Extreme coefficients or statistics can make a delta inf or NaN; in
    # the residual stream that turns this token's logits to NaN, and the NaN it writes into
    # KV-cache blocks outlives the request and poisons later ones that reuse the blocks. So each
    # token's delta is made finite (NaN -> 0) and, past `max_delta`, scaled down whole, keeping
    # its direction. Rows whose delta is within bounds (all ordinary steering) are untouched.
    delta = torch.nan_to_num(delta, nan=0.0)
    peak = delta.abs().amax(dim=-1, keepdim=True)
    return delta * (max_delta / peak).clamp(max=1.0)


def _register(hook: SAESteering) -> str:
    """A name for `hook`, unique among live hooks: its SAE's id, numbered past any live hook of
    the same SAE (tests build several). A worker builds one hook per SAE, so a fresh worker
    process names its hooks as the process that compiled a cached graph did."""
    n = 0
    while f"{hook.sae.id}#{n}" in _HOOKS:
        n += 1
    name = f"{hook.sae.id}#{n}"
    _HOOKS[name] = hook
    return name


@torch.library.custom_op("steerserve::steer_spans_", mutates_args=("hidden",), device_types="cpu")
def steer_spans_(hidden: torch.Tensor, residual: torch.Tensor, hook: str) -> None:
    """hidden [T, d_in] += the steering delta of hook `hook` (`SAESteering.steer_spans`);
    residual [T, d_in]. Opaque to torch.compile, so host-side routing may steer its work."""
    _HOOKS[hook].steer_spans(hidden, residual)


@steer_spans_.register_fake
def _(hidden: torch.Tensor, residual: torch.Tensor, hook: str) -> None:
    """Tracing needs nothing: the op's only effect is on `hidden`, whose shape it keeps."""
