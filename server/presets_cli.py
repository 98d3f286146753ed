"""`steerserve presets check|show|diff`: presets files from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.local import MODEL_NAME
from features.formats import load_sae
from features.sae import SAEFormatError
from features.vectors import direction_saes, load_vector
from server.cli import limits_of
from server.presets import Preset, PresetsError, parse_presets


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "check":
            saes = {sae_id: load_sae(sae_id, path) for sae_id, path in args.sae}
            vectors = {vector_id: load_vector(vector_id, path) for vector_id, path in args.vector}
            if vectors:  # checked as a server would take them, without inline vectors
                d_in = next(len(d) for v in vectors.values() for d in v.directions.values())
                saes |= direction_saes(vectors, d_in)
            presets = parse_presets(Path(args.file), saes, {args.model or MODEL_NAME}, limits_of(args))
            for preset in presets.values():
                print(f"ok  {preset.name:24} {len(preset.features):3} feature(s)  {preset.description}")
            print(f"{args.file}: {len(presets)} preset(s) valid")
        elif args.action == "show":
            print(json.dumps([p.file_form() for p in _lenient(args.file).values()], indent=2))
        else:
            changes = diff(_lenient(args.old), _lenient(args.new))
            print("\n".join(changes) if changes else "no differences")
            return 1 if changes else 0
    except (PresetsError, SAEFormatError) as exc:
        print(f"steerserve: {exc}", file=sys.stderr)
        return 2
    return 0


def _lenient(path: str) -> dict[str, Preset]:
    """Parse for printing and diffing: schema-checked, but not against any loaded SAE or model."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    return {p.name: p for p in (Preset.model_validate(raw) for raw in data.get("presets", []))}


def diff(old: dict[str, Preset], new: dict[str, Preset]) -> list[str]:
    lines = [f"- {name}" for name in sorted(old.keys() - new.keys())]
    lines += [f"+ {name}" for name in sorted(new.keys() - old.keys())]
    for name in sorted(old.keys() & new.keys()):
        a, b = old[name].file_form(), new[name].file_form()
        for field in sorted(a.keys() | b.keys()):
            if a.get(field) != b.get(field):
                lines.append(f"~ {name}.{field}: {json.dumps(a.get(field))} -> {json.dumps(b.get(field))}")
    return lines
