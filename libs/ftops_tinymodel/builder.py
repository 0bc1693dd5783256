"""Build (or reuse) the cached tiny model directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from . import corpus
from .model import TrainConfig, completion_loss, exact_match, llama_config, pretrain
from .tokenizer import BOS, EOS, PAD, VOCAB_SIZE, save_tokenizer, train_tokenizer

# Bump whenever build logic changes in a way that alters the output files.
BUILD_VERSION = "2"
METADATA_FILE = "ftops_tinymodel.json"
# What the base model knows, as prompt/completion JSONL: the trainer measures retention on
# it (any base model directory may ship one under this name).
RETENTION_FILE = "ftops_retention.jsonl"
DEFAULT_CONFIG = TrainConfig()


def config_hash(cfg: TrainConfig = DEFAULT_CONFIG) -> str:
    blob = json.dumps({"train": cfg.as_dict(), "vocab_size": VOCAB_SIZE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(seed: int = 0, cfg: TrainConfig = DEFAULT_CONFIG) -> str:
    blob = json.dumps(
        {
            "build": BUILD_VERSION,
            "corpus": corpus.corpus_hash(),
            "config": config_hash(cfg),
            "seed": seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_dir(seed: int = 0) -> Path:
    env = os.environ.get("FTOPS_TINYMODEL_DIR")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ftops" / f"tinymodel-{cache_key(seed)}"


def read_metadata(model_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((Path(model_dir) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data


def is_complete(model_dir: Path, key: str) -> bool:
    meta = read_metadata(model_dir)
    return meta is not None and meta.get("cache_key") == key


@contextmanager
def _torch_settings(threads: int) -> Iterator[None]:
    """Pin threads/determinism for the build, then restore the caller's settings."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _token_id(tok: PreTrainedTokenizerBase, token: str) -> int:
    tid = tok.convert_tokens_to_ids(token)
    if not isinstance(tid, int):
        raise TypeError(f"bad id for {token!r}: {tid!r}")
    return tid


def _build_into(out: Path, seed: int, cfg: TrainConfig, key: str) -> dict[str, Any]:
    started = time.monotonic()
    texts = corpus.train_texts()
    save_tokenizer(train_tokenizer(texts), out, cfg.max_position_embeddings)
    # Tokenise through the saved HF tokenizer so training sees exactly what users will.
    tok = AutoTokenizer.from_pretrained(out)
    bos, eos, pad = (_token_id(tok, t) for t in (BOS, EOS, PAD))
    with _torch_settings(cfg.threads):
        torch.manual_seed(seed)
        mcfg = llama_config(cfg, len(tok), bos, eos, pad)
        mcfg._attn_implementation = "eager"  # fastest for these tiny shapes on CPU
        model = LlamaForCausalLM(mcfg)
        seqs = [tok(t)["input_ids"] + [eos] for t in texts]
        train_loss = pretrain(model, seqs, cfg, seed, pad)
        model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False, max_new_tokens=32
        )
        model.save_pretrained(out, safe_serialization=True)
        pairs = corpus.retention_set()
        (out / RETENTION_FILE).write_text("".join(json.dumps(p) + "\n" for p in pairs))
        em = exact_match(model, tok, pairs)
        ret_loss = completion_loss(model, tok, pairs)
    meta: dict[str, Any] = {
        "name": "ftops-tinymodel",
        "build_version": BUILD_VERSION,
        "cache_key": key,
        "config_hash": config_hash(cfg),
        "corpus_hash": corpus.corpus_hash(),
        "seed": seed,
        "train_config": cfg.as_dict(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        "train_facts": len(texts),
        "train_final_loss": round(train_loss, 6),
        "retention_exact_match": em,
        "retention_mean_loss": round(ret_loss, 6),
        "retention_size": len(pairs),
        "build_seconds": round(time.monotonic() - started, 2),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    # Written last: its presence (with the right cache_key) marks a complete build.
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def _make_readable(path: Path) -> None:
    """mkdtemp/safetensors create owner-only modes; a shared cache (e.g. an inference
    server running as another user) needs world-readable files."""
    os.chmod(path, 0o755)
    for f in path.iterdir():
        os.chmod(f, 0o644)


def _publish(tmp: Path, target: Path, replace: bool) -> Path:
    """Atomically move a finished build into place; first finisher wins unless replace."""
    try:
        os.rename(tmp, target)  # also succeeds over an empty directory
        return target
    except OSError:
        if not target.exists():
            raise
    if not replace:
        shutil.rmtree(tmp, ignore_errors=True)  # a concurrent builder got there first
        return target
    trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, trash)
    os.rename(tmp, target)
    shutil.rmtree(trash, ignore_errors=True)
    return target


def build(out_dir: Path | None = None, seed: int = 0, force: bool = False) -> Path:
    """Return a directory holding the tiny model, building it only if needed.

    Loadable with AutoTokenizer/AutoModelForCausalLM (and vLLM). Reuses an
    existing complete build for the same corpus/config/seed unless ``force``.
    """
    cfg = DEFAULT_CONFIG
    key = cache_key(seed, cfg)
    target = Path(out_dir).expanduser() if out_dir is not None else default_dir(seed)
    if not force and is_complete(target, key):
        return target
    stale_ours = read_metadata(target) is not None
    if target.exists() and any(target.iterdir()) and not (force or stale_ours):
        raise FileExistsError(f"{target} is non-empty and not a tiny-model build; pass force=True")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Temp dir beside the target so the final os.rename stays on one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _build_into(tmp, seed, cfg, key)
        _make_readable(tmp)
        # A stale build (different key) is ours to replace; a fresh one from a
        # concurrent process is kept.
        replace = force or (target.exists() and not is_complete(target, key))
        return _publish(tmp, target, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
