"""What the load tests share: the servers they compare, the SAEs steerserve loads, and the
measured run of one scenario."""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch
from openai import OpenAI

from benchmarks.loadtest import Result, Scenario, SpecFactory, run
from core.local import Server, ensure_default_model, free_port, home, serve_command, start_server, stop_server
from features.formats import DEFAULT_SAE, load_sae, save_sae
from server.cli import model_dtype

PROMPTS = [
    "Give me a recipe for dinner.",
    "Write a short poem about the sea.",
    "Explain how tides work.",
    "What should I pack for a trip to the mountains?",
    "Describe your ideal weekend.",
    "How do I start learning to play the guitar?",
    "Tell me a fun fact about octopuses.",
    "Summarise the plot of a famous novel.",
]
# Everyday words: long prompts made of them tokenise at about a token a word.
WORDS = ("the river town market morning people walked along old stone bridge while children played near water "
         "and traders sold bread fish apples cloth under bright summer sky before evening rain came slowly").split()  # fmt: skip
MODEL = "SmolLM2-135M-Instruct"
D_SAE = 16384
MAX_TOKENS = 64
KV_CACHE_GIB = 1.5  # per engine: ~70k bfloat16 tokens, several times what c=128 holds
T = TypeVar("T")


def benchmark_saes() -> dict[str, tuple[Path, int]]:
    """The default SAE (layer 15, with statistics, so specs can use `unit: max_act`) and a 16k-feature
    JumpReLU SAE at layer 20 with random unit directions: what is measured is cost, and cost does
    not depend on what the features mean."""
    path = home() / "bench-saes" / "l20"
    if not (path / "sae_weights.safetensors").exists():
        g = torch.Generator().manual_seed(20)
        dirs = torch.randn(D_SAE, 576, generator=g)
        dirs /= dirs.norm(dim=1, keepdim=True)
        cfg = {"architecture": "jumprelu", "d_in": 576, "d_sae": D_SAE, "hook_name": "blocks.20.hook_resid_post",
               "apply_b_dec_to_input": False, "normalize_activations": "none"}  # fmt: skip
        weights = {"W_enc": dirs.T.contiguous(), "b_enc": torch.zeros(D_SAE), "W_dec": dirs,
                   "b_dec": torch.zeros(576), "threshold": torch.full((D_SAE,), 0.5)}  # fmt: skip
        save_sae(path, cfg, weights, max_act=torch.full((D_SAE,), 10.0))
    return {"default": (DEFAULT_SAE, load_sae("default", DEFAULT_SAE).cfg.d_sae), "l20": (path, D_SAE)}


def long_prompts(n: int, seed: int = 0) -> list[str]:
    """n documents of 1,500 to 3,000 words (as many tokens), each asked to be summarised."""
    rng = random.Random(seed)
    docs = (" ".join(rng.choices(WORDS, k=rng.randint(1500, 3000))) for _ in range(n))
    return [f"{doc}\n\nSummarise the text above in one sentence." for doc in docs]


def steered_outputs_differing(server: Server, spec: SpecFactory, n: int = 8, max_tokens: int = 16, api_key: str = "unused") -> int:
    """Of n steered greedy completions (spec drawn per request, prompts in turn), how many differ
    from the unsteered greedy completion of the same prompt: the proof that steering was applied,
    not just accepted. Random 4-feature specs in max_act units change nearly every answer."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=300)

    def greedy(prompt: str, steering: dict | None) -> str:
        extra = {"steering": steering} if steering else {}
        messages = [{"role": "user", "content": prompt}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, extra_body=extra)
        return reply.choices[0].message.content or ""

    rng, prompts = random.Random(1), [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    plain = {p: greedy(p, None) for p in set(prompts)}
    return sum(greedy(p, spec(rng, i)) != plain[p] for i, p in enumerate(prompts))


def start_targets(logs: Path, saes: dict[str, tuple[Path, int]], with_hf: bool) -> dict[str, Server]:
    """steerserve with the benchmark SAEs, steerserve with none (its API layer and plugins without
    any hook, to tell where a cost comes from), plain `vllm serve`, and optionally the
    transformers-hooks baseline: all on the same checkpoint, keyed by the name reports use."""
    model = ensure_default_model()
    sae_args = [a for sae_id, (p, _) in saes.items() for a in ("--sae", f"{sae_id}={p}")]
    # Up to four engines side by side, each with the same KV cache (far more than the load needs).
    common = ["--max-model-len", "4096", "--max-num-seqs", "256"]
    kv = ["--kv-cache-gib", str(KV_CACHE_GIB)]
    py = sys.executable
    commands = {
        "steerserve": serve_command(*common, *kv, *sae_args),
        "steerserve, no SAE": serve_command(*common, *kv, "--no-default-sae"),
        "plain vLLM": [py, "-m", "benchmarks.plain_vllm", "--model", str(model), "--served-model-name", MODEL,
                       "--enable-prefix-caching", "--dtype", model_dtype("auto"), "--kv-cache-memory-bytes", str(int(KV_CACHE_GIB * 2**30)), *common],
    }  # fmt: skip
    if with_hf:
        commands["hf hooks"] = [py, "-m", "benchmarks.hf_server", "--model", str(model), *sae_args]
    print(f"starting {', '.join(commands)} ...", flush=True)
    servers: dict[str, Server] = {}
    try:
        for name, command in commands.items():
            port = free_port()
            log = logs / (name.replace(", ", "-").replace(" ", "-").lower() + ".log")
            servers[name] = start_server([*command, "--port", str(port)], port, log)
    except BaseException:
        for server in servers.values():
            stop_server(server)
        raise
    return servers


def interleaved(items: list[T], repeats: int) -> Iterator[tuple[int, T]]:
    """(round, item) for `repeats` rounds over `items`, every other round backwards: drift on a
    shared machine hits every item alike, and no item always runs first or last."""
    for rep in range(repeats):
        for item in items if rep % 2 == 0 else items[::-1]:
            yield rep, item


class Bench:
    def __init__(self):
        self.results: list[Result] = []
        self.started = time.monotonic()

    def measure(self, server: Server, scenario: Scenario, target: str, prompts: list[str] = PROMPTS) -> Result:
        # Four servers share two cores and take turns: a short unmeasured warm-up first, so the
        # measured batch never pays for a server waking from idle.
        warm = min(scenario.concurrency, 16)
        asyncio.run(run(server.url, MODEL, prompts, replace(scenario, concurrency=warm, requests=warm)))
        result = asyncio.run(run(server.url, MODEL, prompts, scenario))
        result.labels = {**scenario.labels, "target": target}
        self.results.append(result)
        elapsed = time.monotonic() - self.started
        print(
            f"[{elapsed:6.0f}s] {target:12} {scenario.name:28} c={scenario.concurrency:<4} "
            f"{result.output_tok_s:8.1f} tok/s  {result.prompt_tok_s:8.1f} prompt tok/s  TTFT p99 {result.ttft_ms['p99']} ms  errors {result.errors}",
            flush=True,
        )
        return result


def rounds_args(prog: str, rounds: int) -> argparse.Namespace:
    """`--out` and `--rounds`, as each side-by-side ratio benchmark takes them; `out/logs` made."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    return args
