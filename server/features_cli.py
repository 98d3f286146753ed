"""`steerserve features search|show`: an SAE's feature catalogue from the command line, with the
same search the server's `GET /v1/saes/{sae}/features?q=` runs (by meaning once labelled)."""

from __future__ import annotations

import argparse
import shutil
import textwrap

from features.catalogue import Catalogue
from features.formats import description_dir, parse_source


def run(args: argparse.Namespace) -> int:
    catalogue = Catalogue.load(description_dir(parse_source(args.sae)[1]))
    if catalogue is None:
        print(f"steerserve: {args.sae} has no feature catalogue")
        return 2
    if args.action == "search":
        rows = catalogue.search(args.query, args.limit, args.min_similarity)
        if not rows and catalogue.embeddings is not None:
            print(catalogue.nothing_close(args.query, args.min_similarity))
            return 0
        print_table(rows)
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
        line = f"{r['index']:>6}  {r[first]:>10}  {scored:>11}  {r['density']:>9.2e}  {r['max_act']:>8.2f}  {r['label']}"
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
