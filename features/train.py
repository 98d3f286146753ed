"""Training the default SAE: BatchTopK on cached residuals, served as a JumpReLU SAE.

BatchTopK (Bussmann et al., 2024) keeps the k*B largest activations of a batch of B tokens;
at inference its single learned threshold turns it into a JumpReLU SAE, whose f_i(x) needs only
feature i's own encoder column. That is what the steering hook wants: a TopK SAE's f_i needs the
full encoder on every token of every step, steered or not.

The step is sparse where it can be: the encoder runs dense once, but gradients flow only through
the selected (token, feature) pairs: decoding and every gradient are sparse CSR products over
those pairs (`SparseStep`), with hand-written backward passes. Dead latents get OpenAI's AuxK loss. Checkpoints are written atomically and training resumes from the last.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from features.activations import as_float


@dataclass(frozen=True)
class TrainConfig:
    d_sae: int = 8192
    k: int = 48  # mean active features per token
    batch: int = 4096  # tokens per step
    epochs: float = 1.0
    lr: float = 4e-4
    warmup_steps: int = 50
    aux_k: int = 64  # dead latents used to model the residual error (AuxK)
    aux_alpha: float = 1 / 32
    dead_after_tokens: int = 1_000_000
    threshold_decay: float = 0.99  # EMA of the batch's smallest kept activation -> JumpReLU threshold
    seed: int = 0
    checkpoint_every: int = 200


class BatchTopKSAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator):
        super().__init__()
        W_dec = torch.randn(d_sae, d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)


def batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the k*B largest positive pre-activations, in row order. A token keeps at
    most 2k: candidates come from each row's top 2k, which keeps the selection cheap."""
    top = torch.topk(pre, min(2 * k, pre.shape[1]), dim=1)
    kth = torch.topk(top.values.flatten(), k * pre.shape[0], sorted=False).values.min()
    rows, slots = ((top.values >= kth) & (top.values > 0)).nonzero(as_tuple=True)
    return rows, top.indices[rows, slots]


def csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """CSR matrix from (rows, cols, values) given in row order."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class SparseStep:
    """Reconstruction through a set of (token, latent) pairs, with hand-written gradients.

    Autograd through gathered rows materialises [pairs, d_in] several times; sparse CSR products
    do the same work in a fraction of the time on the CPU."""

    def __init__(self, sae: BatchTopKSAE, centred: torch.Tensor, pre: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        self.sae, self.centred, self.rows, self.cols = sae, centred, rows, cols
        self.values = pre[rows, cols]
        self.acts = csr(rows, cols, self.values, tuple(pre.shape))  # type: ignore[arg-type]
        self.by_latent = torch.argsort(cols)  # the transposed pattern, for the weight gradients

    def decode(self) -> torch.Tensor:
        return self.acts @ self.sae.W_dec

    def _transposed(self, values: torch.Tensor) -> torch.Tensor:
        order = self.by_latent
        return csr(self.cols[order], self.rows[order], values[order], (self.sae.W_dec.shape[0], len(self.centred)))

    def backward(self, grad_out: torch.Tensor) -> None:
        """Accumulate parameter gradients for d(loss)/d(decode()) = grad_out [B, d_in]."""
        sae, rows, cols = self.sae, self.rows, self.cols
        _accumulate(sae.W_dec, self._transposed(self.values) @ grad_out)
        grad_values = (grad_out @ sae.W_dec.T)[rows, cols]  # the selected pre-activations pass straight through
        _accumulate(sae.W_enc, (self._transposed(grad_values) @ self.centred).T)
        grad_b_enc = torch.zeros_like(sae.b_enc).index_add_(0, cols, grad_values)
        _accumulate(sae.b_enc, grad_b_enc)
        _accumulate(sae.b_dec, -(sae.W_enc @ grad_b_enc))


def _accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    param.grad = grad if param.grad is None else param.grad + grad


class Trainer:
    def __init__(self, activations: np.ndarray, cfg: TrainConfig, workdir: Path):
        self.acts = activations  # [N, d_in] bfloat16 bits as uint16
        self.cfg = cfg
        self.workdir = workdir
        generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        d_in = activations.shape[1]
        self.sae = BatchTopKSAE(d_in, cfg.d_sae, generator)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.steps = int(cfg.epochs * len(activations) // cfg.batch)
        self.step = 0
        self.threshold = 0.0
        self.last_fired = torch.zeros(cfg.d_sae, dtype=torch.long)  # tokens seen when each latent last fired
        self.scale = self._input_scale()
        self.history: list[dict] = []
        self._resume()

    def batch(self, step: int) -> torch.Tensor:
        per_epoch = len(self.acts) // self.cfg.batch
        epoch, n = divmod(step, per_epoch)
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.acts))
        idx = np.sort(order[n * self.cfg.batch : (n + 1) * self.cfg.batch])
        return as_float(self.acts[idx]) * self.scale

    def _input_scale(self) -> float:
        """Scale that makes the mean residual norm sqrt(d_in) (SAELens's expected_average_only_in);
        folded into the weights when saving, so the served SAE takes raw residuals."""
        sample = as_float(self.acts[:100_000])
        return math.sqrt(sample.shape[1]) / sample.norm(dim=1).mean().item()

    def _resume(self) -> None:
        path = self.workdir / "checkpoint.pt"
        if not path.exists():
            with torch.no_grad():  # centre the pre-activations at initialisation
                self.sae.b_dec.copy_(self.batch(0).mean(0))
            return
        state = torch.load(path, weights_only=False)
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.threshold, self.history = state["step"], state["threshold"], state["history"]
        self.last_fired = state["last_fired"]
        print(f"resuming SAE training at step {self.step}/{self.steps}")

    def _checkpoint(self) -> None:
        state = {
            "sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "threshold": self.threshold, "last_fired": self.last_fired, "history": self.history,
        }  # fmt: skip
        partial = self.workdir / "checkpoint.pt.partial"
        torch.save(state, partial)
        partial.rename(self.workdir / "checkpoint.pt")

    @torch.no_grad()
    def train_step(self, x: torch.Tensor) -> dict:
        cfg, sae = self.cfg, self.sae
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup_steps) * min(1.0, 5 * (1 - self.step / self.steps))
        self.optimizer.zero_grad(set_to_none=True)
        centred = x - sae.b_dec
        pre = centred @ sae.W_enc + sae.b_enc
        rows, cols = batch_topk(pre, cfg.k)
        main = SparseStep(sae, centred, pre, rows, cols)
        recon = main.decode() + sae.b_dec
        variance = (x - x.mean(0)).pow(2).sum()
        fvu = (recon - x).pow(2).sum() / variance
        grad = 2 * (recon - x) / variance
        main.backward(grad)
        _accumulate(sae.b_dec, grad.sum(0))
        seen = (self.step + 1) * cfg.batch
        self.last_fired[cols.unique()] = seen
        dead = (seen - self.last_fired) > cfg.dead_after_tokens
        aux = torch.zeros(())
        if dead.any():
            # AuxK: the dead latents' top activations model what the live ones leave unexplained.
            top = torch.topk(pre.masked_fill(~dead, -math.inf), min(cfg.aux_k, int(dead.sum())), dim=1)
            positive = top.values.flatten() > 0
            aux_rows = torch.arange(len(x)).repeat_interleave(top.indices.shape[1])[positive]
            if len(aux_rows):
                step = SparseStep(sae, centred, pre, aux_rows, top.indices.flatten()[positive])
                error = x - recon
                error_variance = (error - error.mean(0)).pow(2).sum()
                aux_recon = step.decode()
                aux = (aux_recon - error).pow(2).sum() / error_variance
                step.backward(cfg.aux_alpha * 2 * (aux_recon - error) / error_variance)
        self.optimizer.step()
        sae.normalize_decoder()
        smallest = main.values.min().item()
        decay = cfg.threshold_decay if self.step else 0.0
        self.threshold = decay * self.threshold + (1 - decay) * smallest
        return {"step": self.step, "fvu": fvu.item(), "aux": aux.item(), "l0": len(rows) / len(x), "dead": dead.float().mean().item()}

    def fit(self) -> None:
        bar = tqdm(total=self.steps, initial=self.step, desc="training SAE", unit="step")
        while self.step < self.steps:
            stats = self.train_step(self.batch(self.step))
            self.step += 1
            if self.step % 10 == 0:
                self.history.append(stats)
            bar.set_postfix(fvu=f"{stats['fvu']:.3f}", dead=f"{stats['dead']:.3f}", theta=f"{self.threshold:.3f}")
            bar.update()
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.steps:
                self._checkpoint()
        bar.close()

    def inference_weights(self) -> dict[str, torch.Tensor]:
        """The JumpReLU SAE on raw residuals: the input scale folded into the weights.

        pre = (x*c - b_dec) @ W_enc + b_enc = (x - b_dec/c) @ (c*W_enc) + b_enc, and the
        reconstruction (f @ W_dec + b_dec)/c, so W_enc*c, W_dec/c, b_dec/c; activations unchanged.
        """
        c, sae = self.scale, self.sae
        return {
            "W_enc": (sae.W_enc.detach() * c).contiguous(),
            "b_enc": sae.b_enc.detach().clone(),
            "W_dec": (sae.W_dec.detach() / c).contiguous(),
            "b_dec": (sae.b_dec.detach() / c).contiguous(),
            "threshold": torch.full((self.cfg.d_sae,), self.threshold),
        }

    def summary(self) -> dict:
        return {"config": asdict(self.cfg), "steps": self.steps, "input_scale": self.scale, "threshold": self.threshold}


def save_history_plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["fvu"] for h in history])
    axes[0].set(xlabel="step", ylabel="fraction of variance unexplained", yscale="log", title="reconstruction")
    axes[1].plot(steps, [h["dead"] for h in history])
    axes[1].set(xlabel="step", ylabel="fraction of latents dead", title="dead latents")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
