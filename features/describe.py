"""What the default SAE has, for any SAE: statistics (so `unit: max_act` works) and a catalogue.

`write_description` is the default SAE's build stage and `steerserve features build --sae ID=SOURCE`
alike: from an SAE's activations over a token stream it writes `feature_statistics.safetensors`
(max_act, density, mean_act, quantiles) and `catalogue.json.gz` (top contexts, logit lens, labels)
into the SAE's description directory (`description_dir`), where loading and search find them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from features import activations, catalogue
from features.formats import DEFAULT_SAE, STATISTICS_FILE, description_dir, load_sae
from features.residuals import ResidualReader
from features.sae import SAE


def write_description(sae: SAE, stream: np.ndarray, tokenizer, model_dir: Path, out: Path, stats: catalogue.Statistics) -> None:
    """Write `stats` (of `sae` over the residuals of token stream `stream`, in `activations`'
    cache layout) and the catalogue built from them into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"max_act": stats.max_act, "density": stats.density.float(),
         "mean_act": stats.total / stats.fires.clamp_min(1), "quantiles": stats.quantiles()},
        out / STATISTICS_FILE,
        # One key: safetensors writes a metadata map in no fixed order, and the file must be byte-identical per build.
        metadata={"statistics": json.dumps(
            {"quantiles": catalogue.QUANTILES, "tokens": stats.tokens, "sinks_left_out": stats.sinks}, sort_keys=True
        )},
    )  # fmt: skip
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    promoted, suppressed = catalogue.logit_lens(sae, lm.get_output_embeddings().weight.detach(), final_norm_scale(lm))
    cards = catalogue.build_cards(stats, tokenizer, stream, activations.token_of_row, promoted, suppressed)
    catalogue.save_catalogue(out / catalogue.CATALOGUE_FILE, cards)


def final_norm_scale(lm) -> torch.Tensor:
    """What the final norm multiplies the normalised stream by: its weight, or 1 + its weight for
    Gemma's RMSNorm, which stores the offset from 1."""
    weight = lm.model.norm.weight.detach()
    return 1 + weight if lm.config.model_type.startswith("gemma") else weight


def statistics(sae: SAE, acts: np.ndarray, sink_norm: float, batch: int = 4096) -> catalogue.Statistics:
    """One pass of the SAE over every cached activation."""

    def batches():
        for start in range(0, len(acts), batch):
            yield activations.as_float(acts[start : start + batch])

    return catalogue.gather_statistics(sae, batches, len(acts), batch, sink_norm)


def text_stream(tokenizer, texts: list[str], max_tokens: int) -> np.ndarray:
    """Each text tokenized and followed by EOS, one stream, cut at `max_tokens`."""
    parts, total = [], 0
    for text in texts:
        ids = np.asarray([*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id], np.uint32)
        parts.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    return np.concatenate(parts)[:max_tokens]


def build_command(args: argparse.Namespace) -> int:
    """`steerserve features build --sae ID=SOURCE`: describe an SAE that came without statistics."""
    from core.local import ensure_default_model, home
    from features.corpus import chat_texts

    sae_id, source = args.sae
    sae = load_sae(sae_id, source)
    model_dir = Path(args.model) if args.model else ensure_default_model()
    reader = ResidualReader(model_dir, sae.cfg.layer, torch.float32)
    texts = [Path(t).read_text(errors="replace") for t in args.text] or list(chat_texts(DEFAULT_SAE / "chats.jsonl.gz", reader.tokenizer))
    stream = text_stream(reader.tokenizer, texts, args.max_tokens)
    if len(stream) < activations.CONTEXT:
        print(f"steerserve: {len(stream)} tokens of text; at least {activations.CONTEXT} are needed")
        return 2
    key = hashlib.sha256(stream.tobytes() + str((model_dir.resolve(), sae.cfg.layer)).encode()).hexdigest()[:16]
    work = Path(args.work) if args.work else home() / "describe"
    work.mkdir(parents=True, exist_ok=True)
    acts = activations.collect(reader, stream, work / f"activations-{key}.npy", f"resid_post L{sae.cfg.layer}")
    stats = statistics(sae, acts, activations.sink_norm(acts))
    out = Path(args.out) if args.out else description_dir(sae.path)
    write_description(sae, stream, reader.tokenizer, model_dir, out, stats)
    print(f"{out}: statistics and catalogue of {sae.cfg.d_sae} features over {stats.tokens} tokens")
    return 0
