"""SAE files as people publish them, each read into the canonical form features/sae.py computes with.

`load_sae(id, SOURCE)`: SOURCE is `[FORMAT:]PATH[@LAYER]`. The format is worked out from what is at
PATH unless named; LAYER gives the layer where the files do not (Goodfire, OpenAI). Each reader
follows its format's own loader or reference code, and maps it onto SAELens's encode
(normalise, subtract b_dec where the format does, pre = xin @ W_enc + b_enc, activation):

- `saelens`: a directory, `cfg.json` + `sae_weights.safetensors`, v5 or v6 (`hook_name` at the top
  or in `metadata`, pre-6.0 key names, `apply_b_dec_to_input` true unless the file says otherwise;
  `expected_average_only_in` reads its factor from `activation_scaler.json` when present, else from
  `norm_scaling_factor`, else is the identity, as in SAELens). A TopK SAE's
  `rescale_acts_by_decoder_norm` is folded in: W_enc's columns and b_enc times the decoder rows'
  norms, the rows divided by them; the same activations and reconstruction, as a plain TopK.
- `gemma_scope`: `params.npz` (JumpReLU, no b_dec on the input); the layer from its
  `layer_<L>/width_<W>/average_l0_<K>` path. `gemma_scope_2`: `params.safetensors` + `config.json`,
  lowercase tensor names, the layer from `hf_hook_point_in` or the `layer_<L>_width_...` path.
- `llama_scope`: `hyperparams.json` + `checkpoints/final.safetensors`, as OpenMOSS's lm_saes trains
  it: input times sqrt(d_model) / its dataset-average norm, a JumpReLU whose scalar threshold is
  compared with pre * |decoder column| where `sparsity_include_decoder_norm` (so the canonical
  per-feature threshold is θ / |column|), the decoder's output divided by the output's own factor.
- `sparsify`: one hookpoint's directory, `cfg.json` + `sae.safetensors` (x - b_dec, ReLU, TopK).
- `goodfire`: a `.pth`/`.pt` state dict (`encoder_linear`, `decoder_linear`, ReLU); the layer from
  a `-l<L>` in its name.
- `openai`: openai/sparse_autoencoder's `.pt` (TopK or ReLU; a TopK one layer-norms its input).

Torch files are read with `weights_only=True` and never unpickled otherwise. A hook we cannot
steer (attention or MLP outputs, transcoders) is refused naming it; a truncated file, a wrong
shape, a NaN or a missing key stops loading with SAEFormatError naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from features.calibration import Calibrations
from features.sae import ARCHITECTURES, NORMALIZATIONS, SAE, SAEConfig, SAEFormatError, layer_of_hook

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
STATISTICS_FILE = "feature_statistics.safetensors"  # ours: per-feature max_act, in any format's `description_dir`
DEFAULT_SAE = Path(__file__).parent / "default"  # the default model's own SAE (python -m features.build)

Weights = dict[str, torch.Tensor]
Read = tuple[SAEConfig, Weights, tuple[Path, ...]]  # what a reader gives: config, canonical weights, files read


def load_sae(sae_id: str, source: str | Path) -> SAE:
    """Load and check an SAE from `[FORMAT:]PATH[@LAYER]`; any problem raises SAEFormatError."""
    fmt, path, layer = parse_source(str(source))
    fmt = fmt or detect(path)
    cfg, weights, files = READERS[fmt](path, layer)
    cls = ARCHITECTURES[cfg.architecture]
    cls.check_config(cfg, files[0])
    _check_weights(files[-1], cfg, cls, weights)
    stats = description_dir(path) / STATISTICS_FILE
    max_act = _load_max_act(stats, cfg.d_sae)
    files = (*files, stats) if max_act is not None else files
    canonical = f"{fmt}:{path.resolve()}" + (f"@{layer}" if layer is not None else "")
    # Calibrations are in multiples of max_act: an SAE without statistics has none.
    calibrations = Calibrations(description_dir(path)) if max_act is not None else None
    return cls(sae_id, path, cfg, weights, max_act, source=canonical, files=files, calibrations=calibrations)


def parse_source(source: str) -> tuple[str | None, Path, int | None]:
    """(format or None, path, layer or None) of `[FORMAT:]PATH[@LAYER]`."""
    fmt, sep, rest = source.partition(":")
    if not sep or fmt not in READERS:
        fmt, rest = None, source
    layer = None
    if match := re.fullmatch(r"(.+)@(\d+)", rest):
        rest, layer = match.group(1), int(match.group(2))
    return fmt, Path(rest), layer


def detect(path: Path) -> str:
    """The format of what is at `path`, from its files' names (and a torch file's keys)."""
    if path.is_dir():
        for fmt, marker in DIRECTORY_MARKERS:
            if all((path / name).exists() for name in marker):
                return fmt
        raise SAEFormatError(path, f"no SAE here: expected one of {[' + '.join(m) for _, m in DIRECTORY_MARKERS]}")
    if not path.exists():
        raise SAEFormatError(path, "no such file or directory")
    if path.name == "params.npz":
        return "gemma_scope"
    if path.suffix in (".pt", ".pth"):
        keys = _torch_state(path)
        if "encoder_linear.weight" in keys:
            return "goodfire"
        if "pre_bias" in keys and "latent_bias" in keys:
            return "openai"
        raise SAEFormatError(path, f"a torch state dict of unknown layout (keys {sorted(keys)[:8]}); name the format")
    raise SAEFormatError(path, f"cannot tell the SAE format of this file; name one of {sorted(READERS)} as FORMAT:PATH")


def description_dir(path: Path) -> Path:
    """Where an SAE's statistics and catalogue live (features/describe.py): its directory, or
    beside a single file, `<file>.features/`."""
    return path if path.is_dir() else path.with_name(path.name + ".features")


def save_sae(path: str | Path, cfg: dict, weights: Weights, max_act: torch.Tensor | None = None) -> Path:
    """Write an SAE directory in SAELens's format (used by tests and by the SAE builder)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, path / WEIGHTS_FILE)
    if max_act is not None:
        save_file({"max_act": max_act.contiguous()}, path / STATISTICS_FILE)
    return path


# --- SAELens -------------------------------------------------------------------------------------

_PRE_6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}


def read_saelens(path: Path, layer: int | None) -> Read:
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    raw = {_PRE_6_RENAMES.get(k, k): v for k, v in _json(cfg_file).items()}
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    hook = raw.get("hook_name") or meta.get("hook_name") or raw.get("hf_hook_name") or meta.get("hf_hook_name")
    if raw.get("hook_head_index") is not None or meta.get("hook_head_index") is not None or raw.get("reshape_activations") == "hook_z":
        raise SAEFormatError(cfg_file, f"hook {hook!r} reads attention heads (hook_z); steerserve steers the residual stream")
    if "transcoder" in str(raw.get("architecture", "")) or raw.get("hook_name_out") or meta.get("hook_name_out"):
        raise SAEFormatError(cfg_file, "a transcoder (reads one hook, writes another): steerserve steers with SAEs only")
    arch = str(raw.get("architecture") or "standard")
    if raw.get("activation_fn") == "topk":  # pre-6.0 TopK
        arch = "topk"
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    norm = raw.get("normalize_activations")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)  # pre-6.0 booleans
    factor = raw.get("norm_scaling_factor")
    if (path / "activation_scaler.json").exists():
        factor = _json(path / "activation_scaler.json").get("scaling_factor", factor)
    if norm == "expected_average_only_in" and factor is None:
        norm = "none"  # SAELens runs it as the identity when nothing gives the factor
    cfg = _config(cfg_file, arch, raw.get("d_in"), raw.get("d_sae"), hook, raw.get("apply_b_dec_to_input", True), norm, factor, k, layer)
    weights = _tensors(weights_file, load_file)
    if arch == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        weights = _fold_decoder_norm(weights_file, weights)
    return cfg, weights, (cfg_file, weights_file)


def _fold_decoder_norm(file: Path, weights: Weights) -> Weights:
    """TopK on pre * |W_dec[i]| with activations divided by it before decoding, as a plain TopK."""
    norm = _need(file, weights, "W_dec").float().norm(dim=-1)
    return {**weights, "W_enc": weights["W_enc"] * norm, "b_enc": weights["b_enc"] * norm, "W_dec": weights["W_dec"] / norm[:, None]}


# --- Gemma Scope ---------------------------------------------------------------------------------


def read_gemma_scope(path: Path, layer: int | None) -> Read:
    file = path / "params.npz" if path.is_dir() else path
    try:
        with np.load(file, allow_pickle=False) as npz:
            raw = {name: torch.from_numpy(npz[name].astype(np.float32)) for name in npz.files}
    except Exception as exc:  # numpy raises several types for a bad file
        raise SAEFormatError(file, f"cannot read Gemma Scope params: {exc}") from exc
    weights = {name: _need(file, raw, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    if kind := re.search(r"gemma-scope-[^/]*-(mlp|att|transcoders)(-|/|$)", str(file.resolve())):
        what = {"mlp": "MLP-output", "att": "attention-output", "transcoders": "transcoder"}[kind.group(1)]
        raise SAEFormatError(file, f"a Gemma Scope {what} SAE ({kind.group(0).strip('-/')}): steerserve steers the residual stream (-res)")
    found = re.search(r"layer_(\d+)/width_[^/]+/average_l0_\d+", str(file.resolve()))
    hook = f"blocks.{found.group(1)}.hook_resid_post" if found else None
    return _config(file, "jumprelu", *_dims(weights), hook, False, "none", None, None, layer), weights, (file,)


def read_gemma_scope_2(path: Path, layer: int | None) -> Read:
    cfg_file, file = path / "config.json", path / "params.safetensors"
    raw = _json(cfg_file)
    if str(raw.get("architecture", "jump_relu")) != "jump_relu":
        raise SAEFormatError(cfg_file, f"architecture {raw.get('architecture')!r}: Gemma Scope 2 SAEs are 'jump_relu'")
    kind = re.search(r"(^|/)(resid_post|attn_out|mlp_out|transcoder|clt)[^/]*/layer_(\d+)_width", str(path.resolve()))
    if kind and kind.group(2) != "resid_post":
        raise SAEFormatError(path, f"a Gemma Scope 2 {kind.group(2)} SAE: steerserve steers the residual stream (resid_post)")
    hook = raw.get("hf_hook_point_in") or (f"model.layers.{kind.group(3)}" if kind else None)
    if raw.get("hf_hook_point_out", hook) != hook:
        raise SAEFormatError(cfg_file, "a transcoder (reads one hook, writes another): steerserve steers with SAEs only")
    lower = _tensors(file, load_file)
    weights = {name: _need(file, lower, name.lower()) for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    return _config(cfg_file, "jumprelu", *_dims(weights), hook, False, "none", None, None, layer), weights, (cfg_file, file)


# --- Llama Scope ---------------------------------------------------------------------------------


def read_llama_scope(path: Path, layer: int | None) -> Read:
    cfg_file, file = path / "hyperparams.json", path / "checkpoints" / "final.safetensors"
    raw = _json(cfg_file)
    hook_in, hook_out = raw.get("hook_point_in"), raw.get("hook_point_out", raw.get("hook_point_in"))
    if hook_in != hook_out:
        raise SAEFormatError(cfg_file, f"a transcoder ({hook_in!r} -> {hook_out!r}): steerserve steers with SAEs only")
    d_in, act = raw.get("d_model"), str(raw.get("act_fn", "relu")).lower().replace("_", "")
    t = _tensors(file, load_file)
    enc, dec = _need(file, t, "encoder.weight"), _need(file, t, "decoder.weight")
    if enc.dim() != 2 or dec.dim() != 2 or tuple(dec.shape) != tuple(enc.shape)[::-1]:
        raise SAEFormatError(file, f"encoder.weight {tuple(enc.shape)} and decoder.weight {tuple(dec.shape)} are not [d_sae, d_model] and [d_model, d_sae]")
    s_in = s_out = 1.0
    norm, scaling = "none", str(raw.get("norm_activation", "dataset-wise"))
    if scaling == "dataset-wise":
        average = raw.get("dataset_average_activation_norm") or {}
        if not all(isinstance(average.get(k), (int, float)) and average[k] > 0 for k in ("in", "out")):
            raise SAEFormatError(cfg_file, "norm_activation 'dataset-wise' needs positive dataset_average_activation_norm.in and .out")
        s_in, s_out = math.sqrt(d_in) / average["in"], math.sqrt(d_in) / average["out"]
        norm = "expected_average_only_in"
    elif scaling == "token-wise":
        norm = "constant_norm_rescale"
    elif scaling not in ("inference", "none"):
        raise SAEFormatError(cfg_file, f"norm_activation {scaling!r} is not one of dataset-wise, token-wise, inference")
    if raw.get("apply_decoder_bias_to_pre_encoder") and s_in != s_out:
        raise SAEFormatError(cfg_file, "apply_decoder_bias_to_pre_encoder with different input and output norms is not supported")
    # The decoder's output, in the output's normalised units, divided by s_out; canonically every
    # decode divides by the input's scale, so the decoder carries s_in / s_out.
    weights = {
        "W_enc": enc.T.float(),
        "b_enc": t.get("encoder.bias", torch.zeros(enc.shape[0])).float(),
        "W_dec": dec.T.float() * (s_in / s_out),
        "b_dec": t.get("decoder.bias", torch.zeros(enc.shape[1])).float() * (s_in / s_out),
    }
    k = None
    if act == "jumprelu":
        theta = raw.get("jump_relu_threshold")
        if not isinstance(theta, (int, float)):
            raise SAEFormatError(cfg_file, "act_fn 'jumprelu' needs a numeric jump_relu_threshold")
        column = dec.float().norm(dim=0) if raw.get("sparsity_include_decoder_norm", True) else torch.ones(enc.shape[0])
        weights["threshold"] = torch.where(column > 0, theta / column, torch.finfo(torch.float32).max)  # a zero column never fires
        arch = "jumprelu"
    elif act == "topk" and not raw.get("sparsity_include_decoder_norm", True):
        arch, k = "topk", raw.get("top_k")
    elif act == "relu":
        arch = "standard"
    else:
        raise SAEFormatError(cfg_file, f"act_fn {raw.get('act_fn')!r} (with sparsity_include_decoder_norm) is not supported: jumprelu, relu, topk without decoder norm")
    d_sae = enc.shape[0]
    cfg = _config(cfg_file, arch, d_in, d_sae, hook_in, bool(raw.get("apply_decoder_bias_to_pre_encoder")), norm, s_in, k, layer)
    return cfg, weights, (cfg_file, file)


# --- EleutherAI sparsify -------------------------------------------------------------------------


def read_sparsify(path: Path, layer: int | None) -> Read:
    cfg_file, file = path / CONFIG_FILE, path / "sae.safetensors"
    raw = _json(cfg_file)
    if raw.get("transcode") or raw.get("skip_connection"):
        raise SAEFormatError(cfg_file, "a transcoder or skip connection: steerserve steers with SAEs only")
    if raw.get("activation", "topk") != "topk":
        raise SAEFormatError(cfg_file, f"activation {raw.get('activation')!r}: only sparsify's 'topk' is supported")
    t = _tensors(file, load_file)
    enc = _need(file, t, "encoder.weight")
    weights = {"W_enc": enc.T, "b_enc": _need(file, t, "encoder.bias"), "W_dec": _need(file, t, "W_dec"), "b_dec": _need(file, t, "b_dec")}
    d_sae = _dims(weights)[1]
    hook = path.name if path.name.startswith("layers.") else None  # the hookpoint; layer_of_hook refuses all but layers.N
    cfg = _config(cfg_file, "topk", raw.get("d_in"), d_sae, hook, True, "none", None, raw.get("k"), layer)
    return cfg, weights, (cfg_file, file)


# --- Torch state dicts: Goodfire and OpenAI ------------------------------------------------------


def read_goodfire(path: Path, layer: int | None) -> Read:
    t = _torch_state(path)
    enc, dec = _need(path, t, "encoder_linear.weight"), _need(path, t, "decoder_linear.weight")
    weights = {
        "W_enc": enc.T, "b_enc": _need(path, t, "encoder_linear.bias"),
        "W_dec": dec.T, "b_dec": _need(path, t, "decoder_linear.bias"),
    }  # fmt: skip
    named = re.search(r"-l(\d+)(\.pth?)?$", path.name)
    hook = f"model.layers.{named.group(1)}" if named else None
    return _config(path, "standard", *_dims(weights), hook, False, "none", None, None, layer), weights, (path,)


def read_openai(path: Path, layer: int | None) -> Read:
    t = _torch_state(path)
    if re.search(r"resid_delta", str(path)):
        raise SAEFormatError(path, "a resid_delta SAE reads a layer's update, not the residual stream; steerserve steers the stream")
    activation = t.get("activation", "TopK")
    kind = {"TopK": "topk", "ReLU": "standard"}.get(activation) if isinstance(activation, str) else None
    if kind is None:
        raise SAEFormatError(path, f"activation {activation!r}: only openai/sparse_autoencoder's 'TopK' and 'ReLU' are supported")
    enc, dec = _need(path, t, "encoder.weight"), _need(path, t, "decoder.weight")
    weights = {"W_enc": enc.T, "b_enc": _need(path, t, "latent_bias"), "W_dec": dec.T, "b_dec": _need(path, t, "pre_bias")}
    k = (t.get("activation_state_dict") or {}).get("k") if kind == "topk" else None
    named = re.fullmatch(r"(\d+)\.pt", path.name)
    hook = f"model.layers.{named.group(1)}" if named else None
    d_in, d_sae = _dims(weights)
    # Its TopK autoencoders layer-normalise their input (`normalize` is set for them alone).
    norm = "layer_norm" if kind == "topk" else "none"
    return _config(path, kind, d_in, d_sae, hook, True, norm, None, k, layer), weights, (path,)


READERS: dict[str, Callable[[Path, int | None], Read]] = {
    "saelens": read_saelens,
    "gemma_scope": read_gemma_scope,
    "gemma_scope_2": read_gemma_scope_2,
    "llama_scope": read_llama_scope,
    "sparsify": read_sparsify,
    "goodfire": read_goodfire,
    "openai": read_openai,
}
# What a directory of each format holds, checked in this order.
DIRECTORY_MARKERS = (
    ("saelens", (CONFIG_FILE, WEIGHTS_FILE)),
    ("sparsify", (CONFIG_FILE, "sae.safetensors")),
    ("gemma_scope", ("params.npz",)),
    ("gemma_scope_2", ("config.json", "params.safetensors")),
    ("llama_scope", ("hyperparams.json", "checkpoints/final.safetensors")),
)


# --- Shared checks -------------------------------------------------------------------------------


def _config(
    file: Path, arch: str, d_in: Any, d_sae: Any, hook: Any, b_dec_in: Any, norm: Any, factor: Any, k: Any, layer: int | None
) -> SAEConfig:
    """The canonical config, checked; `layer` (from the source) where the files name none."""
    if arch not in ARCHITECTURES:
        raise SAEFormatError(file, f"architecture {arch!r} is not one of {sorted(ARCHITECTURES)}")
    if not (isinstance(d_in, int) and isinstance(d_sae, int) and d_in > 0 and d_sae > 0):
        raise SAEFormatError(file, f"d_in and d_sae must be positive integers (got {d_in!r}, {d_sae!r})")
    if norm not in NORMALIZATIONS:
        raise SAEFormatError(file, f"normalize_activations {norm!r} is not one of {list(NORMALIZATIONS)}")
    if norm == "expected_average_only_in" and not (isinstance(factor, (int, float)) and factor > 0):
        raise SAEFormatError(file, "normalize_activations 'expected_average_only_in' needs a positive scaling factor")
    if hook is None:
        if layer is None:
            raise SAEFormatError(file, "the files do not say which layer this SAE reads: give it as PATH@LAYER")
        hook = f"model.layers.{layer}"
    try:
        named = layer_of_hook(str(hook))
    except ValueError as exc:
        raise SAEFormatError(file, str(exc)) from exc
    if layer is not None and layer != named:
        raise SAEFormatError(file, f"the files say hook {hook!r} (layer {named}), not layer {layer}")
    return SAEConfig(
        architecture=arch, d_in=d_in, d_sae=d_sae, hook_name=str(hook), layer=named,
        apply_b_dec_to_input=bool(b_dec_in), normalize_activations=norm,
        norm_scaling_factor=float(factor) if norm == "expected_average_only_in" else None,
        k=k if isinstance(k, int) else None,
    )  # fmt: skip


def _dims(weights: Weights) -> tuple[int | None, int | None]:
    """(d_in, d_sae) as the canonical encoder W_enc [d_in, d_sae] has them; None where it is not 2-D
    (`_config` then refuses the SAE)."""
    shape = tuple(weights["W_enc"].shape)
    return shape if len(shape) == 2 else (None, None)  # type: ignore[return-value]


def _check_weights(file: Path, cfg: SAEConfig, cls: type[SAE], weights: Mapping[str, torch.Tensor]) -> None:
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
        **{name: (cfg.d_sae,) for name in cls.per_feature},
    }
    for name, shape in expected.items():
        if name not in weights:
            raise SAEFormatError(file, f"missing tensor {name!r}")
        if tuple(weights[name].shape) != shape:
            raise SAEFormatError(file, f"tensor {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")
        if not torch.isfinite(weights[name]).all():
            raise SAEFormatError(file, f"tensor {name!r} holds NaN or inf")


def _json(file: Path) -> dict:
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SAEFormatError(file, f"cannot read SAE config: {exc}") from exc
    if not isinstance(raw, dict):
        raise SAEFormatError(file, "SAE config must be a JSON object")
    return raw


def _tensors(file: Path, read: Callable[[Path], Mapping[str, torch.Tensor]]) -> Weights:
    try:
        return {name: value.float() for name, value in read(file).items()}
    except Exception as exc:  # safetensors raises several types for a bad file
        raise SAEFormatError(file, f"cannot read SAE weights: {exc}") from exc


def _torch_state(file: Path) -> dict[str, Any]:
    """A torch-saved state dict, read without unpickling arbitrary objects."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, or one that needs full unpickling
        raise SAEFormatError(file, f"cannot read as a weights-only torch state dict (steerserve never unpickles): {exc}") from exc
    if not isinstance(state, Mapping):
        raise SAEFormatError(file, f"holds a {type(state).__name__}, not a state dict")
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}


def _need(file: Path, tensors: Mapping[str, Any], name: str) -> torch.Tensor:
    if not isinstance(tensors.get(name), torch.Tensor):
        raise SAEFormatError(file, f"missing tensor {name!r}")
    return tensors[name]


def _load_max_act(path: Path, d_sae: int) -> torch.Tensor | None:
    if not path.exists():
        return None
    try:
        stats = load_file(path)
    except Exception as exc:
        raise SAEFormatError(path, f"cannot read feature statistics: {exc}") from exc
    max_act = stats.get("max_act")
    if max_act is None or tuple(max_act.shape) != (d_sae,):
        raise SAEFormatError(path, f"feature statistics need a 'max_act' tensor of shape ({d_sae},)")
    return max_act.float()
