"""The reference a server must match: plain transformers, one forward hook, the formulas as written.

Kept deliberately independent of steering/hook.py and of the SAE classes: full-width SAE
encoding, the per-mode formulas spelled out, its own input normalisation and its own activations
for the three built-in architectures. An architecture registered elsewhere (a new class in
features/sae.py, or a test's toy) lends the reference only its activation, f = act(pre), applied
to the pre-activations computed here; everything around it is still the reference's own.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from features.sae import SAE


@dataclass(frozen=True)
class When:
    """A condition: `sae`'s feature `index` above `above` (raw), on the stream its layer writes."""

    sae: SAE
    index: int
    above: float
    sticky: bool = False  # holds from the first position where it did, on


@dataclass(frozen=True)
class Intervention:
    sae: SAE
    index: int
    mode: str
    strength: float  # raw units
    when: When | None = None
    prompt: bool = True  # applies at prompt positions
    after_n: int = 0  # and at generated token g (position - prompt length) with after_n <= g < first_n
    first_n: int | None = None


def _activations(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f [T, d_sae], normalisation factor [T, 1]) computed from scratch."""
    cfg = sae.cfg
    if cfg.normalize_activations == "constant_norm_rescale":
        factor = math.sqrt(cfg.d_in) / x.norm(dim=-1, keepdim=True)
    elif cfg.normalize_activations == "expected_average_only_in":
        factor = torch.full((x.shape[0], 1), cfg.norm_scaling_factor)
    elif cfg.normalize_activations == "layer_norm":
        centred = x - x.mean(dim=-1, keepdim=True)
        factor = 1 / (centred.std(dim=-1, keepdim=True) + 1e-5)
        x = centred  # the mean shifts the input only: a delta is divided by the factor alone
    else:
        factor = torch.ones(x.shape[0], 1)
    xin = x * factor - (sae.b_dec if cfg.apply_b_dec_to_input else 0)
    pre = xin @ sae.W_enc + sae.b_enc
    if cfg.architecture == "jumprelu":
        f = torch.where(pre > sae.params["threshold"], pre.clamp_min(0), torch.zeros_like(pre))
    elif cfg.architecture == "topk":
        f = torch.zeros_like(pre)
        values, indices = pre.topk(cfg.k, dim=-1)
        f.scatter_(-1, indices, values.clamp_min(0))
    elif cfg.architecture in ("standard", "relu"):
        f = pre.clamp_min(0)
    else:
        f = sae.activation(pre, sae.params)
    return f, factor


def steered_residual(x: torch.Tensor, interventions: list[Intervention], gates: list[torch.Tensor] | None = None) -> torch.Tensor:
    """x [T, d] with every intervention applied, each reading the same un-steered x, each times its gate [T] if given."""
    x = x.float()
    out = x.clone()
    for n, iv in enumerate(interventions):
        f, factor = _activations(iv.sae, x)
        fi, s, d = f[:, iv.index : iv.index + 1], iv.strength, iv.sae.W_dec[iv.index]
        if iv.mode == "add":
            coef = torch.full_like(fi, s)
        elif iv.mode == "clamp":
            coef = s - fi
        elif iv.mode == "ablate":
            coef = -fi
        elif iv.mode == "scale":
            coef = (s - 1) * fi
        else:
            raise ValueError(iv.mode)
        if gates is not None:
            coef = coef * gates[n][:, None]
        out = out + coef * d / factor
    return out


@contextmanager
def steering_hooks(model, interventions: list[Intervention], prompt_len: int = 0, prompt_scale: float = 1.0):
    """Steer a transformers Llama: each decoder layer's output is the residual stream (resid_post).
    Positions before `prompt_len` get `prompt_scale` times the change, the rest all of it. An
    intervention applies only at positions in its window where its condition holds, the condition
    read at its own layer before that layer steers; one generation per `with` (sticky conditions
    remember their first position across its forwards)."""
    by_layer: dict[int, list[Intervention]] = {}
    conditions = {iv.when for iv in interventions if iv.when is not None}
    for iv in interventions:
        by_layer.setdefault(iv.sae.cfg.layer, []).append(iv)
    for when in conditions:
        by_layer.setdefault(when.sae.cfg.layer, [])
    holds: dict[When, torch.Tensor] = {}  # this forward's, per position
    first: dict[When, float] = {}  # each sticky condition's first position so far

    def gate(iv: Intervention, positions: torch.Tensor) -> torch.Tensor:
        g = positions - prompt_len
        first_n = math.inf if iv.first_n is None else iv.first_n
        window = torch.where(g < 0, torch.tensor(iv.prompt), (g >= iv.after_n) & (g < first_n))
        return (window & (holds[iv.when] if iv.when is not None else True)).float()

    handles = []
    for layer, ivs in sorted(by_layer.items()):

        def hook(module, args, kwargs, output, ivs=ivs, layer=layer):
            hidden = output[0] if isinstance(output, tuple) else output
            shape = hidden.shape
            positions = kwargs["position_ids"].reshape(-1)
            for when in conditions:
                if when.sae.cfg.layer == layer:
                    f = _activations(when.sae, hidden.reshape(-1, shape[-1]).float())[0][:, when.index] > when.above
                    if when.sticky:
                        first[when] = min([first.get(when, math.inf), *positions[f].tolist()])
                        f = positions >= first[when]
                    holds[when] = f
            if not ivs:
                return output
            gates = [gate(iv, positions) for iv in ivs]
            steered = steered_residual(hidden.reshape(-1, shape[-1]), ivs, gates).reshape(shape)
            if prompt_scale != 1.0:
                weight = torch.where(kwargs["position_ids"] < prompt_len, prompt_scale, 1.0)[..., None]
                steered = hidden.float() + weight * (steered - hidden.float())
            steered = steered.to(hidden.dtype)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handles.append(model.model.layers[layer].register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class VectorEdit:
    """A steering vector v at a decoder layer's output: add s*v (raw) or s*v/|v| (norm); or, along
    r = v/|v| with p = x.r, ablate (x - p r), clamp (x + (s - p) r) or cap (x + (min(p, s) - p) r)."""

    layer: int
    vector: torch.Tensor
    mode: str
    strength: float = 0.0
    unit: str = "raw"

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vector.float()
        r = v / v.norm()
        p = (x @ r)[:, None]
        if self.mode == "add":
            return (self.strength * (v if self.unit == "raw" else r)).expand_as(x)
        target = {"ablate": torch.zeros_like(p), "clamp": torch.full_like(p, self.strength), "cap": p.clamp(max=self.strength)}[self.mode]
        return (target - p) * r


@contextmanager
def vector_hooks(model, edits: list[VectorEdit]):
    """Each edit applied to its layer's output; edits at one layer all read the same unsteered x."""
    handles = []
    for layer in sorted({e.layer for e in edits}):

        def hook(module, args, output, here=[e for e in edits if e.layer == layer]):
            hidden = output[0] if isinstance(output, tuple) else output
            x = hidden.reshape(-1, hidden.shape[-1]).float()
            steered = (x + sum(e.delta(x) for e in here)).reshape(hidden.shape).to(hidden.dtype)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handles.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def greedy(
    model, prompt_ids: list[int], max_new_tokens: int, interventions: list[Intervention] = (), prompt_scale: float = 1.0,
    vectors: list[VectorEdit] = (),
) -> list[int]:  # fmt: skip
    with steering_hooks(model, list(interventions), len(prompt_ids), prompt_scale), vector_hooks(model, list(vectors)):
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,  # compare full lengths; the server is asked to ignore EOS too
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


@torch.no_grad()
def next_token_logprobs(model, token_ids: list[int], interventions: list[Intervention] = ()) -> torch.Tensor:
    """Log-probabilities of the token after `token_ids`, steered at every position."""
    with steering_hooks(model, list(interventions)):
        logits = model(torch.tensor([token_ids])).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def feature_activations(
    model, token_ids: list[int], sae: SAE, interventions: list[Intervention] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f after steering, f before steering), each [T, d_sae]: `sae`'s activations at every
    position of `token_ids` on the residual stream after its layer, read in one steered forward."""
    seen: list[torch.Tensor] = []

    def capture(module, args, output):
        seen.append((output[0] if isinstance(output, tuple) else output)[0].float())

    layer = model.model.layers[sae.cfg.layer]
    before = layer.register_forward_hook(capture)  # runs before the steering hook: the stream as the layer wrote it
    try:
        with steering_hooks(model, list(interventions)):
            after = layer.register_forward_hook(capture)  # after it: the stream the next layer reads
            try:
                model(torch.tensor([token_ids]))
            finally:
                after.remove()
    finally:
        before.remove()
    return _activations(sae, seen[1])[0], _activations(sae, seen[0])[0]
