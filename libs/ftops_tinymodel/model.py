"""Tiny Llama definition, pretraining loop and greedy exact-match evaluation."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


class CausalLM(Protocol):
    """What evaluation needs: satisfied by HF causal LMs and PEFT-wrapped ones."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def generate(self, *args: Any, **kwargs: Any) -> Any: ...
    def eval(self) -> Any: ...


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes the weights; hashed into the cache key."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA, like real deployed models (exercises k/v LoRA shapes)
    max_position_embeddings: int = 256
    steps: int = 250  # 200 already reaches 100% retention; margin for other seeds
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.0  # memorisation is the goal, not generalisation
    # One thread: reductions (hence weights) match across hosts, and torch's OpenMP pool
    # degrades ~10x when CPUs are oversubscribed (e.g. parallel test runs); 1 thread does not.
    threads: int = 1

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


def llama_config(cfg: TrainConfig, vocab_size: int, bos: int, eos: int, pad: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        # 10000 is also the default older loaders assume when rope_theta is absent.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def _batch(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def pretrain(
    model: LlamaForCausalLM, seqs: list[list[int]], cfg: TrainConfig, seed: int, pad: int
) -> float:
    """Plain AdamW loop over shuffled minibatches; returns the final-epoch mean loss."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    order: list[int] = []
    recent: list[float] = []
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            perm = list(range(len(seqs)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        ids, mask, labels = _batch([seqs[i] for i in idx], pad)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = [*recent, loss.item()][-max(1, len(seqs) // cfg.batch_size) :]
    torch.nn.Module.eval(model)  # PreTrainedModel.eval is untyped
    return sum(recent) / len(recent)


@torch.no_grad()
def exact_match(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[dict[str, str]],
    max_new_tokens: int = 12,
    batch_size: int = 32,
) -> float:
    """Fraction of prompts whose greedy continuation starts with the completion.

    Compared after stripping whitespace, so trailing text after the expected
    answer (e.g. no EOS after adapter training) is not penalised.
    """
    if not pairs:
        return 0.0
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batched generation needs left padding
    hits = 0
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            enc = tokenizer([p["prompt"] for p in chunk], return_tensors="pt", padding=True)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            hits += sum(
                t.strip().startswith(p["completion"].strip())
                for t, p in zip(texts, chunk, strict=True)
            )
    finally:
        tokenizer.padding_side = old_side
    return hits / len(pairs)


@torch.no_grad()
def completion_loss(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, pairs: list[dict[str, str]]
) -> float:
    """Mean per-token cross-entropy of the completions given their prompts."""
    total, count = 0.0, 0
    for p in pairs:
        prompt = tokenizer(p["prompt"])["input_ids"]
        full = tokenizer(p["prompt"] + p["completion"])["input_ids"]
        ids = torch.tensor([full])
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        n = len(full) - len(prompt)
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    return total / max(1, count)
