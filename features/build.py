"""Build the default SAE, its statistics, catalogue and quality report: `python -m features.build`.

Stages, each skipped when its output exists, so an interrupted build resumes:

  chats        the default model answers every topic x task prompt through steerserve
               (committed as chats.jsonl.gz; only prompts it lacks are written, unless
               --regenerate-chats)
  corpus       chats + pinned Debian text packages, tokenized; held-out split; manifest
  activations  resid_post of LAYER for every training token, cached as bfloat16
  train        BatchTopK SAE, resumable checkpoints, fixed seed; exported as JumpReLU
  catalogue    statistics (density, max_act, quantiles), top contexts, logit lens, labels
  quality      FVE, L0, dead/dense fractions, loss recovered on held-out text

Outputs (committed, `features/default/`): cfg.json, sae_weights.safetensors (bfloat16),
feature_statistics.safetensors, catalogue.json.gz, quality.json/.md, training.png, manifest.json.
Intermediate data (corpus tokens, activation cache, checkpoints) stay in the work directory.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from core.local import ensure_default_model, file_sha256, home
from features import activations, catalogue, corpus, quality
from features.describe import statistics, write_description
from features.formats import CONFIG_FILE, DEFAULT_SAE, WEIGHTS_FILE, load_sae
from features.residuals import ResidualReader
from features.train import TrainConfig, Trainer, save_history_plot, write_json

LAYER = 15  # the middle of SmolLM2-135M's 30 layers
TRAIN_TOKENS = 4_000_000  # of the corpus's ~8M: all of its chats, and the rest public text


def training_windows(total: int, chat_windows: int, budget: int) -> np.ndarray:
    """Which of `total` windows training reads, `budget` at most: the first `chat_windows` (the
    chats) all where the budget allows, else spread evenly over them; the rest of the budget
    spread evenly over the public text after them."""
    budget = min(total, budget)
    chat = np.linspace(0, chat_windows - 1, min(chat_windows, budget)).astype(int)
    public = np.linspace(chat_windows, total - 1, min(budget - len(chat), total - chat_windows)).astype(int)
    return np.concatenate([chat, public])


class Build:
    def __init__(self, out: Path, work: Path, cfg: TrainConfig, max_tokens: int | None):
        self.out, self.work, self.cfg, self.max_tokens = out, work, cfg, max_tokens
        self.corpus_manifest = work / "corpus" / "manifest.json"  # written by the corpus stage
        self.model_dir = ensure_default_model()
        self.timings: dict[str, float] = {}
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)

    def stage(self, name: str, fn):
        print(f"\n== {name}", flush=True)
        started = time.monotonic()
        result = fn()
        self.timings[name] = round(time.monotonic() - started, 1)
        return result

    def chats(self, path: Path, regenerate: bool) -> Path:
        return corpus.generate_chats(path, regenerate)

    def corpus(self, chats: Path, reader: ResidualReader) -> dict:
        if not self.corpus_manifest.exists():
            manifest = corpus.build_corpus(chats, self.work / "downloads", self.work / "corpus", reader.tokenizer)
            write_json(self.corpus_manifest, manifest)
        return json.loads(self.corpus_manifest.read_text())

    def tokens(self, split: str) -> np.ndarray:
        """A split's token stream. With --max-tokens, training reads the chats (the first source: the
        text users steer) whole where the budget allows, and fills the rest with windows spread evenly
        over the public text, so every public source keeps its share."""
        tokens = np.load(self.work / "corpus" / f"{split}.npy")
        if split != "train" or not self.max_tokens:
            return tokens
        all_windows = activations.windows(tokens)
        chats = json.loads(self.corpus_manifest.read_text())["sources"][0]
        chat_windows = (chats["tokens"] - chats["heldout_tokens"]) // activations.CONTEXT
        keep = training_windows(len(all_windows), chat_windows, self.max_tokens // activations.CONTEXT)
        return all_windows[keep].reshape(-1)

    def activations(self, reader: ResidualReader) -> np.ndarray:
        return activations.collect(reader, self.tokens("train"), self.work / "activations.npy", f"resid_post L{LAYER}")

    def train(self, acts: np.ndarray) -> Trainer:
        trainer = Trainer(acts, self.cfg, self.work)
        trainer.fit()
        sae_cfg = {
            "architecture": "jumprelu", "d_in": acts.shape[1], "d_sae": self.cfg.d_sae,
            "hook_name": f"blocks.{LAYER}.hook_resid_post", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "dtype": "bfloat16", "model_name": "SmolLM2-135M-Instruct",
            "context_size": activations.CONTEXT, "dataset_path": "features/default/manifest.json",
            "trained_as": f"batchtopk (k={self.cfg.k}), exported as JumpReLU with its learned threshold",
        }  # fmt: skip
        (self.out / CONFIG_FILE).write_text(json.dumps(sae_cfg, indent=2) + "\n")
        weights = {k: v.to(torch.bfloat16).contiguous() for k, v in trainer.inference_weights().items()}
        save_file(weights, self.out / WEIGHTS_FILE)
        save_history_plot(trainer.history, self.out / "training.png")
        return trainer

    def catalogue(self, acts: np.ndarray, reader: ResidualReader, sink_norm: float) -> catalogue.Statistics:
        sae = load_sae("default", self.out)
        stats = self._statistics(sae, acts, sink_norm)
        write_description(sae, self.tokens("train"), reader.tokenizer, self.model_dir, self.out, stats)
        return stats

    def _statistics(self, sae, acts: np.ndarray, sink_norm: float) -> catalogue.Statistics:
        """One pass of the SAE over every training activation; cached per SAE weights and sink norm."""
        cached = self.work / f"statistics-{file_sha256(self.out / WEIGHTS_FILE)[:16]}-sink{sink_norm:.0f}.pt"
        if cached.exists():
            return catalogue.Statistics(**torch.load(cached))
        stats = statistics(sae, acts, sink_norm)
        torch.save(vars(stats), cached)
        return stats

    def quality(self, stats: catalogue.Statistics, sink_norm: float) -> dict:
        sae = load_sae("default", self.out)
        metrics = quality.evaluate(self.model_dir, sae, self.tokens("heldout"), sink_norm)
        metrics["dead_fraction"] = float((stats.fires == 0).float().mean())
        metrics["dense_fraction"] = float((stats.density > quality.DENSE).float().mean())
        metrics["statistics_tokens"] = stats.tokens
        metrics["sinks_left_out"] = stats.sinks
        metrics["sink_norm"] = sink_norm
        rows, table = quality.report(metrics)
        write_json(self.out / "quality.json", {"metrics": metrics, "targets": rows})
        (self.out / "quality.md").write_text(
            "# Default SAE quality (held-out text)\n\n" + table + "\n\n"
            f"Dense features (density > {quality.DENSE:.0%}): {metrics['dense_fraction']:.4f}. "
            f"Cross-entropy clean {metrics['ce_clean']:.4f}, spliced {metrics['ce_spliced']:.4f}, "
            f"zero-ablated {metrics['ce_zero_ablated']:.4f}, over {metrics['heldout_tokens']} held-out tokens.\n"
        )
        return metrics


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m features.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_SAE, help="where the SAE and its catalogue go")
    parser.add_argument("--work", type=Path, default=home() / "build", help="corpus, activation cache, checkpoints")
    parser.add_argument("--chats", type=Path, default=DEFAULT_SAE / "chats.jsonl.gz", help="the model-written chats")
    parser.add_argument("--regenerate-chats", action="store_true", help="have the model write its chats anew")
    parser.add_argument(
        "--max-tokens", type=int, default=TRAIN_TOKENS, help="training tokens, spread evenly over the corpus (0: all)"
    )
    parser.add_argument("--d-sae", type=int, default=TrainConfig.d_sae)
    parser.add_argument("--k", type=int, default=TrainConfig.k)
    parser.add_argument("--epochs", type=float, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    args = parser.parse_args()
    cfg = TrainConfig(d_sae=args.d_sae, k=args.k, epochs=args.epochs, seed=args.seed)
    torch.manual_seed(cfg.seed)
    build = Build(args.out, args.work, cfg, args.max_tokens)
    started = time.monotonic()
    chats = build.stage("chats", lambda: build.chats(args.chats, args.regenerate_chats))
    # float32: on this CPU transformers' bfloat16 forward is 2.4x slower (element-wise bf16 ops in rotary
    # embeddings dominate), and float32 residuals are what the float32 checkpoint really computes.
    reader = ResidualReader(build.model_dir, LAYER, torch.float32)
    manifest = build.stage("corpus", lambda: build.corpus(chats, reader))
    acts = build.stage("activations", lambda: build.activations(reader))
    trainer = build.stage("train", lambda: build.train(acts))
    sink_norm = activations.sink_norm(acts)  # one threshold for the statistics and the quality report
    stats = build.stage("catalogue", lambda: build.catalogue(acts, reader, sink_norm))
    metrics = build.stage("quality", lambda: build.quality(stats, sink_norm))
    manifest.update(
        layer=LAYER,
        training=trainer.summary(),
        training_tokens=len(acts),
        seconds=build.timings,
        total_seconds=round(time.monotonic() - started, 1),
        machine={"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        artifacts={p.name: file_sha256(p) for p in sorted(args.out.iterdir()) if p.name != "manifest.json"},
    )
    write_json(args.out / "manifest.json", manifest)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, indent=2))


if __name__ == "__main__":
    main()
