"""`steerserve features search|show`: an SAE's feature catalogue from the command line, with the
same search the server's `GET /v1/saes/{sae}/features?q=` runs (by meaning once labelled); and
`steerserve features calibrate`, through a running server's calibrate endpoint."""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from pathlib import Path

import httpx
from tqdm import tqdm

from features.calibration import Calibrations
from features.catalogue import Catalogue
from features.formats import description_dir, parse_source


def run(args: argparse.Namespace) -> int:
    directory = description_dir(parse_source(args.sae)[1])
    catalogue = Catalogue.load(directory)
    if catalogue is None:
        print(f"steerserve: {args.sae} has no feature catalogue")
        return 2
    if args.action == "search":
        rows = catalogue.search(args.query, args.limit, args.min_similarity)
        if not rows and catalogue.embeddings is not None:
            print(catalogue.nothing_close(args.query, args.min_similarity))
            return 0
        print_table(Calibrations(directory).annotate(rows))
    else:
        if not 0 <= args.index < len(catalogue.cards):
            print(f"steerserve: index {args.index} out of range: 0 <= index < {len(catalogue.cards)}")
            return 2
        print_card(catalogue.card(args.index))
    return 0


def print_table(rows: list[dict]) -> None:
    """One line per feature; by meaning, its similarity to the query and its label's detection
    score (a blank where unscored), and its explanation on the next line."""
    if not rows:
        print("no matching features")
        return
    width = shutil.get_terminal_size((120, 20)).columns
    first = "similarity" if "similarity" in rows[0] else "score"
    print(f"{'index':>6}  {first:>10}  {'label_score':>11}  {'density':>9}  {'max_act':>8}  label")
    for r in rows:
        scored = f"{r['label_score']:.2f}" if "label_score" in r else ""
        effect = f"  [calibrated: effect {r['calibration']['effect']:.2f}]" if "calibration" in r else ""
        line = f"{r['index']:>6}  {r[first]:>10}  {scored:>11}  {r['density']:>9.2e}  {r['max_act']:>8.2f}  {r['label']}{effect}"
        print(line[:width])
        if r.get("explanation"):
            print(" " * 8 + textwrap.shorten(r["explanation"], width - 8, placeholder=" ..."))


def print_card(card: dict) -> None:
    q = card["quantiles"]
    print(f"feature {card['index']}: {card['label']}")
    if card.get("explanation"):
        print(f"  {card['explanation']}  (by {card['labeller']}, detection score {card['label_score']})")
    print(f"  density {card['density']:.3e}  max_act {card['max_act']}  mean_act {card['mean_act']}  "
          f"p50/p90/p99 {q['p50']}/{q['p90']}/{q['p99']}")  # fmt: skip
    print(f"  promotes:   {' | '.join(card['promoted_tokens'])}")
    print(f"  suppresses: {' | '.join(card['suppressed_tokens'])}")
    print("  top contexts:")
    for c in card["top_contexts"]:
        print(textwrap.shorten(f"    {c['activation']:>7.2f}  {c['text']}", 160, placeholder=" ..."))


def calibrate(args: argparse.Namespace) -> int:
    """`steerserve features calibrate`: each feature calibrated through the server's endpoint, with
    progress; with --query, the search's first results, ranked by the effect each showed."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=None)
    indices = args.index
    if args.query:
        found = client.get(f"/v1/saes/{args.sae}/features", params={"q": args.query, "limit": args.candidates})
        if found.status_code != 200:
            print(f"steerserve: {found.json()['error']['message']}")
            return 2
        indices = [row["index"] for row in found.json()["data"]]
        if not indices:
            print(found.json().get("message", "no matching features"))
            return 0
    body = {"mode": args.mode, "fluency_budget": args.fluency_budget, "store": not args.no_store, "stream": True}
    if args.prompts:
        body["prompts"] = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if args.concept:
        body["concept"] = args.concept
    results = []
    for index in indices:
        result = _calibrate_one(client, args.sae, index, body)
        if "error" in result:
            print(f"steerserve: feature {index}: {result['error']['message']}")
            return 2
        print_calibration(result)
        results.append(result)
    if len(results) > 1:
        print("\nranked by effect (the concept score at each one's recommended setting):")
        ranked = sorted(results, key=lambda r: -(r["recommendation"] or {}).get("effect", -1))
        for r in ranked:
            top = r["recommendation"]
            said = f"effect {top['effect']:.2f} at {top['strength']:g}x max_act, prompt x{top['prompt_scale']:g}" if top else "no fluent setting"
            print(f"  {r['index']:>6}  {said}  ({r['concept'] or 'no label'})")
    return 0


def _calibrate_one(client: httpx.Client, sae: str, index: int, body: dict) -> dict:
    """One feature's calibration, its progress events drawn as a bar."""
    result: dict = {}
    with client.stream("POST", f"/v1/saes/{sae}/features/{index}/calibrate", json=body) as response:
        if response.status_code != 200:
            response.read()
            return response.json()
        with tqdm(total=None, desc=f"feature {index}", unit="answer") as bar:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if event.get("object") == "calibration.progress":
                    bar.total = event["total"]
                    bar.update(event["done"] - bar.n)
                else:
                    result = event
    return result


def print_calibration(result: dict) -> None:
    base = result["unsteered"]
    print(f"feature {result['index']} ({result['concept'] or 'no label'}), {result['mode']}, {result['prompts']} prompts, "
          f"{result['seconds']:.0f} s; unsteered: fires on {base['fired']:.0%} of tokens, in {base['answers_fired']:.0%} of answers, perplexity {base['perplexity']:.2f}")  # fmt: skip
    print(f"{'strength':>9}  {'prompt x':>8}  {'tokens':>6}  {'answers':>7}  {'judged':>6}  {'concept':>7}  {'relevance':>9}  {'ppl x':>6}")
    top = result["recommendation"]
    for row in result["curve"]:
        judged = f"{row['judged']:.0%}" if row["judged"] is not None else "-"
        mark = "  <- recommended" if top and (row["strength"], row["prompt_scale"]) == (top["strength"], top["prompt_scale"]) else ""
        print(f"{row['strength']:>9g}  {row['prompt_scale']:>8g}  {row['fired']:>6.0%}  {row['answers_fired']:>7.0%}  {judged:>6}  {row['concept']:>7.2f}  "
              f"{row['relevance']:>9.2f}  {row['perplexity_ratio']:>6.2f}{mark}")  # fmt: skip
    if top is None:
        print(result["message"])
    elif result["stored"]:
        print(f"stored: unit 'calibrated' strength 1 = {top['mode']} at {top['strength']:g}x max_act, prompt_scale {top['prompt_scale']:g}")
