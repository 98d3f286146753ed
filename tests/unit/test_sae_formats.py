"""Every SAE format loads from files in its real layout and encodes as its own formula says."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from features.formats import detect, load_sae, parse_source
from features.sae import SAEFormatError
from tests import sae_formats
from tests.sae_formats import FORMAT_OF, WRITERS

D, LAYER = 24, 5


def activations(n: int = 96, seed: int = 0) -> torch.Tensor:
    """Residual-like vectors: a few strong directions, an offset and noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) @ torch.randn(6, D, generator=g) * 3 + torch.randn(D, generator=g) + torch.randn(n, D, generator=g) * 0.3


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_format_loads_and_encodes_as_its_formula(tmp_path, name):
    x = activations()
    written = WRITERS[name](tmp_path, x, LAYER, 0)
    fmt, path, _ = parse_source(written.source)
    assert fmt is None and detect(path) == FORMAT_OF[name], "the format is worked out from the files"
    sae = load_sae("s", written.source)
    assert sae.cfg.layer == LAYER and sae.cfg.d_in == D and sae.cfg.d_sae == sae_formats.D_SAE
    held_out = activations(seed=1)  # not the vectors the thresholds were set on
    expected = written.encode(held_out)
    assert 0 < (expected > 0).float().mean() < 1, "the fixture's features must fire on some tokens, not all"
    torch.testing.assert_close(sae.encode(held_out), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert load_sae("s", sae.source).source == sae.source, "the canonical source loads the same SAE"


def test_topk_rescaled_by_decoder_norm_reconstructs_as_saelens(tmp_path):
    """SAELens divides the activations by |W_dec[i]| before decoding; the folded form must agree."""
    x = activations()
    written = WRITERS["saelens-v6-topk"](tmp_path, x, LAYER, 0)
    sae = load_sae("s", written.source)
    raw = load_file(f"{written.source}/sae_weights.safetensors")
    f = written.encode(x)
    expected = (f / raw["W_dec"].norm(dim=-1)) @ raw["W_dec"] + raw["b_dec"]
    torch.testing.assert_close(sae.reconstruct(x), expected, rtol=1e-5, atol=1e-4)


def test_llama_scope_reconstructs_in_the_output_norm(tmp_path):
    """Llama Scope's decoder writes the output's normalised units: divided by sqrt(d) / avg_out."""
    x = activations()
    written = WRITERS["llama-scope"](tmp_path, x, LAYER, 0)
    sae = load_sae("s", written.source)
    hyper = json.loads((sae.path / "hyperparams.json").read_text())
    raw = load_file(sae.path / "checkpoints" / "final.safetensors")
    s_out = math.sqrt(D) / hyper["dataset_average_activation_norm"]["out"]
    expected = (written.encode(x) @ raw["decoder.weight"].T + raw["decoder.bias"]) / s_out
    torch.testing.assert_close(sae.reconstruct(x), expected, rtol=1e-5, atol=1e-4)


def test_layer_from_the_source_where_the_files_name_none(tmp_path):
    written = WRITERS["goodfire"](tmp_path, activations(), LAYER, 0)
    unnamed = tmp_path / "goodfire.pth"
    unnamed.write_bytes(open(written.source, "rb").read())
    with pytest.raises(SAEFormatError, match="give it as PATH@LAYER"):
        load_sae("s", str(unnamed))
    assert load_sae("s", f"{unnamed}@7").cfg.layer == 7
    assert load_sae("s", f"goodfire:{unnamed}@7").cfg.layer == 7, "a named format"
    with pytest.raises(SAEFormatError, match=f"layer {LAYER}\\), not layer 7"):
        load_sae("s", f"{written.source}@7")


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _pickled_module(tmp_path, written):
    """A .pt that holds a whole module, which only full unpickling could read."""
    path = tmp_path / "module-l5.pt"
    torch.save(torch.nn.Linear(D, 4), path)
    return str(path)


def _truncate(file):
    file.write_bytes(file.read_bytes()[:200])


def _nan(file, name):
    tensors = load_file(file)
    tensors[name][0] = torch.nan
    save_file(tensors, file)


BAD = {
    # name: (writer, how to spoil it -> the source to load, the message)
    "pickle": ("goodfire", _pickled_module, "never unpickles"),
    "truncated npz": ("gemma-scope", lambda t, w: _truncate(_p(w) / "params.npz") or w.source, "params.npz: cannot read Gemma Scope params"),
    "nan": ("llama-scope", lambda t, w: _nan(_p(w) / "checkpoints/final.safetensors", "decoder.weight") or w.source, "final.safetensors: tensor 'W_dec' holds NaN"),
    "shape": ("sparsify", lambda t, w: _edit_json(_p(w) / "cfg.json", d_in=D + 1) or w.source, "sae.safetensors: tensor 'W_enc' has shape"),
    "transcoder": ("sparsify", lambda t, w: _edit_json(_p(w) / "cfg.json", transcode=True) or w.source, "transcoder"),
    "mlp out": ("llama-scope", lambda t, w: _edit_json(_p(w) / "hyperparams.json", hook_point_in="blocks.5.hook_mlp_out", hook_point_out="blocks.5.hook_mlp_out") or w.source, "is an MLP output"),
    "attention heads": ("saelens-v6-topk", lambda t, w: _edit_json(_p(w) / "cfg.json", metadata={"hook_name": "blocks.5.attn.hook_z", "hook_head_index": None}, reshape_activations="hook_z") or w.source, "hook_z"),
    "gemma attn_out": ("gemma-scope-2", lambda t, w: str(_move(_p(w), "attn_out")), "attn_out SAE"),
    "missing": ("openai", lambda t, w: str(t / "nowhere.pt"), "no such file"),
    "not a file architecture": ("saelens-v6-topk", lambda t, w: _edit_json(_p(w) / "cfg.json", architecture="direction") or w.source, "architecture 'direction'"),
    "gemma mlp": ("gemma-scope", lambda t, w: str(_rename(_p(w), "gemma-scope-2b-pt-res", "gemma-scope-2b-pt-mlp")), "MLP-output SAE"),
    "sparsify mlp hookpoint": ("sparsify", lambda t, w: str(_rename(_p(w), "layers.5", "layers.5.mlp")) + "@5", "is an MLP output"),
}  # fmt: skip


def _p(written):
    return parse_source(written.source)[1]


def _rename(path, part, to):
    """The SAE moved so that one directory of its path is named `to` instead of `part`."""
    target = type(path)(str(path).replace(part, to))
    target.parent.mkdir(parents=True, exist_ok=True)
    path.rename(target)
    return target


def _move(path, kind):
    target = path.parent.parent / kind / path.name
    target.parent.mkdir(parents=True)
    path.rename(target)
    return target


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_named(tmp_path, case):
    writer, spoil, message = BAD[case]
    source = spoil(tmp_path, WRITERS[writer](tmp_path, activations(), LAYER, 0))
    with pytest.raises(SAEFormatError, match=message):
        load_sae("s", source)


def test_npz_is_read_without_pickle(tmp_path):
    path = tmp_path / "layer_5" / "width_16k" / "average_l0_9"
    path.mkdir(parents=True)
    np.savez(path / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SAEFormatError, match="cannot read Gemma Scope params"):
        load_sae("s", str(path))
