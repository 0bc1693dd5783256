"""CLI: ``python -m ftops_tinymodel build|eval``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .builder import build, read_metadata
from .evaluate import evaluate_new_facts, evaluate_retention


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftops_tinymodel")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse cached) tiny model")
    b.add_argument("--out", type=Path, default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true")
    e = sub.add_parser("eval", help="retention exact-match of a built model")
    e.add_argument("model_dir", type=Path)
    e.add_argument("--adapter", type=Path, default=None, help="optional PEFT LoRA adapter dir")
    e.add_argument("--new-facts", action="store_true", help="also score the new facts")
    args = parser.parse_args(argv)

    if args.cmd == "build":
        out = build(args.out, seed=args.seed, force=args.force)
        meta = read_metadata(out) or {}
        print(out)
        keys = (
            "retention_exact_match",
            "retention_mean_loss",
            "build_seconds",
            "num_parameters",
            "cache_key",
        )
        print(json.dumps({k: meta.get(k) for k in keys}, sort_keys=True))
        return 0
    result = {"retention_exact_match": evaluate_retention(args.model_dir, args.adapter)}
    if args.new_facts:
        result["new_facts_exact_match"] = evaluate_new_facts(args.model_dir, args.adapter)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
