"""Start-up checks: every SAE must load and fit the model before the engine starts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from features.sae import SAEFormatError, load_sae
from server.settings import SteeringSettings, hook_digest, sae_entry


class StartupError(RuntimeError):
    pass


def steering_settings(model: Path, args: argparse.Namespace) -> SteeringSettings:
    config_path = model / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StartupError(f"{config_path}: not a Hugging Face checkpoint ({exc})") from exc
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    entries = []
    for sae_id, path in args.sae:
        if any(e.id == sae_id for e in entries):
            raise StartupError(f"--sae {sae_id}={path}: SAE id {sae_id!r} is given twice")
        try:
            sae = load_sae(sae_id, path)
        except SAEFormatError as exc:
            raise StartupError(f"--sae {sae_id}: {exc}") from exc
        cfg_file = Path(path) / "cfg.json"
        if sae.cfg.d_in != hidden:
            raise StartupError(f"{cfg_file}: d_in {sae.cfg.d_in} does not match the model's hidden size {hidden}")
        if not 0 <= sae.cfg.layer < layers:
            raise StartupError(f"{cfg_file}: hook {sae.cfg.hook_name!r} names layer {sae.cfg.layer}; the model has {layers}")
        entries.append(sae_entry(sae_id, path))
    return SteeringSettings(
        saes=entries,
        max_steered_requests=args.max_steered_requests,
        # Row 0 means "unsteered"; rows of finished requests are freed one engine step after
        # the API server releases them, hence the max_num_seqs of slack.
        rows=1 + args.max_steered_requests + args.max_num_seqs,
        width=args.max_features_per_sae,
        max_features=args.max_features,
        max_strength=args.max_strength,
        hook_digest=hook_digest(),
    )
