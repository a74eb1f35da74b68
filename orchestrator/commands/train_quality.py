"""`pretrain prep train-quality --positive good.jsonl --negative crawl.jsonl -o quality.bin`: a fastText quality
classifier for `filters.quality` (see dataprep/filters/quality_train.py), trained on labelled JSONL and checked on a
held-out share of it; prints the held-out accuracy overall and per source, and writes it beside the model
(`<model>.json`)."""

from __future__ import annotations

import argparse
import json

HELP = "train a fastText quality classifier from labelled JSONL (filters.quality)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--positive", action="append", default=[], metavar="JSONL",
                        help="a source of positive documents (repeat for several)")
    parser.add_argument("--negative", action="append", default=[], metavar="JSONL",
                        help="a source of negative documents (repeat for several)")
    parser.add_argument("--labelled", action="append", default=[], metavar="JSONL",
                        help="a source whose every line holds its label in --label-field (repeat for several)")
    parser.add_argument("-o", "--output", required=True, help="the model file to write (filters.quality.model)")
    parser.add_argument("--text-field", default="text", help="JSONL field of the text (default: %(default)s)")
    parser.add_argument("--label-field", default="label", help="--labelled: field of the label, e.g. 1 / 0 or "
                        "positive / negative (default: %(default)s)")
    parser.add_argument("--held-out", type=float, default=0.1, help="share held out for the accuracy check, by a "
                        "hash of the text (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--dim", type=int, default=64, help="embedding size (default: %(default)s)")
    parser.add_argument("--word-ngrams", type=int, default=2)
    parser.add_argument("--buckets", type=int, default=262_144, help="hashed n-gram rows (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="more are faster but not reproducible")
    parser.add_argument("--max-chars", type=int, default=0, help="characters of a document's start read; use "
                        "filters.quality.max_chars (default: all)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")


def _check(args: argparse.Namespace) -> None:
    from orchestrator.errors import UserError

    if not (args.positive or args.negative or args.labelled):
        raise UserError("no training data: give --positive and --negative JSONL sources, or --labelled ones")
    for name, value, low, high in (("--held-out", args.held_out, 0.0, 0.9), ("--epochs", args.epochs, 1, 1000),
                                   ("--lr", args.lr, 1e-6, 10.0), ("--dim", args.dim, 1, 1024),
                                   ("--word-ngrams", args.word_ngrams, 1, 5), ("--buckets", args.buckets, 1, 10**8),
                                   ("--threads", args.threads, 1, 1024), ("--max-chars", args.max_chars, 0, 2**30)):
        if not (low < value if name == "--held-out" else low <= value) or value > high:
            raise UserError(f"{name}: got {value}, allowed: {'above ' if name == '--held-out' else ''}{low} to {high}")


def run(args: argparse.Namespace) -> int:
    from dataprep.filters.quality_train import TrainSettings, train_quality

    _check(args)
    sources = [(p, kind) for kind in ("positive", "negative", "labelled") for p in getattr(args, kind)]
    settings = TrainSettings(held_out=args.held_out, epochs=args.epochs, lr=args.lr, dim=args.dim,
                             word_ngrams=args.word_ngrams, buckets=args.buckets, threads=args.threads,
                             max_chars=args.max_chars)
    result = train_quality(sources, args.output, args.text_field, args.label_field, settings)
    with open(args.output + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    if not args.quiet:
        print(f"wrote {args.output}: {result['documents']:,} documents, held-out accuracy {result['accuracy']:.3f} "
              f"on {result['held_out']:,} (majority label alone: {result['majority_baseline']:.3f})")
        for s in result["sources"]:
            accuracy = "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
            print(f"  {s['label']:<9} {s['path']}: {s['documents']:,} documents, {s['held_out']:,} held out, "
                  f"accuracy {accuracy}")
    return 0
