"""The default SAE's training corpus, from sources that can be had offline here.

Two kinds of text:

- chats the default model writes itself, through our own server, for every topic x task in
  `features.topics` (what users will steer). They are committed (`chats.jsonl.gz`, about 1 MB),
  because batched sampling is not bit-reproducible, and regenerated only on request;
- public-domain or permissively licensed text from Debian packages, fetched from Debian's
  archive at pinned versions and checked against their sha256.

Every document is tokenized with the model's tokenizer into one uint16 token stream; the
manifest records each source's URL, licence, checksum, document and token counts.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from features import wordnet
from features.topics import prompts

DEBIAN = "http://deb.debian.org/debian/"
WORDNET_DIR = "usr/share/wordnet"  # in the unpacked wordnet-base package
HELD_OUT_EVERY = 50  # every 50th document is held out for the quality report


@dataclass(frozen=True)
class DebianSource:
    name: str
    pool_path: str
    sha256: str
    licence: str
    documents: Callable[[Path], Iterator[str]]  # unpacked package root -> documents

    @property
    def url(self) -> str:
        return DEBIAN + self.pool_path


def _python_docs(root: Path) -> Iterator[str]:
    for path in sorted((root / "usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt")):
        yield path.read_text(errors="replace")


def _wordnet(root: Path) -> Iterator[str]:
    """Each synset as 'word, word: gloss', 40 to a document."""
    entries = [f"{', '.join(s.words)}: {s.gloss}" for s in wordnet.synsets(root / WORDNET_DIR)]
    for i in range(0, len(entries), 40):
        yield "\n".join(entries[i : i + 40])


def _fortunes(root: Path) -> Iterator[str]:
    for path in sorted((root / "usr/share/games/fortunes").iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink():
            continue
        items = [f.strip() for f in path.read_text(errors="replace").split("\n%\n") if f.strip()]
        for i in range(0, len(items), 20):
            yield "\n\n".join(items[i : i + 20])


def _jargon(root: Path) -> Iterator[str]:
    text = gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode(errors="replace")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    for i in range(0, len(paragraphs), 30):
        yield "\n\n".join(paragraphs[i : i + 30])


PUBLIC = [
    DebianSource(
        "python3.11-doc",
        "pool/main/p/python3.11/python3.11-doc_3.11.2-6+deb12u8_all.deb",
        "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
        "PSF-2.0 (Python documentation)",
        _python_docs,
    ),
    DebianSource(
        "wordnet-base",
        "pool/main/w/wordnet/wordnet-base_3.0-37_all.deb",
        "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
        "WordNet-3.0 (permissive, BSD-like)",
        _wordnet,
    ),
    DebianSource(
        "fortunes",
        "pool/main/f/fortune-mod/fortunes_1.99.1-7.3_all.deb",
        "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
        "BSD-4-Clause (fortune-mod data files)",
        _fortunes,
    ),
    DebianSource(
        "jargon-text",
        "pool/main/j/jargon-text/jargon-text_4.4.7-4.1_all.deb",
        "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb",
        "public domain (the Jargon File)",
        _jargon,
    ),
]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_debian(source: DebianSource, downloads: Path) -> Path:
    """Download (once) and unpack a pinned Debian package; returns the unpacked root."""
    deb = downloads / Path(source.pool_path).name
    if not deb.exists() or sha256_bytes(deb.read_bytes()) != source.sha256:
        downloads.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(source.url, timeout=120) as response:
            data = response.read()
        if sha256_bytes(data) != source.sha256:
            raise RuntimeError(f"{source.url}: sha256 {sha256_bytes(data)}, expected {source.sha256}")
        deb.write_bytes(data)
    root = downloads / f"{source.name}.unpacked"
    if not root.exists():
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
            Path(tmp).rename(root)
            Path(tmp).mkdir()  # TemporaryDirectory removes what it created
    return root


# --- chats the default model writes through our own server -----------------------------------

CHAT_MAX_TOKENS = 320
CHAT_TEMPERATURE = 0.8


def load_chats(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def generate_chats(out: Path, regenerate: bool = False, concurrency: int = 128) -> Path:
    """Have the default model answer every prompt of `features.topics` through steerserve.
    The answers `out` already holds are kept unless `regenerate`, so new prompts cost only their own."""
    todo = prompts()
    kept = {} if regenerate or not out.exists() else {c["prompt"]: c["reply"] for c in load_chats(out)}
    missing = [p for p in todo if p not in kept]
    if not missing:
        return out
    from openai import AsyncOpenAI

    from core.local import start_steerserve, stop_server

    log = Path(tempfile.gettempdir()) / "steerserve-chats.log"
    print(f"starting steerserve for {len(missing)} chats (log: {log})", file=sys.stderr)
    server = start_steerserve([], log)

    async def run() -> dict[str, str]:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=3, timeout=1800)
        gate = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(missing), desc="chats", unit="chat")
        written = [0]

        async def one(prompt: str) -> str:
            async with gate:
                reply = await client.chat.completions.create(
                    model="SmolLM2-135M-Instruct",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=CHAT_MAX_TOKENS,
                    temperature=CHAT_TEMPERATURE,
                )
            written[0] += reply.usage.completion_tokens
            bar.update()
            bar.set_postfix(tokens=written[0])
            return reply.choices[0].message.content

        replies = await asyncio.gather(*(one(p) for p in missing))
        bar.close()
        await client.close()
        return dict(zip(missing, replies))

    try:
        kept.update(asyncio.run(run()))
    finally:
        stop_server(server)
    partial = out.with_suffix(".partial")
    with gzip.GzipFile(partial, "wb", mtime=0) as f:  # mtime 0: the same chats give the same bytes
        for n, prompt in enumerate(todo):
            f.write((json.dumps({"id": n, "prompt": prompt, "reply": kept[prompt]}) + "\n").encode())
    partial.rename(out)
    return out


def chat_texts(path: Path, tokenizer) -> Iterator[str]:
    """Each chat rendered with the model's chat template, as the server renders requests."""
    for chat in load_chats(path):
        messages = [{"role": "user", "content": chat["prompt"]}, {"role": "assistant", "content": chat["reply"]}]
        yield tokenizer.apply_chat_template(messages, tokenize=False)


def build_corpus(chats: Path, downloads: Path, out: Path, tokenizer) -> dict:
    """Tokenize every source into `train.npy` and `heldout.npy` (uint16 token streams, each
    document followed by EOS; every HELD_OUT_EVERY-th document held out) and return the manifest."""
    sources: list[tuple[str, str, str, str, Iterator[str]]] = [
        ("model-written chats", "features/default/chats.jsonl.gz (this repository)",
         "generated by SmolLM2-135M-Instruct (Apache-2.0) through steerserve",
         sha256_bytes(chats.read_bytes()), chat_texts(chats, tokenizer)),
    ]  # fmt: skip
    for source in PUBLIC:
        root = fetch_debian(source, downloads)
        sources.append((source.name, source.url, source.licence, source.sha256, source.documents(root)))
    streams: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    manifest = {"sources": [], "eos_token_id": tokenizer.eos_token_id}
    n_doc = 0
    for name, url, licence, checksum, documents in sources:
        counts = {"train": 0, "heldout": 0}
        digest = hashlib.sha256()
        docs = 0
        for text in tqdm(documents, desc=f"tokenizing {name}", unit="doc"):
            ids = np.asarray([*tokenizer(text, add_special_tokens=False).input_ids, tokenizer.eos_token_id], np.uint16)
            split = "heldout" if n_doc % HELD_OUT_EVERY == 0 else "train"
            streams[split].append(ids)
            counts[split] += len(ids)
            digest.update(ids.tobytes())
            n_doc += 1
            docs += 1
        manifest["sources"].append({
            "name": name, "url": url, "licence": licence, "sha256": checksum, "documents": docs,
            "tokens": counts["train"] + counts["heldout"], "heldout_tokens": counts["heldout"],
            "tokens_sha256": digest.hexdigest(),
        })  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for split, parts in streams.items():
        np.save(out / f"{split}.npy", np.concatenate(parts))
    manifest["tokens"] = sum(s["tokens"] for s in manifest["sources"])
    return manifest


if __name__ == "__main__":
    generate_chats(Path(sys.argv[1]))
