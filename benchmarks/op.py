"""The steering op alone, against the matmuls of a decoder layer of the same shape: `python -m benchmarks.op`

Each configuration builds one hook (`steering/hook.py`) with random SAE weights and runs a step's
worth of tokens through both of its paths: the CPU op (request by request, in place) and the
gathered path (every token's table row gathered, then `hidden + delta`), which is what a GPU runs
and what the CPU ran before the op. Times are medians of REPS repetitions, the two paths
interleaved (every other repetition backwards), each after a warm-up; the spread is the range.
Peak transient memory is the most the op's own allocations held at once (torch profiler's CPU
allocator events), the gathered path's output included. The layer's matmuls (q, k, v, o and the
gated MLP, float32) are timed at the same shape and token count; where that would take minutes
(Llama-8B at 8192 tokens) they are timed at 256 tokens and scaled by the token count, since their
time is linear in it at these sizes. The gathered path is skipped where its two gathered
transients alone would pass OLD_OP_CAP. Writes op.json, op.md and op.png under benchmarks/results/
(`--threads 1`: op-1thread.*).

Threads: 2 by default (`--threads`). On a 2-core machine that other jobs share, every op that
torch parallelises can wait for the scheduler to give it the second core, which costs the op
(a dozen or two ops per chunk of a request's tokens) far more than the layer (seven large
matmuls); vLLM itself runs torch with one thread on such a machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from features.sae import ARCHITECTURES, SAE, SAEConfig
from steering.hook import SAESteering, TokenIndex

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    d_in: int
    d_sae: int
    d_kv: int  # width of the k and v projections (grouped-query attention)
    d_mlp: int

    def layer_weights(self) -> list[torch.Tensor]:
        """q, k, v, o, gate, up, down as [in, out] matrices."""
        d, kv, mlp = self.d_in, self.d_kv, self.d_mlp
        shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, mlp), (d, mlp), (mlp, d)]
        return [torch.randn(*s) / s[0] ** 0.5 for s in shapes]


SHAPES = (
    Shape("default (SmolLM2-135M)", d_in=576, d_sae=8192, d_kv=192, d_mlp=1536),
    Shape("Llama-8B", d_in=4096, d_sae=32768, d_kv=1024, d_mlp=14336),
)
FEATURES = (1, 4, 16, 64)  # per steered request, each its own table row (K, the table width)
TOKENS = (256, 8192)  # in the step
STEERED = (0.0, 0.5, 1.0)  # share of the step's tokens
SPECS = (1, 16, 256)  # distinct steered requests, each a different row
REPS = 5
OLD_OP_CAP = 2 << 30  # bytes of the gathered path's enc[slots] and dec[slots] together
LAYER_FLOPS_CAP = 2e11  # beyond this the layer is timed at 256 tokens and scaled


def random_sae(shape: Shape, architecture: str, seed: int = 0) -> SAE:
    """An SAE of the shape with random weights: what is measured is cost, which does not depend on
    what the features mean."""
    g = torch.Generator().manual_seed(seed)
    d, n = shape.d_in, shape.d_sae
    cfg = SAEConfig(architecture=architecture, d_in=d, d_sae=n, hook_name="blocks.0.hook_resid_post", layer=0,
                    apply_b_dec_to_input=True, normalize_activations="none", norm_scaling_factor=None, k=32)  # fmt: skip
    weights = {
        "W_enc": torch.randn(d, n, generator=g) / d**0.5,
        "b_enc": torch.zeros(n),
        "W_dec": torch.randn(n, d, generator=g) / d**0.5,
        "b_dec": torch.zeros(d),
        "threshold": torch.full((n,), 0.5),
    }
    return ARCHITECTURES[architecture]("bench", Path("."), cfg, weights, None)


def build_hook(sae: SAE, features: int, max_tokens: int) -> SAESteering:
    """A hook whose rows 1..max(SPECS) each hold `features` distinct random features, half of the
    requests adding, half clamping."""
    rows = max(SPECS) + 1
    hook = SAESteering(sae, TokenIndex.zeros(max_tokens), rows, features, torch.float32)
    rng = np.random.default_rng(features)
    for row in range(1, rows):
        idx = rng.choice(sae.cfg.d_sae, features, replace=False)
        hook.set_row(row, [(int(i), 2.0, -1.0 if row % 2 else 0.0) for i in idx])
    return hook


def route(hook: SAESteering, tokens: int, steered: float, specs: int) -> None:
    """Lay out a step as vLLM's batch does: `specs` steered requests of equal length covering the
    `steered` share of the tokens, each followed by an equal share of unsteered tokens."""
    n = round(steered * tokens)
    specs = min(specs, n)
    hook.slot_of_token.zero_()
    hook.routing.spans = []
    if not specs:
        return
    lengths, gaps = np.array_split(np.arange(n), specs), np.array_split(np.arange(tokens - n), specs)
    start = 0
    for row, (length, gap) in enumerate(zip(lengths, gaps), start=1):
        hook.slot_of_token[start : start + len(length)] = row
        hook.routing.spans.append((row, start, start + len(length)))
        start += len(length) + len(gap)


def peak_transient_bytes(fn: Callable[[], object]) -> int:
    """The most memory `fn`'s own allocations held at once (its result included): the running sum
    of the CPU allocator's events, as torch's profiler records them."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def layer_seconds(shape: Shape, tokens: int) -> dict:
    """The layer's seven matmuls at `tokens` tokens (timed at 256 and scaled past LAYER_FLOPS_CAP)."""
    weights = shape.layer_weights()
    flops = 2 * tokens * sum(w.shape[0] * w.shape[1] for w in weights)
    timed_at = tokens if flops <= LAYER_FLOPS_CAP else 256
    x, h = torch.randn(timed_at, shape.d_in), torch.randn(timed_at, shape.d_mlp)

    def layer() -> None:
        for w in weights:
            (h if w.shape[0] == shape.d_mlp else x) @ w

    layer()
    times = [seconds(layer) * tokens / timed_at for _ in range(REPS)]
    return {"flops": flops, "timed_at_tokens": timed_at, **spread(times)}


def measure(hook: SAESteering, tokens: int, old_op: bool) -> dict[str, dict]:
    """Both paths on one routed step: times interleaved, then each path's peak transient memory."""
    g = torch.Generator().manual_seed(tokens)
    hidden, residual = torch.randn(tokens, hook.cfg.d_in, generator=g), torch.randn(tokens, hook.cfg.d_in, generator=g)
    paths: dict[str, Callable[[torch.Tensor], object]] = {"new": lambda h: hook(h, residual)}
    if old_op:
        paths["old"] = lambda h: h + hook.delta(h + residual)
    copies = {name: hidden.clone() for name in paths}  # the new op steers in place; each run starts afresh
    times: dict[str, list[float]] = {name: [] for name in paths}
    for rep in range(REPS + 1):
        for name in paths if rep % 2 else reversed(list(paths)):
            copies[name].copy_(hidden)
            elapsed = seconds(functools.partial(paths[name], copies[name]))
            if rep:  # the first round warms up
                times[name].append(elapsed)
    out = {}
    for name, path in paths.items():
        copies[name].copy_(hidden)
        out[name] = {**spread(times[name]), "peak_bytes": peak_transient_bytes(functools.partial(path, copies[name]))}
    return out


def run(shapes: tuple[Shape, ...], quick: bool) -> dict:
    started, load_before = time.monotonic(), os.getloadavg()
    rows, layers = [], {}
    grid = [(s, "jumprelu", k, t) for s in shapes for k in FEATURES for t in TOKENS]
    # TopK encodes each steered request's tokens at full width, reading all of W_enc per request:
    # seconds per call past the default shape at 256 tokens, so only that, at one K.
    grid += [(shapes[0], "topk", 64, 256)]
    if quick:
        grid = [(s, a, k, t) for s, a, k, t in grid if t == 256 and k in (1, 64)]
    saes = {}
    for shape, architecture, features, tokens in grid:
        key = f"{shape.name} @ {tokens}"
        if key not in layers:
            layers[key] = layer_seconds(shape, tokens)
            print(f"layer {key}: {layers[key]['median_s'] * 1e3:.1f} ms", flush=True)
        if (shape.name, architecture) not in saes:
            saes = {(shape.name, architecture): random_sae(shape, architecture)}  # one at a time: 1 GiB at 8B
        hook = build_hook(saes[shape.name, architecture], features, max(TOKENS))
        fits = 2 * tokens * features * shape.d_in * 4 <= OLD_OP_CAP
        for steered in STEERED:
            for specs in SPECS if steered else (0,):
                if specs > round(steered * tokens):
                    continue
                route(hook, tokens, steered, specs)
                # The gathered path costs the same however the step is routed: two routings show it.
                old_op = fits and (steered, specs) in ((0.0, 0), (1.0, 16))
                for path, m in measure(hook, tokens, old_op).items():
                    row = {"shape": shape.name, "architecture": architecture, "tokens": tokens, "features": features,
                           "steered": steered, "specs": specs, "path": path, **m,
                           "layer_ratio": m["median_s"] / layers[key]["median_s"]}  # fmt: skip
                    rows.append(row)
                    print(_line(row), flush=True)
        if not fits:
            print(f"  gathered path skipped: {2 * tokens * features * shape.d_in * 4 / 2**30:.0f} GiB of gathers")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    return {
        "machine": {**machine, "threads": torch.get_num_threads(), "torch": torch.__version__},
        "seconds": round(time.monotonic() - started),
        "load_average_before_after": [load_before, os.getloadavg()],
        "reps": REPS,
        "old_op_cap_bytes": OLD_OP_CAP,
        "shapes": [asdict(s) for s in shapes],
        "layers": layers,
        "rows": rows,
    }


def _line(r: dict) -> str:
    return (f"{r['shape']:>22} {r['architecture']:>8} T={r['tokens']:<5} K={r['features']:<3} {r['steered']:>4.0%} "
            f"specs={r['specs']:<4} {r['path']}: {r['median_s'] * 1e3:9.3f} ms [{r['min_s'] * 1e3:.3f}-{r['max_s'] * 1e3:.3f}] "
            f"{r['peak_bytes'] / 2**20:8.1f} MiB  {r['layer_ratio']:.2%} of the layer")  # fmt: skip


def write(out: Path, result: dict, name: str) -> None:
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# The steering op alone, against a decoder layer's matmuls",
        "",
        (
            f"`python -m benchmarks.op`, {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch "
            f"{m['torch']}; run took {result['seconds']} s; load average (1, 5, 15 min) {_loads(result)}. Method: the "
            "docstring of benchmarks/op.py. \"new\" is the CPU op (request by request, in place), \"old\" the gathered "
            "path (every token's row gathered; what a GPU runs). Times: median of "
            f"{result['reps']} interleaved repetitions [min-max]; memory: peak of the path's own allocations; ratio: "
            "the median over the median of the layer's matmuls (q, k, v, o, gate, up, down) at the same shape and tokens. "
            "The thread count matters on a shared machine (the docstring says why); `--threads 1` writes op-1thread.md."
        ),
        "",
        "## Headline: every configuration at 8192 tokens and K = 64",
        "",
        "| shape | SAE | steered | specs | path | median ms [min-max] | peak MiB | % of layer |",
        "|---|---|---|---|---|---|---|---|",
        *[_row(r, headline=True) for r in result["rows"] if r["tokens"] == 8192 and r["features"] == 64],
        "",
        "## The layers",
        "",
        "| shape @ tokens | GFLOP | timed at tokens | median ms [min-max] |",
        "|---|---|---|---|",
    ]
    for key, layer in result["layers"].items():
        lines.append(f"| {key} | {layer['flops'] / 1e9:.0f} | {layer['timed_at_tokens']} | "
                     f"{layer['median_s'] * 1e3:.1f} [{layer['min_s'] * 1e3:.1f}-{layer['max_s'] * 1e3:.1f}] |")  # fmt: skip
    lines += [
        "",
        "## Every configuration",
        "",
        "| shape | SAE | tokens | K | steered | specs | path | median ms [min-max] | peak MiB | % of layer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(r, headline=False) for r in result["rows"]]
    cap = result["old_op_cap_bytes"] / 2**30
    old_rows = (
        "\"old\" rows are measured at 0% and at 100% steered by 16 specs (its cost does not depend on the routing), "
        f"and missing where it would gather more than {cap:.0f} GiB."
    )
    lines += ["", old_rows, "", f"![op]({name}.png)"]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    _plot(out / f"{name}.png", result)


def _row(r: dict, headline: bool) -> str:
    """A configuration as a table row (the headline's leave out tokens and K, which it fixes)."""
    where = f"| {r['shape']} | {r['architecture']} |" + ("" if headline else f" {r['tokens']} | {r['features']} |")
    return (f"{where} {r['steered']:.0%} | {r['specs']} | {r['path']} | {r['median_s'] * 1e3:.3f} "
            f"[{r['min_s'] * 1e3:.3f}-{r['max_s'] * 1e3:.3f}] | {r['peak_bytes'] / 2**20:.1f} | {100 * r['layer_ratio']:.3f} |")  # fmt: skip


def _loads(result: dict) -> str:
    before, after = result["load_average_before_after"]
    return f"{', '.join(f'{x:.1f}' for x in before)} before, {', '.join(f'{x:.1f}' for x in after)} after"


def _plot(path: Path, result: dict) -> None:
    """Time (as a share of the layer) and peak memory against K, every token steered by 16 specs."""
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4))
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for shape in result["shapes"]:
        for tokens in TOKENS:
            colour = next(colours)  # one per shape and step, the paths told apart by line style
            for op, style in (("new", "-"), ("old", "--")):
                points = sorted((r["features"], r["layer_ratio"], r["peak_bytes"]) for r in result["rows"]
                                if r["shape"] == shape["name"] and r["tokens"] == tokens and r["path"] == op
                                and r["architecture"] == "jumprelu" and r["steered"] == 1.0 and r["specs"] == 16)  # fmt: skip
                if points:
                    label = f"{op}, {shape['name']}, T={tokens}"
                    time_ax.plot([p[0] for p in points], [100 * p[1] for p in points], style, color=colour, marker="o", label=label)
                    mem_ax.plot([p[0] for p in points], [p[2] / 2**20 for p in points], style, color=colour, marker="o", label=label)
    time_ax.axhline(5, color="grey", linestyle=":", label="5% of the layer")
    time_ax.set(xscale="log", yscale="log", xlabel="features per request (K)", ylabel="% of the layer's matmul time",
                title="Op time, every token steered, 16 specs")  # fmt: skip
    mem_ax.set(xscale="log", yscale="log", xlabel="features per request (K)", ylabel="peak transient MiB",
               title="Op memory, every token steered, 16 specs")  # fmt: skip
    time_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.op")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="256 tokens and K 1 and 64 only (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        write(args.out, run(SHAPES, args.quick), "op" if args.threads == 2 else f"op-{args.threads}thread")


if __name__ == "__main__":
    main()
