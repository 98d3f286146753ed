"""Steering vectors from disk, and the loaded vectors of one layer as an SAE the steering op runs.

`load_vector(id, PATH[@LAYER])` reads a vector's direction at each layer it has one:
- a GGUF control vector (llama.cpp, repeng): tensors `direction.N`, each added to the output of
  decoder layer N as llama.cpp does (there is no `direction.0`: layer 0 has no earlier block);
- a `.safetensors` or weights-only `.pt` file: tensors `direction.N` likewise, or one 1-D tensor
  at LAYER (given in the source, or as `layer` in the safetensors metadata);
- a `.npy` file: one 1-D direction at LAYER (read without pickle).

The steering op steers SAE features: sum_k (c0 + c1 * f_k(x)) * d_k. A layer's loaded vectors
become `DirectionSAE` features, two per vector v (unit direction r = v / |v|), both decoding to v:
feature 2j is the projection p = x.r, feature 2j+1 its rectified excess relu(p + b), b a per-request
bias. Every vector mode is then one of the op's formulas (steering/spec.py):

    add     x + s v (raw) or x + s r (norm)     feature 2j,     c0 = s or s/|v|, c1 = 0
    ablate  x - p r                             feature 2j,     c0 = 0,          c1 = -1/|v|
    clamp   x + (c - p) r                       feature 2j,     c0 = c/|v|,      c1 = -1/|v|
    cap     x + (min(p, c) - p) r               feature 2j + 1, bias -c,         c1 = -1/|v|

so a vector is routed, gated, isolated and cache-salted as any feature is, through the same tables.
A request's own (inline) vectors travel in its steering and are written straight into its table
row at the layers a server takes them (`--inline-vector-layers`), never to disk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from features.sae import SAE, SAEConfig, SAEFormatError

DIRECTION = re.compile(r"^direction\.(\d+)$")
PREFIX = "vectors@"  # the DirectionSAE of layer L is `vectors@L`


@dataclass(frozen=True)
class SteeringVector:
    id: str
    source: str  # what loads it again: `PATH[@LAYER]`, the path absolute
    directions: dict[int, torch.Tensor]  # layer -> the raw vector [d_in] added to its output
    files: tuple[Path, ...]


def load_vector(vector_id: str, source: str) -> SteeringVector:
    """Load a steering vector from `PATH[@LAYER]`; any problem raises SAEFormatError naming the file."""
    path, layer = _split(source)
    if not path.is_file():
        raise SAEFormatError(path, "no such file")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        directions = _gguf(path)
    elif suffix == ".safetensors":
        directions = _safetensors(path, layer)
    elif suffix in (".pt", ".pth"):
        directions = _torch(path, layer)
    elif suffix == ".npy":
        directions = {_need_layer(path, layer): _vector(path, "the array", _npy(path))}
    else:
        raise SAEFormatError(path, "a steering vector is a .gguf, .safetensors, .pt or .npy file")
    if not directions:
        raise SAEFormatError(path, "holds no direction")
    canonical = f"{path.resolve()}" + (f"@{layer}" if layer is not None else "")
    return SteeringVector(vector_id, canonical, dict(sorted(directions.items())), (path,))


def _split(source: str) -> tuple[Path, int | None]:
    if match := re.fullmatch(r"(.+)@(\d+)", source):
        return Path(match.group(1)), int(match.group(2))
    return Path(source), None


def _gguf(path: Path) -> dict[int, torch.Tensor]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        arch = reader.fields.get("general.architecture")
        kind = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else None
        tensors = {t.name: np.array(t.data) for t in reader.tensors}
    except Exception as exc:  # the reader raises several types for a bad file
        raise SAEFormatError(path, f"cannot read GGUF: {exc}") from exc
    if kind != "controlvector":
        raise SAEFormatError(path, f"general.architecture is {kind!r}, not 'controlvector'")
    return _numbered(path, {name: torch.from_numpy(value.astype(np.float32)) for name, value in tensors.items()})


def _safetensors(path: Path, layer: int | None) -> dict[int, torch.Tensor]:
    try:
        with safe_open(path, "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:
        raise SAEFormatError(path, f"cannot read safetensors: {exc}") from exc
    if layer is None and str(metadata.get("layer", "")).isdigit():
        layer = int(metadata["layer"])
    return _one_or_numbered(path, tensors, layer)


def _torch(path: Path, layer: int | None) -> dict[int, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SAEFormatError(path, f"cannot read as a weights-only torch file (steerserve never unpickles): {exc}") from exc
    return _one_or_numbered(path, state if isinstance(state, Mapping) else {"direction": state}, layer)


def _npy(path: Path) -> torch.Tensor:
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
    except Exception as exc:
        raise SAEFormatError(path, f"cannot read .npy without pickle: {exc}") from exc


def _one_or_numbered(path: Path, tensors: Mapping[str, object], layer: int | None) -> dict[int, torch.Tensor]:
    """`direction.N` tensors, or the one tensor a file holds at `layer`."""
    if any(DIRECTION.match(name) for name in tensors):
        if layer is not None:
            raise SAEFormatError(path, "holds direction.N tensors, which name their layers; drop @LAYER")
        return _numbered(path, tensors)
    if len(tensors) != 1:
        raise SAEFormatError(path, f"expected direction.N tensors or a single tensor, found {sorted(tensors)[:8]}")
    (name, value), = tensors.items()
    return {_need_layer(path, layer): _vector(path, repr(name), value)}


def _numbered(path: Path, tensors: Mapping[str, object]) -> dict[int, torch.Tensor]:
    out = {}
    for name, value in tensors.items():
        match = DIRECTION.match(name)
        if match is None:
            raise SAEFormatError(path, f"tensor {name!r} is not named direction.N")
        if int(match.group(1)) == 0:
            raise SAEFormatError(path, "direction.0: a control vector's layers start at 1, as llama.cpp reads them")
        out[int(match.group(1))] = _vector(path, repr(name), value)
    return out


def _need_layer(path: Path, layer: int | None) -> int:
    if layer is None:
        raise SAEFormatError(path, "the file does not say which layer it steers: give it as PATH@LAYER")
    return layer


def _vector(path: Path, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise SAEFormatError(path, f"{name} must be a 1-D tensor of d_in numbers")
    value = value.float()
    if not torch.isfinite(value).all():
        raise SAEFormatError(path, f"{name} holds NaN or inf")
    if not value.norm() > 0:
        raise SAEFormatError(path, f"{name} is all zeros: it has no direction")
    return value


class DirectionSAE(SAE):
    """The steering vectors of one layer, as features (never read from an SAE file): 2j the projection on loaded vector j's unit
    direction, 2j + 1 its rectified excess over a per-request bias (`linear` is 1 on the first).
    A request's own (inline) vector k takes negative indices the same way: -(2k + 1) its
    projection, -(2k + 2) its rectified excess; a table row is given its values directly."""

    per_feature = ("linear",)
    vectors: dict[str, int]  # loaded vector id -> j
    inline: int  # the most inline vectors a request may steer here
    slots: int  # table slots a request may use here: each loaded vector twice, and the inline ones

    def activation(self, pre: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.where(params["linear"] > 0, pre, torch.relu(pre))

    @classmethod
    def of(cls, layer: int, directions: Mapping[str, torch.Tensor], d_in: int, inline: int = 0) -> DirectionSAE:
        """The loaded vectors' `directions` (id -> raw vector [d_in]) at `layer`, taking up to
        `inline` vectors of a request's own."""
        raw = torch.stack([d for d in directions.values() for _ in (0, 1)]) if directions else torch.zeros(0, d_in)  # each twice
        cfg = SAEConfig(architecture="direction", d_in=d_in, d_sae=len(raw), hook_name=f"model.layers.{layer}", layer=layer,
                        apply_b_dec_to_input=False, normalize_activations="none", norm_scaling_factor=None, k=None)  # fmt: skip
        weights = {"W_enc": (raw / raw.norm(dim=-1, keepdim=True)).T.contiguous(), "b_enc": torch.zeros(len(raw)), "W_dec": raw,
                   "b_dec": torch.zeros(d_in), "linear": torch.tensor([1.0, 0.0] * len(directions))}  # fmt: skip
        sae = cls(f"{PREFIX}{layer}", Path(f"{PREFIX}{layer}"), cfg, weights, None, source=f"{PREFIX}{layer}")
        sae.vectors = {vid: j for j, vid in enumerate(directions)}
        sae.inline, sae.slots = inline, 2 * len(directions) + inline
        return sae

    @staticmethod
    def inline_slot(index: int, vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(encoder column, decoder row, linear) of inline index -(2k + 1) or -(2k + 2): vector k."""
        k, rectified = divmod(-index - 1, 2)
        v = vectors[k].float()
        return v / v.norm(), v, 0.0 if rectified else 1.0


def saes_only(saes: Mapping[str, SAE]) -> dict[str, SAE]:
    """The SAEs proper among `saes`, by id: what may be listed, read, watched or named as an SAE
    (a layer's DirectionSAE is how vectors steer, not an SAE of the server's)."""
    return {sae_id: sae for sae_id, sae in saes.items() if not isinstance(sae, DirectionSAE)}


def inline_layers(saes: Iterable[SAE]) -> list[int]:
    """The layers at which requests may send vectors of their own, in order."""
    return sorted(sae.cfg.layer for sae in saes if isinstance(sae, DirectionSAE) and sae.inline)


def direction_saes(
    vectors: Mapping[str, SteeringVector], d_in: int, inline: int = 0, inline_layers: Sequence[int] = ()
) -> dict[str, DirectionSAE]:
    """A DirectionSAE, keyed `vectors@L`, at each layer where a loaded vector has a direction or
    inline vectors are taken (`inline` a request at most, at `inline_layers`)."""
    layers = sorted({layer for v in vectors.values() for layer in v.directions} | set(inline_layers))
    return {
        f"{PREFIX}{layer}": DirectionSAE.of(
            layer, {vid: v.directions[layer] for vid, v in vectors.items() if layer in v.directions}, d_in,
            inline if layer in inline_layers else 0,
        )
        for layer in layers
    }  # fmt: skip
