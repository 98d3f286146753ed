"""The SAE trainer's hand-written sparse gradients and its JumpReLU export, on small tensors,
against autograd and against the loader's own encoder."""

from __future__ import annotations

import numpy as np
import torch

from features.formats import load_sae, save_sae
from features.train import BatchTopKSAE, SparseStep, TrainConfig, Trainer, batch_topk


def test_batch_topk_keeps_the_k_times_b_largest():
    pre = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    rows, cols = batch_topk(pre, 3)
    # the k*B largest among each token's own 2k = 6 largest (a token keeps at most 2k)
    candidates = torch.full_like(pre, -float("inf"))
    per_row = torch.topk(pre, 6, dim=1)
    candidates.scatter_(1, per_row.indices, per_row.values)
    top = torch.topk(candidates.flatten(), 48)
    capped = {i for i, v in zip(top.indices.tolist(), top.values.tolist()) if v > 0}
    got = set((rows * 40 + cols).tolist())
    assert got == capped
    assert torch.all(rows[1:] >= rows[:-1]), "pairs come in row order"


def test_sparse_gradients_match_autograd():
    g = torch.Generator().manual_seed(1)
    sae = BatchTopKSAE(8, 32, g)
    with torch.no_grad():
        sae.b_enc.normal_(generator=g)
        sae.b_dec.normal_(generator=g)
    x = torch.randn(16, 8, generator=g)
    target = torch.randn(16, 8, generator=g)

    with torch.no_grad():
        centred = x - sae.b_dec
        pre = centred @ sae.W_enc + sae.b_enc
    rows, cols = batch_topk(pre, 3)
    step = SparseStep(sae, centred, pre, rows, cols)
    out = step.decode()
    grad_out = 2 * (out - target)
    step.backward(grad_out)
    ours = {name: p.grad.clone() for name, p in sae.named_parameters()}

    sae.zero_grad(set_to_none=True)
    pre_ref = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    mask = torch.zeros_like(pre_ref)
    mask[rows, cols] = 1.0
    ref_out = (pre_ref * mask) @ sae.W_dec
    torch.testing.assert_close(out, ref_out.detach())
    (ref_out - target).pow(2).sum().backward()
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, msg=name)


def test_jumprelu_export_folds_the_input_scale(tmp_path):
    g = torch.Generator().manual_seed(2)
    raw = (torch.randn(4096 * 2, 16, generator=g) * 7 + 3).to(torch.bfloat16)
    trainer = Trainer(raw.view(torch.uint16).numpy(), TrainConfig(d_sae=64, k=4, batch=4096, warmup_steps=1), tmp_path)
    trainer.fit()
    assert trainer.threshold > 0
    weights = trainer.inference_weights()
    cfg = {"architecture": "jumprelu", "d_in": 16, "d_sae": 64, "hook_name": "blocks.3.hook_resid_post",
           "apply_b_dec_to_input": True, "normalize_activations": "none"}  # fmt: skip
    served = load_sae("t", save_sae(tmp_path / "sae", cfg, weights))
    x = raw[:256].float()
    scaled = x * trainer.scale
    sae = trainer.sae
    pre = ((scaled - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    expected = pre * (pre > trainer.threshold)
    torch.testing.assert_close(served.encode(x), expected, rtol=1e-4, atol=1e-4)
    recon_scaled = expected @ sae.W_dec.detach() + sae.b_dec.detach()
    recon = served.encode(x) @ served.W_dec + served.b_dec
    torch.testing.assert_close(recon, recon_scaled / trainer.scale, rtol=1e-4, atol=1e-4)
    # resuming from the checkpoint continues where training stopped
    resumed = Trainer(raw.view(torch.uint16).numpy(), TrainConfig(d_sae=64, k=4, batch=4096, warmup_steps=1), tmp_path)
    assert resumed.step == trainer.steps and np.isclose(resumed.threshold, trainer.threshold)


def test_training_windows_read_every_chat_and_spread_the_rest():
    from features.build import training_windows

    keep = training_windows(total=100, chat_windows=30, budget=50)
    assert list(keep[:30]) == list(range(30)), "every chat window, when the budget allows"
    public = keep[30:]
    assert len(public) == 20 and public[0] == 30 and public[-1] == 99 and len(set(public)) == 20
    assert max(np.diff(public)) - min(np.diff(public)) <= 1, "public windows evenly spread"
    small = training_windows(total=100, chat_windows=30, budget=10)
    assert len(small) == 10 and small.max() < 30 and len(set(small)) == 10, "a small budget spreads over the chats"
    assert list(training_windows(total=40, chat_windows=30, budget=500)) == list(range(40)), "never past the end"
