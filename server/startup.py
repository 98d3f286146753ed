"""Start-up checks: every SAE must load and fit the model before the engine starts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from features.formats import load_sae
from features.sae import SAE, SAEFormatError
from features.vectors import PREFIX, direction_saes, load_vector
from server.policy import Policy, PolicyError
from server.presets import PresetsError, parse_presets
from server.settings import APISettings
from steering.wire import EngineSettings, code_digest, source_entry


class StartupError(RuntimeError):
    pass


def steering_settings(model: Path, args: argparse.Namespace) -> tuple[EngineSettings, dict[str, SAE]]:
    config_path = model / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StartupError(f"{config_path}: not a Hugging Face checkpoint ({exc})") from exc
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    entries, saes = [], {}
    for sae_id, path in args.sae:
        if PREFIX in sae_id or any(e.id == sae_id for e in entries):
            raise StartupError(f"--sae {sae_id}={path}: SAE id {sae_id!r} is given twice, or holds the reserved {PREFIX!r}")
        try:
            sae = load_sae(sae_id, path)
        except SAEFormatError as exc:
            raise StartupError(f"--sae {sae_id}: {exc}") from exc
        cfg_file = sae.files[0]  # its config, or its one file
        if sae.cfg.d_in != hidden:
            raise StartupError(f"{cfg_file}: d_in {sae.cfg.d_in} does not match the model's hidden size {hidden}")
        if not 0 <= sae.cfg.layer < layers:
            raise StartupError(f"{cfg_file}: hook {sae.cfg.hook_name!r} names layer {sae.cfg.layer}; the model has {layers}")
        entries.append(source_entry(sae))
        saes[sae_id] = sae
    vectors, loaded = [], {}
    for vector_id, source in args.vector:
        if any(e.id == vector_id for e in vectors):
            raise StartupError(f"--vector {vector_id}={source}: vector id {vector_id!r} is given twice")
        try:
            vector = load_vector(vector_id, source)
        except SAEFormatError as exc:
            raise StartupError(f"--vector {vector_id}: {exc}") from exc
        for layer, direction in vector.directions.items():
            if len(direction) != hidden:
                raise StartupError(f"{vector.files[0]}: the direction at layer {layer} has {len(direction)} numbers; the model's hidden size is {hidden}")
            if not 0 <= layer < layers:
                raise StartupError(f"{vector.files[0]}: a direction at layer {layer}; the model has {layers}")
        vectors.append(source_entry(vector))
        loaded[vector_id] = vector
    if args.max_inline_vectors < 0:
        raise StartupError(f"--max-inline-vectors {args.max_inline_vectors}: must be 0 or more")
    settings = EngineSettings(
        saes=entries,
        vectors=vectors,
        hidden_size=hidden,
        inline_vector_layers=_layers(args.inline_vector_layers, layers) if args.max_inline_vectors else [],
        max_inline_vectors=args.max_inline_vectors,
        max_steered_requests=args.max_steered_requests,
        # Row 0 means "unsteered"; rows of finished requests are freed one engine step after
        # the API server releases them, hence the max_num_seqs of slack.
        rows=1 + args.max_steered_requests + args.max_num_seqs,
        width=args.max_features_per_sae,
        max_features=args.max_features,
        max_strength=args.max_strength,
        max_readout_top_k=args.max_readout_top_k,
        max_readout_features=args.max_readout_features,
        max_monitors=args.max_monitors,
        code_digest=code_digest(),
    )
    return settings, saes | direction_saes(loaded, hidden, settings.max_inline_vectors, settings.inline_vector_layers)


def _layers(value: str | None, layers: int) -> list[int]:
    """`--inline-vector-layers`: 'all', 'none' (the default), or 'A-B,C,...' (each below `layers`)."""
    if value is None:
        return []
    if value in ("all", "none"):
        return list(range(layers)) if value == "all" else []
    chosen: set[int] = set()
    for part in value.split(","):
        first, _, last = part.strip().partition("-")
        if not (first.isdigit() and (not last or last.isdigit())) or int(last or first) < int(first) or int(last or first) >= layers:
            raise StartupError(f"--inline-vector-layers {value!r}: expected 'all', 'none' or layers like '8-12,15', each below {layers}")
        chosen.update(range(int(first), int(last or first) + 1))
    return sorted(chosen)


def api_settings(args: argparse.Namespace, settings: EngineSettings, saes: dict[str, SAE], model: str) -> APISettings:
    """Check the presets and policy files now, so a bad file stops start-up before the engine loads."""
    presets = Path(args.presets).resolve() if args.presets else None
    policy = Path(args.policy).resolve() if args.policy else None
    try:
        if presets is not None:
            parse_presets(presets, saes, {model}, settings.limits)
        Policy.load(policy, args.api_key)
    except (PresetsError, PolicyError) as exc:
        raise StartupError(str(exc)) from exc
    return APISettings(
        presets=str(presets) if presets else None,
        policy=str(policy) if policy else None,
        api_keys=args.api_key,
        log_prompts=args.log_prompts,
    )
