"""CLI: ``python -m ftops_models smollm2|convert GGUF|check DIR``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .check import ModelDirError, check_model_dir
from .gguf_convert import GGUFError, convert_gguf, read_metadata, verify
from .smollm2 import smollm2_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftops_models")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("smollm2", help="convert (or reuse) SmolLM2-135M-Instruct")
    s.add_argument("--out", type=Path, default=None)
    s.add_argument("--force", action="store_true")
    c = sub.add_parser("convert", help="convert a GGUF file into a Hugging Face directory")
    c.add_argument("gguf", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--force", action="store_true")
    v = sub.add_parser("check", help="check a model directory (and its recorded sha256s)")
    v.add_argument("model_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "smollm2":
            out = smollm2_dir(args.out, force=args.force)
        elif args.cmd == "convert":
            out = convert_gguf(args.gguf, args.out, force=args.force)
        else:
            out = check_model_dir(args.model_dir)
            changed = verify(out)
            if changed:
                print(f"error: files differ from their recorded sha256: {changed}")
                return 1
    except (GGUFError, ModelDirError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    meta = read_metadata(out) or {}
    keys = ("name", "architecture", "num_parameters", "source", "convert_seconds")
    print(json.dumps({k: meta[k] for k in keys if k in meta}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
