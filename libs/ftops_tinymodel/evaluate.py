"""Load a built model (optionally with a LoRA adapter) and score it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from . import corpus
from .model import CausalLM, exact_match


def load(
    model_dir: Path, adapter_dir: Path | None = None
) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """Load model + tokenizer from safetensors; apply a PEFT adapter if given."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.nn.Module.eval(base)  # PreTrainedModel.eval is untyped
    if adapter_dir is None:
        return base, tok
    from peft import PeftModel  # imported lazily: only adapter users need peft

    model = PeftModel.from_pretrained(base, str(adapter_dir))
    torch.nn.Module.eval(model)
    return model, tok


def evaluate_retention(model_dir: Path, adapter_dir: Path | None = None) -> float:
    """Greedy exact-match on the retention set (did an adapter cause forgetting?)."""
    model, tok = load(model_dir, adapter_dir)
    return exact_match(model, tok, corpus.retention_set())


def evaluate_new_facts(model_dir: Path, adapter_dir: Path | None = None) -> float:
    """Greedy exact-match on the new facts (did an adapter teach them?)."""
    model, tok = load(model_dir, adapter_dir)
    return exact_match(model, tok, corpus.new_facts())
