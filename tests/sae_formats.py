"""Fixtures in the SAE formats people publish, each with its format's own encode, written from that
format's documented formula (not from features/formats.py): what a loaded SAE must match.

Each writer puts one SAE in its format's real layout (file names, tensor names and orientations,
config keys), built on directions that really fire on the activations `x` it is given (the top
principal directions first), and returns the `--sae` source and the reference encode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

Encode = Callable[[torch.Tensor], torch.Tensor]
D_SAE = 128
K = 12


@dataclass(frozen=True)
class Written:
    source: str  # what `--sae ID=` takes
    encode: Encode  # the format's own formula: activations [T, d_sae] of residual vectors [T, d_in]


def directions(x: torch.Tensor, d_sae: int, seed: int) -> torch.Tensor:
    """[d_sae, d_in] unit rows: x's top principal directions, then random ones."""
    g = torch.Generator().manual_seed(seed)
    n_pc = min(32, x.shape[0] - 1, x.shape[1])
    principal = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[:n_pc]
    rand = torch.randn(d_sae - n_pc, x.shape[1], generator=g)
    return torch.cat([principal, rand / rand.norm(dim=1, keepdim=True)])


def _topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))


def _norms(g: torch.Generator, n: int) -> torch.Tensor:
    """Decoder row norms that are not 1, so a format's use of them matters."""
    return 0.5 + torch.rand(n, generator=g)


def saelens_v6_topk(root: Path, x: torch.Tensor, layer: int, seed: int = 0) -> Written:
    """SAELens v6: hook in `metadata`, TopK with rescale_acts_by_decoder_norm (pre * |W_dec[i]|, top k, ReLU)."""
    g, d = torch.Generator().manual_seed(seed), x.shape[1]
    dirs = directions(x, D_SAE, seed)
    W_enc, b_dec = dirs.T.contiguous(), x.mean(0)
    W_dec = dirs * _norms(g, D_SAE)[:, None]
    b_enc = torch.randn(D_SAE, generator=g) * 0.01
    cfg = {
        "d_in": d, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1", "model_name": "SmolLM2-135M-Instruct",
            "hook_name": f"blocks.{layer}.hook_resid_post", "hook_head_index": None, "context_size": 512,
            "prepend_bos": True, "seqpos_slice": [None], "model_from_pretrained_kwargs": {}, "dataset_path": "local",
            "model_class_name": "HookedTransformer", "exclude_special_tokens": False,
            "sequence_separator_token": "bos", "disable_concat_sequences": False,
        },
        "k": K, "rescale_acts_by_decoder_norm": True, "architecture": "topk",
    }  # fmt: skip
    path = root / "saelens-v6-topk"
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, path / "sae_weights.safetensors")

    def encode(v: torch.Tensor) -> torch.Tensor:
        return _topk(((v - b_dec) @ W_enc + b_enc) * W_dec.norm(dim=-1), K)

    return Written(str(path), encode)


def saelens_v6_layer_norm(root: Path, x: torch.Tensor, layer: int, seed: int = 0) -> Written:
    """SAELens v6 JumpReLU with `layer_norm` input, its hook given only as `hf_hook_name`."""
    g, d = torch.Generator().manual_seed(seed), x.shape[1]
    dirs = directions(x, D_SAE, seed)
    normed = _layer_norm(x)
    W_enc, b_dec = dirs.T.contiguous() * 2.0, normed.mean(0)
    threshold = ((normed - b_dec) @ W_enc).median(0).values.clamp_min(1e-3)
    cfg = {
        "d_in": d, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.5.1", "model_name": "SmolLM2-135M-Instruct", "hf_hook_name": f"model.layers.{layer}.output"},
        "architecture": "jumprelu",
    }  # fmt: skip
    weights = {"W_enc": W_enc, "b_enc": torch.zeros(D_SAE), "W_dec": dirs * _norms(g, D_SAE)[:, None], "b_dec": b_dec, "threshold": threshold}
    path = root / "saelens-v6-layer-norm"
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, path / "sae_weights.safetensors")

    def encode(v: torch.Tensor) -> torch.Tensor:
        pre = (_layer_norm(v) - b_dec) @ W_enc
        return torch.relu(pre) * (pre > threshold)

    return Written(str(path), encode)


def _layer_norm(v: torch.Tensor) -> torch.Tensor:
    """SAELens's and OpenAI's input layer norm: centred, over (unbiased std + 1e-5)."""
    centred = v - v.mean(dim=-1, keepdim=True)
    return centred / (centred.std(dim=-1, keepdim=True) + 1e-5)


def saelens_v5_resid_pre(root: Path, x: torch.Tensor, layer: int, seed: int = 0) -> Written:
    """A pre-6.0 SAELens config: `hook_point` (resid_pre of the next layer), `activation_fn_str`, no
    architecture or apply_b_dec_to_input (SAELens's defaults: standard, true), and a scaling factor
    in `activation_scaler.json`."""
    g, d = torch.Generator().manual_seed(seed), x.shape[1]
    factor = math.sqrt(d) / float(x.norm(dim=-1).mean())
    dirs = directions(x, D_SAE, seed)
    b_dec = x.mean(0) * factor
    cfg = {
        "model_name": "SmolLM2-135M-Instruct", "hook_point": f"blocks.{layer + 1}.hook_resid_pre", "hook_point_layer": layer + 1,
        "hook_point_head_index": None, "d_in": d, "d_sae": D_SAE, "activation_fn_str": "relu",
        "normalize_activations": "expected_average_only_in", "sae_lens_training_version": "3.13.0", "context_size": 512,
    }  # fmt: skip
    b_enc = -torch.rand(D_SAE, generator=g)
    path = root / "saelens-v5"
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": factor}))
    save_file({"W_enc": dirs.T.contiguous() * 3, "b_enc": b_enc, "W_dec": dirs.clone(), "b_dec": b_dec}, path / "sae_weights.safetensors")

    def encode(v: torch.Tensor) -> torch.Tensor:
        return torch.relu((v * factor - b_dec) @ (dirs.T * 3) + b_enc)

    return Written(str(path), encode)


def gemma_scope(root: Path, x: torch.Tensor, layer: int, seed: int = 0) -> Written:
    """Gemma Scope: `layer_<L>/width_<W>/average_l0_<K>/params.npz`; (pre > threshold) * relu(pre), no b_dec on the input."""
    g = torch.Generator().manual_seed(seed)
    dirs = directions(x, D_SAE, seed)
    W_enc, b_enc = dirs.T.contiguous(), torch.randn(D_SAE, generator=g) * 0.1
    threshold = (x @ W_enc + b_enc).median(0).values.clamp_min(1e-3)
    path = root / "gemma-scope-2b-pt-res" / f"layer_{layer}" / "width_16k" / "average_l0_71"
    path.mkdir(parents=True)
    params = {"W_enc": W_enc, "W_dec": dirs * _norms(g, D_SAE)[:, None], "b_enc": b_enc, "b_dec": torch.randn(x.shape[1], generator=g), "threshold": threshold}
    np.savez(path / "params.npz", **{name: value.numpy() for name, value in params.items()})

    def encode(v: torch.Tensor) -> torch.Tensor:
        pre = v @ W_enc + b_enc
        return (pre > threshold) * torch.relu(pre)

    return Written(str(path), encode)


def gemma_scope_2(root: Path, x: torch.Tensor, layer: int, seed: int = 0) -> Written:
    """Gemma Scope 2: `resid_post/layer_<L>_width_<W>_l0_<size>/` with `params.safetensors`
    (lowercase names) and `config.json`; the same JumpReLU."""
    g = torch.Generator().manual_seed(seed)
    dirs = directions(x, D_SAE, seed)
    w_enc, b_enc = dirs.T.contiguous() * 1.5, torch.randn(D_SAE, generator=g) * 0.1
    threshold = (x @ w_enc + b_enc).median(0).values.clamp_min(1e-3)
    path = root / "gemma-scope-2-1b-pt" / "resid_post" / f"layer_{layer}_width_16k_l0_small"
    path.mkdir(parents=True)
    config = {"architecture": "jump_relu", "model_name": "google/gemma-3-1b-pt", "hf_hook_point_in": f"model.layers.{layer}.output",
              "hf_hook_point_out": f"model.layers.{layer}.output", "width": D_SAE, "l0": 20, "affine_connection": False, "type": "sae"}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    params = {"w_enc": w_enc, "w_dec": dirs.clone(), "b_enc": b_enc, "b_dec": torch.zeros(x.shape[1]), "threshold": threshold}
    save_file(params, path / "params.safetensors")

    def encode(v: torch.Tensor) -> torch.Tensor:
        pre = v @ w_enc + b_enc
        return (pre > threshold) * torch.relu(pre)

    return Written(str(path), encode)


def llama_scope(root: Path, x: torch.Tensor, layer: int, seed: int = 0) -> Written:
    """Llama Scope (OpenMOSS lm_saes): `hyperparams.json` + `checkpoints/final.safetensors`; input
    times sqrt(d_model) / its dataset-average norm, JumpReLU on pre * |decoder column| > θ."""
    g, d = torch.Generator().manual_seed(seed), x.shape[1]
    avg_in = float(x.norm(dim=-1).mean())
    s_in = math.sqrt(d) / avg_in
    dirs = directions(x, D_SAE, seed)
    enc, enc_b = dirs * 2.0, torch.randn(D_SAE, generator=g) * 0.05  # [d_sae, d_model]
    dec = (dirs * _norms(g, D_SAE)[:, None]).T.contiguous()  # [d_model, d_sae]
    theta = float(((x * s_in) @ enc.T + enc_b).mul(dec.norm(dim=0)).median())
    hyper = {
        "hook_point_in": f"blocks.{layer}.hook_resid_post", "hook_point_out": f"blocks.{layer}.hook_resid_post",
        "d_model": d, "d_sae": D_SAE, "expansion_factor": D_SAE // d or 1, "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False, "act_fn": "jumprelu", "jump_relu_threshold": theta, "top_k": 50,
        "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": avg_in, "out": avg_in * 1.25},
        "sparsity_include_decoder_norm": True, "use_glu_encoder": False, "dtype": "torch.float32",
    }  # fmt: skip
    path = root / "Llama3_1-8B-Base-LXR-8x" / f"Llama3_1-8B-Base-L{layer}R-8x"
    (path / "checkpoints").mkdir(parents=True)
    (path / "hyperparams.json").write_text(json.dumps(hyper))
    weights = {"encoder.weight": enc, "encoder.bias": enc_b, "decoder.weight": dec, "decoder.bias": torch.randn(d, generator=g) * 0.1}
    save_file(weights, path / "checkpoints" / "final.safetensors")

    def encode(v: torch.Tensor) -> torch.Tensor:
        pre = (v * s_in) @ enc.T + enc_b
        return pre * (pre * dec.norm(dim=0) > theta)

    return Written(str(path), encode)


def sparsify(root: Path, x: torch.Tensor, layer: int, seed: int = 0) -> Written:
    """EleutherAI sparsify: `<run>/layers.<L>/cfg.json` + `sae.safetensors`; relu((x - b_dec) @ W^T + b), then top k."""
    g, d = torch.Generator().manual_seed(seed), x.shape[1]
    dirs = directions(x, D_SAE, seed)
    b_dec = x.mean(0)
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d}  # fmt: skip
    path = root / "sae-smollm2" / f"layers.{layer}"
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    (path.parent / "config.json").write_text(json.dumps({"sae": cfg, "hookpoints": [f"layers.{layer}"]}))
    enc_b = torch.randn(D_SAE, generator=g) * 0.01
    save_file({"encoder.weight": dirs.clone(), "encoder.bias": enc_b, "W_dec": dirs.clone(), "b_dec": b_dec}, path / "sae.safetensors")

    def encode(v: torch.Tensor) -> torch.Tensor:
        return _topk(torch.relu((v - b_dec) @ dirs.T + enc_b), K)

    return Written(str(path), encode)


def goodfire(root: Path, x: torch.Tensor, layer: int, seed: int = 0) -> Written:
    """Goodfire: a torch state dict, `<model>-SAE-l<L>.pth`; relu(encoder_linear(x)), no b_dec on the input."""
    g, d = torch.Generator().manual_seed(seed), x.shape[1]
    dirs = directions(x, D_SAE, seed)
    enc_b = -(x @ dirs.T).median(0).values
    state = {
        "encoder_linear.weight": dirs.clone(), "encoder_linear.bias": enc_b,
        "decoder_linear.weight": dirs.T.contiguous(), "decoder_linear.bias": torch.randn(d, generator=g) * 0.1,
    }  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"SmolLM2-135M-Instruct-SAE-l{layer}.pth"
    torch.save(state, path)

    def encode(v: torch.Tensor) -> torch.Tensor:
        return torch.relu(v @ dirs.T + enc_b)

    return Written(str(path), encode)


def openai(root: Path, x: torch.Tensor, layer: int, seed: int = 0) -> Written:
    """openai/sparse_autoencoder: `<location>/autoencoders/<L>.pt`, a TopK autoencoder's state dict;
    layer-normed input, act((x - pre_bias) @ W^T + latent_bias), top k then ReLU."""
    g = torch.Generator().manual_seed(seed)
    dirs = directions(_layer_norm(x), D_SAE, seed)
    pre_bias = _layer_norm(x).mean(0)
    state = {
        "pre_bias": pre_bias, "latent_bias": torch.randn(D_SAE, generator=g) * 0.01, "encoder.weight": dirs.clone(),
        "decoder.weight": dirs.T.contiguous(), "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
        "activation": "TopK", "activation_state_dict": {"k": K, "postact_fn": "ReLU"},
    }  # fmt: skip
    path = root / "resid_post_mlp_v5_32k" / "autoencoders" / f"{layer}.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    def encode(v: torch.Tensor) -> torch.Tensor:
        return _topk((_layer_norm(v) - pre_bias) @ dirs.T + state["latent_bias"], K)

    return Written(str(path), encode)


WRITERS: dict[str, Callable[[Path, torch.Tensor, int, int], Written]] = {
    "saelens-v6-topk": saelens_v6_topk,
    "saelens-v6-layer-norm": saelens_v6_layer_norm,
    "saelens-v5": saelens_v5_resid_pre,
    "gemma-scope": gemma_scope,
    "gemma-scope-2": gemma_scope_2,
    "llama-scope": llama_scope,
    "sparsify": sparsify,
    "goodfire": goodfire,
    "openai": openai,
}
# The format each is read as.
FORMAT_OF = {
    "saelens-v6-topk": "saelens", "saelens-v6-layer-norm": "saelens", "saelens-v5": "saelens",
    "gemma-scope": "gemma_scope", "gemma-scope-2": "gemma_scope_2", "llama-scope": "llama_scope",
    "sparsify": "sparsify", "goodfire": "goodfire", "openai": "openai",
}  # fmt: skip


def gguf_control_vector(path: Path, directions: dict[int, torch.Tensor], model_hint: str = "llama") -> Path:
    """A control vector as repeng's `export_gguf` writes it: `direction.<layer>` float32 tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, vector in directions.items():
        writer.add_tensor(f"direction.{layer}", vector.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
