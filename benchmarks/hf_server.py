"""The baseline a researcher would otherwise reach for: transformers + a forward hook, one
generate call per request, behind a minimal OpenAI-style streaming endpoint.

It applies the same steering formula as steerserve (tests/reference.py is the same idea), but
serves one request at a time, as research steering servers do.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from features.formats import load_sae
from features.sae import SAE


def build_app(model_dir: str, saes: dict[str, SAE]) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # float32: transformers' bfloat16 forward is 2.4x slower on these CPUs; the baseline gets its best.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    one_at_a_time = threading.Lock()
    app = FastAPI()

    def hook_for(features: list[dict]):
        by_layer: dict[int, dict[str, list[dict]]] = {}
        for f in features:
            sae = saes[f["sae"]]
            by_layer.setdefault(sae.cfg.layer, {}).setdefault(f["sae"], []).append(f)
        handles = []
        for layer, per_sae in by_layer.items():

            def hook(module, args, output, per_sae=per_sae):
                hidden = output[0] if isinstance(output, tuple) else output
                x = hidden.float().reshape(-1, hidden.shape[-1])
                delta = torch.zeros_like(x)
                for sae_id, fs in per_sae.items():
                    sae = saes[sae_id]
                    acts = sae.encode(x)  # once per SAE and forward, as SAELens-style hooks do
                    for f in fs:
                        a = acts[:, f["index"] : f["index"] + 1]
                        s = f.get("strength", 0.0) * (float(sae.max_act[f["index"]]) if f.get("unit") == "max_act" else 1.0)
                        coef = {"add": s + 0 * a, "clamp": s - a, "ablate": -a, "scale": (s - 1) * a}[f["mode"]]
                        delta += coef * sae.W_dec[f["index"]]
                steered = (x + delta).reshape(hidden.shape).to(hidden.dtype)
                return (steered, *output[1:]) if isinstance(output, tuple) else steered

            handles.append(model.model.layers[layer].register_forward_hook(hook))
        return handles

    def generate(body: dict, streamer: TextIteratorStreamer) -> None:
        with one_at_a_time, torch.no_grad():
            handles = hook_for((body.get("steering") or {}).get("features", []))
            try:
                text = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
                ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
                n = body.get("max_tokens", 64)
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=0.8, streamer=streamer)
            finally:
                for h in handles:
                    h.remove()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        threading.Thread(target=generate, args=(body, streamer), daemon=True).start()

        def events():
            tokens = 0
            for piece in streamer:
                if piece:
                    tokens += 1
                    chunk = {"id": "hf", "object": "chat.completion.chunk", "created": int(time.time()), "model": body["model"],
                             "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}  # fmt: skip
                    yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": 0, "completion_tokens": body.get("max_tokens", 64), "total_tokens": 0}
            yield f"data: {json.dumps({'id': 'hf', 'object': 'chat.completion.chunk', 'created': 0, 'model': body['model'], 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--sae", action="append", default=[])
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    saes = {i: load_sae(i, p) for i, p in (s.split("=", 1) for s in args.sae)}
    uvicorn.run(build_app(args.model, saes), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
