"""Catalogue statistics and search on small tensors, against brute-force references."""

from __future__ import annotations

import torch

from features.catalogue import TOP_CONTEXTS, Catalogue, gather_statistics
from tests.saes import make_sae


def test_statistics_match_brute_force(tmp_path):
    sae = make_sae(tmp_path, "jumprelu", "none")
    x = torch.randn(3000, sae.cfg.d_in, generator=torch.Generator().manual_seed(0)) * 3
    x = torch.cat([x[:5], 40 * x[:1], x[5:700], 40 * x[1:2], x[700:], 40 * x[2:3]])  # sink-like rows: left out
    sinks = torch.tensor([5, 701, 3002])
    stats = gather_statistics(sae, lambda: iter(x.split(512)), len(x), 512, sink_norm=10 * x.norm(dim=1).median().item())
    acts = sae.encode(x)
    acts[sinks] = 0
    assert stats.tokens == len(x) - len(sinks) and stats.sinks == len(sinks)
    torch.testing.assert_close(stats.density, (acts > 0).sum(0).double() / (len(x) - len(sinks)), check_dtype=False)
    torch.testing.assert_close(stats.max_act, acts.max(0).values.clamp_min(0))
    fired = (acts > 0).sum(0) >= TOP_CONTEXTS
    best = torch.topk(acts, TOP_CONTEXTS, dim=0)
    torch.testing.assert_close(stats.top_values[:, fired], best.values[:, fired])
    assert torch.equal(stats.top_rows[:, fired], best.indices[:, fired])
    # quantiles come from log-spaced bins (40 a decade): within half a bin of the exact value
    quantiles = stats.quantiles()
    for f in torch.nonzero(fired).flatten()[:20].tolist():
        active = acts[:, f][acts[:, f] > 0]
        exact = torch.quantile(active, torch.tensor([0.5, 0.9, 0.99]))
        ratio = quantiles[:, f] / exact
        assert torch.all((ratio > 0.97) & (ratio < 1.03)), (f, quantiles[:, f], exact)


def card(index: int, label: str, promoted: list[str], contexts: list[str], density: float) -> dict:
    return {
        "index": index, "label": label, "density": density, "max_act": 1.0, "promoted_tokens": promoted,
        "top_contexts": [{"text": t, "activation": 1.0} for t in contexts],
    }  # fmt: skip


def test_search_ranks_label_tokens_and_contexts():
    catalogue = Catalogue([
        card(0, "cat / kitten → purr", [" purr"], ["the «cat» sat", "a «kitten» slept"], 0.01),
        card(5, "music / musical → song", [" song"], ["a «musical» instrument", "pop «music»"], 0.01),
        card(1, "the → of", [" of"], ["the golden gate «bridge»", "a «bridge» over water"], 0.02),
        card(2, "golden / gate → Bridge", [" Bridge", " San"], ["the «golden» gate bridge", "«golden» gate park"], 0.001),
        card(3, "dogs → bark", [" bark"], ["two «dogs» ran"], 0.01),
        card(4, "well → I", [" I"], ["a letter about the Golden Gate Bridge.<|im_end|>⏎assistant⏎Dear Sam,⏎⏎I hope you are «well»"], 0.01),
    ])  # fmt: skip
    assert [r["index"] for r in catalogue.search_words("bridge")] == [1, 2], "firing on the word beats promoting it"
    assert [r["index"] for r in catalogue.search_words("golden gate")] == [2, 1]
    assert [r["index"] for r in catalogue.search_words("dog")] == [3], "plurals match"
    assert [r["index"] for r in catalogue.search_words("music")] == [5], "longer words match the words they start"
    assert catalogue.search_words("cat bridge") == [], "every word must match"
    assert catalogue.search_words("!!!") == []
    assert [r["index"] for r in catalogue.search_words("bridge", limit=1)] == [1]
    assert 4 not in [r["index"] for r in catalogue.search_words("golden gate bridge")], "only text near the marked token counts"
