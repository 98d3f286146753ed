"""Calibrated steering strengths: what a sweep of settings measured, which setting it recommends,
and where recommendations are kept (`calibrations.json` beside the SAE's catalogue), so that
`unit: "calibrated"` can make strength 1 mean it.

A sweep answers the same prompts unsteered and at each setting (strength x prompt_scale). Per
setting it measures the concept (on how many of the answer's tokens, and in how many answers, the
feature itself fires before steering, how often an embedding judge finds the answer about the
concept, and how many answers show both; a steering vector, with no feature to read, by the judge
alone), fluency (the answers' perplexity under the
unsteered model, as a multiple of the unsteered answers') and relevance (how close each answer stays
to its prompt). The recommendation is the strongest setting within the fluency budget. The
engine side of the sweep is server/calibrate.py.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

CALIBRATIONS_FILE = "calibrations.json"
EMBEDDING_THRESHOLD = 0.3  # cosine similarity to the concept that counts an answer as about it


# What a calibration answers unless told otherwise: neutral requests, none of them in the effect
# benchmark's evaluation prompts (benchmarks/steering_demo.py), so its figures stay held out.
PROMPTS = (
    "What is a good hobby to pick up?", "How do I cook rice?", "Write a limerick about a cat.",
    "Give me advice for a first date.", "How do I fix a flat tyre?", "Describe your perfect breakfast.",
    "What is the meaning of friendship?", "Write a short note inviting a neighbour to tea.",
    "What are good habits to start this year?", "Explain how a bicycle's gears work.",
    "What questions should I ask a new doctor?", "Describe a snowy afternoon in a small town.",
)  # fmt: skip


@dataclass(frozen=True)
class Setting:
    strength: float  # a feature's in multiples of its max activation; a vector's as a share of the stream's norm
    prompt_scale: float = 1.0


# Clamp targets: every token steered alike, and the prompt steered 4x harder than the answer (the
# model reads a prompt about the concept, then writes with a lighter touch). Chosen on the steering
# demo's pilot prompts, where 2-4x and 1-1.5x at prompt x4 spanned fluent to broken for every concept.
DEFAULT_SETTINGS = (
    *(Setting(s) for s in (1.0, 2.0, 3.0, 4.0)),
    *(Setting(s, 4.0) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)),
)
# A vector adds a share of the mean stream norm at its layer, alike on every token or with the
# prompt read 4x harder (0.4-1.0 of the norm on the prompt). Chosen on the effect benchmark's pilot
# prompts, where contrastive vectors at layer 15 turned from no effect to broken within 0.3-0.45
# on every token, and reached the concept at less perplexity with the prompt steered harder.
VECTOR_SETTINGS = (
    *(Setting(s) for s in (0.2, 0.25, 0.3, 0.35, 0.4)),
    *(Setting(s, 4.0) for s in (0.1, 0.125, 0.15, 0.175, 0.2, 0.25)),
)


@dataclass(frozen=True)
class Answer:
    """One answer, as the sweep measured it."""

    fired: float | None  # share of its generated tokens where the feature fires, before steering (None: a vector's)
    fired_once: bool | None  # whether it fires on any of them
    similarity: float | None  # embedding similarity to the concept (None: no concept to judge by)
    relevance: float  # embedding similarity to its prompt
    perplexity: float  # under the unsteered model

    @property
    def shows(self) -> bool:
        """Whether the answer shows the concept: the feature fires in it and, where there is a
        concept to judge by, the judge finds it about the concept (a feature firing on a word
        that merely looks like its own is not the concept, nor is a judge's lucky guess). A
        vector has no feature to fire: the judge alone decides."""
        judged = self.similarity is None or self.similarity >= EMBEDDING_THRESHOLD
        return judged if self.fired_once is None else self.fired_once and judged


@dataclass(frozen=True)
class Measured:
    """One setting's answers, summarised."""

    strength: float
    prompt_scale: float
    fired: float | None  # mean share of tokens where the feature fires (None: a vector's sweep)
    answers_fired: float | None  # share of answers where it fires on some token
    judged: float | None  # share of answers the embedding judge finds about the concept
    concept: float  # what the recommendation maximises: the share of answers that show the concept (Answer.shows)
    relevance: float  # median answer-to-prompt similarity
    perplexity: float  # median
    perplexity_ratio: float  # median perplexity / the unsteered answers' median

    @classmethod
    def of(cls, setting: Setting, answers: list[Answer], unsteered_perplexity: float) -> Measured:
        read = answers[0].fired is not None
        fired = round(statistics.mean(a.fired for a in answers), 4) if read else None
        once = round(sum(a.fired_once for a in answers) / len(answers), 4) if read else None
        judged = None if answers[0].similarity is None else sum(a.similarity >= EMBEDDING_THRESHOLD for a in answers) / len(answers)
        perplexity = statistics.median(a.perplexity for a in answers)
        return cls(
            strength=setting.strength, prompt_scale=setting.prompt_scale, fired=fired, answers_fired=once,
            judged=None if judged is None else round(judged, 4),
            concept=round(sum(a.shows for a in answers) / len(answers), 4),
            relevance=round(statistics.median(a.relevance for a in answers), 4),
            perplexity=round(perplexity, 4), perplexity_ratio=round(perplexity / unsteered_perplexity, 4),
        )  # fmt: skip


def perplexity(logprobs: list[float]) -> float:
    """exp of the mean negative log-probability; inf for no tokens (nothing was written)."""
    return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else math.inf


def recommend(rows: list[Measured], budget: float) -> int | None:
    """The strongest setting within the fluency budget: in each prompt_scale's sweep, the strongest
    strength before the first whose median perplexity passes `budget` x unsteered (so one lucky
    strong setting past a failing weaker one is not taken); of those, the one that brings the
    concept most (the less perplexing on a tie). None if none is that fluent or shows the concept."""
    strongest = []
    for scale in dict.fromkeys(row.prompt_scale for row in rows):
        sweep = sorted((n for n, row in enumerate(rows) if row.prompt_scale == scale), key=lambda n: rows[n].strength)
        fluent = sweep[: next((k for k, n in enumerate(sweep) if rows[n].perplexity_ratio > budget), len(sweep))]
        if fluent and rows[fluent[-1]].concept > 0:
            strongest.append(fluent[-1])
    return max(strongest, key=lambda n: (rows[n].concept, -rows[n].perplexity_ratio)) if strongest else None


@dataclass(frozen=True)
class Calibration:
    """A feature's or kept vector's recommended setting, and what it measured when chosen."""

    mode: str
    strength: float  # in `unit`
    unit: str
    prompt_scale: float
    fluency_budget: float
    effect: float  # the recommended setting's concept score
    perplexity_ratio: float
    prompts: int
    concept: str  # what the embedding judge compared with ("" when it did not judge)

    def summary(self) -> dict:
        return asdict(self)


class Calibrations:
    """The calibrations of one SAE's features, kept in `calibrations.json` in its description
    directory; read again when the file changes (another API process, or a hand edit)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / CALIBRATIONS_FILE
        self._lock = threading.Lock()
        self._stamp: int | None = None
        self._data: dict[int, Calibration] = {}

    def get(self, index: int) -> Calibration | None:
        return self._current().get(index)

    def annotate(self, rows: list[dict]) -> list[dict]:
        """Feature rows (cards, search results) with each calibrated one's `calibration`: its
        recommended setting and the effect measured there."""
        calibrated = self._current()
        return [{**row, "calibration": calibrated[row["index"]].summary()} if row["index"] in calibrated else row for row in rows]

    def put(self, index: int, calibration: Calibration) -> None:
        """Keep `calibration` for feature `index`, replacing the file atomically."""
        with self._lock:
            data = {**self._read(), index: calibration}
            text = json.dumps({str(i): asdict(c) for i, c in sorted(data.items())}, indent=1) + "\n"
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".calibrations-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
            self._data, self._stamp = data, self.path.stat().st_mtime_ns

    def _current(self) -> dict[int, Calibration]:
        stamp = self.path.stat().st_mtime_ns if self.path.exists() else None
        if stamp != self._stamp:
            with self._lock:
                self._data, self._stamp = self._read(), stamp
        return self._data

    def _read(self) -> dict[int, Calibration]:
        if not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {int(i): Calibration(**c) for i, c in raw.items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{self.path}: not a calibrations file ({exc})") from exc
