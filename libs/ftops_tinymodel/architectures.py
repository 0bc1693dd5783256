"""Tiny random-weight models of other architectures than the tiny Llama, sharing its
tokenizer: what the tests use to check that every common architecture trains and is
served (Llama, Qwen2, Mistral, Gemma, Phi-3 with its fused projections, GPT-2 with its
``Conv1D`` layers). Built in well under a second each; nothing is downloaded.

Usage::

    from ftops_tinymodel.architectures import ARCHITECTURES, build_architecture
    base_dir = build_architecture("phi3", build(), tmp_path / "phi3")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2")
# Large random weights: greedy decoding has clear winners, no near-ties that float
# rounding could flip between two correct implementations.
INIT_RANGE = 0.2


def architecture_config(arch: str, tokenizer: Any) -> Any:
    """A transformers config of ``arch``: 2 layers, hidden size 128 in 4 heads of 32 (the
    smallest head size vLLM's CPU attention takes), the tokenizer's vocab."""
    from transformers import (
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    ids: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": INIT_RANGE,
        "tie_word_embeddings": True,
    }
    if arch == "gpt2":
        return GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=128, **ids)
    shape: dict[str, Any] = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    if arch == "gemma":
        return GemmaConfig(head_dim=32, **shape, **ids)
    configs: dict[str, Any] = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "mistral": MistralConfig,
        "phi3": Phi3Config,
    }
    if arch not in configs:
        raise ValueError(f"unknown architecture {arch!r} (one of {', '.join(ARCHITECTURES)})")
    return configs[arch](**shape, **ids)


def build_architecture(arch: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A random-weight base model of ``arch`` with the tokenizer in ``tokenizer_dir`` (the
    tiny model's), saved in ``out`` as a base model directory (safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = architecture_config(arch, tokenizer)
    torch.manual_seed(seed)
    auto: Any = AutoModelForCausalLM  # from_config is untyped
    model = auto.from_config(config)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def greedy_texts(
    base_dir: Path, adapter_dir: Path | None, prompts: Sequence[str], max_tokens: int
) -> list[str]:
    """The reference output: transformers' greedy ``generate`` on the base model, through
    PEFT's ``PeftModel`` when ``adapter_dir`` is given, one prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        from peft import PeftModel  # imported lazily: only adapter users need peft

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        new = out[0, ids["input_ids"].shape[1] :]
        texts.append(str(tokenizer.decode(new, skip_special_tokens=True)))
    return texts
