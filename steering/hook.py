"""The steering op at one SAE's hook point, fed by persistent tables.

Routing is tensor content, never Python: `slot_of_token[t]` names the table row that
token t reads (row 0 is all zeros: no steering), row r holds up to K features of
one request, and `weight_of_token[t]` multiplies token t's delta (its request's
prompt_scale on prompt tokens, else 1). Nothing here branches on data or leaves the
device, and every shape is fixed by T, so torch.compile traces it once and a CUDA graph
can replay it while the runner rewrites the tables in place between steps.

Cost: each step gathers every token's row, `enc[slots]` and `dec[slots]`, two [T, K, d_in]
float32 transients per SAE, whether or not anyone steers; a TopK SAE also encodes every token
at full width. The feature math itself (pre-activation, f) is the SAE class's.
"""

from __future__ import annotations

import torch
from torch import nn

from features.sae import SAE

# Largest element a token's steering delta may have. Far above what steering can use (the default
# model's residual stream peaks near 2e4; a delta well past that has swamped it already) and far
# below what overflows float32 or bfloat16 in the next layer's RMSNorm (d_in squares summed).
MAX_DELTA = 1e6


class SAESteering(nn.Module):
    """Adds sum_k (c0 + c1 * f_k(x)) * d_k to each token's residual x, per its request's row."""

    def __init__(
        self,
        sae: SAE,
        slot_of_token: torch.Tensor,
        rows: int,
        width: int,
        dtype: torch.dtype,
        weight_of_token: torch.Tensor | None = None,
    ):
        super().__init__()
        self.cfg = sae.cfg
        d_in, device = sae.cfg.d_in, slot_of_token.device
        self.slot_of_token = slot_of_token  # shared by every SAE; updated in place per step
        # likewise; without it, every token is steered at full weight
        self.weight_of_token = (
            torch.ones(len(slot_of_token), device=device) if weight_of_token is None else weight_of_token
        )

        def table(*shape: int) -> torch.Tensor:
            return torch.zeros(rows, width, *shape, dtype=torch.float32, device=device)

        self.register_buffer("enc", table(d_in), persistent=False)  # W_enc[:, i]
        self.register_buffer("enc_bias", table(), persistent=False)  # b_enc[i]
        self.register_buffer("dec", table(d_in), persistent=False)  # W_dec[i]
        self.register_buffer("c0", table(), persistent=False)
        self.register_buffer("c1", table(), persistent=False)
        self.register_buffer("feature", torch.zeros(rows, width, dtype=torch.long, device=device), persistent=False)
        for name in sae.per_feature:  # the architecture's own per-feature tensors, e.g. JumpReLU's threshold
            self.register_buffer(name, table(), persistent=False)
        self.register_buffer("b_dec", sae.b_dec.to(device), persistent=False)
        if sae.dense:
            # f_i depends on every pre-activation (TopK), so the full encoder is needed.
            self.register_buffer("W_enc", sae.W_enc.to(device), persistent=False)
            self.register_buffer("b_enc", sae.b_enc.to(device), persistent=False)
        self.table_names = ("enc", "enc_bias", "dec", "c0", "c1", "feature", *sae.per_feature)
        self.sae = sae
        self.model_dtype = dtype
        self.max_delta = min(MAX_DELTA, torch.finfo(dtype).max / 8)  # and what a half-precision model can hold

    @torch.no_grad()
    def set_row(self, row: int, features: list[tuple[int, float, float]]) -> None:
        """Write one request's features (index, c0, c1) into table row `row`."""
        width = self.c0.shape[1]
        assert len(features) <= width, "the server caps features per SAE at the table width"
        for name in self.table_names:
            getattr(self, name)[row].zero_()
        if not features:
            return
        idx = torch.tensor([i for i, _, _ in features], dtype=torch.long)
        n, sae, device = len(features), self.sae, self.enc.device
        self.feature[row, :n] = idx.to(device)
        self.enc[row, :n] = sae.W_enc[:, idx].T.to(device)
        self.enc_bias[row, :n] = sae.b_enc[idx].to(device)
        for name, values in sae.params.items():
            getattr(self, name)[row, :n] = values[idx].to(device)
        self.dec[row, :n] = sae.W_dec[idx].to(device)
        self.c0[row, :n] = torch.tensor([c0 for _, c0, _ in features], device=device)
        self.c1[row, :n] = torch.tensor([c1 for _, _, c1 in features], device=device)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The steering delta [T, d_in] for residual vectors x [T, d_in]."""
        slots, weights = self.slot_of_token[: x.shape[0]], self.weight_of_token[: x.shape[0], None]
        xin, scale = self.sae.sae_in(x, self.b_dec)
        tables = {name: getattr(self, name) for name in self.table_names}
        dense = {"W_enc": self.W_enc, "b_enc": self.b_enc} if self.sae.dense else {}
        f = self.sae.selected_activations(xin, slots, tables, dense)
        coef = (self.c0[slots] + self.c1[slots] * f) * weights
        # The reconstruction lives in the SAE's normalised space; map the delta back.
        delta = torch.einsum("tk,tkd->td", coef, self.dec[slots]) / scale
        # The numerical guard. Extreme coefficients or statistics can make a delta inf or NaN; in
        # the residual stream that turns this token's logits to NaN, and the NaN it writes into
        # KV-cache blocks outlives the request and poisons later ones that reuse the blocks. So each
        # token's delta is made finite (NaN -> 0) and, past `max_delta`, scaled down whole, keeping
        # its direction. Rows whose delta is within bounds (all ordinary steering) are untouched.
        delta = torch.nan_to_num(delta, nan=0.0)
        peak = delta.abs().amax(dim=-1, keepdim=True)
        return delta * (self.max_delta / peak).clamp(max=1.0)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Steer a decoder layer's output in vLLM's fused-residual layout (stream = hidden + residual)."""
        delta = self.delta(hidden + residual)
        return hidden + delta.to(hidden.dtype), residual
