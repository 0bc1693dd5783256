"""Scoring a base model (optionally with a LoRA adapter) on records: completion loss,
perplexity and greedy exact match; plus the retention measure the gate uses.

Loss is scored exactly as training sees a record (``dataset.tokenize``: prompt masked,
completion + EOS scored; record weights ignored), so "loss fell" means the training
objective improved; token accuracy is the share of those scored tokens that are the
model's top prediction given the true text before them. Exact match follows
``ftops_tinymodel.exact_match``: the greedy continuation, whitespace-stripped, must start
with the stripped completion; a chat's is its last assistant turn, after the chat
rendered as training renders it (``dataset.generation_prefix``).

torch/transformers/peft are imported inside the functions that need them: the gate and
the service import this module for its dataclasses without paying for them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftops_trainer.dataset import Example, Record, generation_prefix, tokenize

DEFAULT_BATCH_SIZE = 16
DEFAULT_CUTOFF_LEN = 256
# Exact match only makes sense for short answers (facts, labels); longer completions are
# scored by loss alone, and generating them would dominate the evaluation time.
DEFAULT_MAX_TARGET_TOKENS = 32
# Greedy text can tokenise differently from the reference completion: a little slack.
_GENERATION_SLACK = 4
DEFAULT_RETENTION_SIZE = 64


@dataclass(frozen=True)
class EvalResult:
    records: int  # records scored for loss
    tokens: int  # completion tokens (incl. EOS) scored
    loss: float  # mean per-token cross-entropy; nan when nothing was scorable
    exact_match: float | None  # None when no record has a short target after a prompt
    exact_match_records: int
    skipped: int = 0  # records with no completion token within cutoff_len
    # Share of the scored tokens that are the model's top prediction (teacher forcing).
    token_accuracy: float | None = None

    @property
    def perplexity(self) -> float:
        if math.isnan(self.loss):
            return math.nan
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {
            f"{prefix}_records": float(self.records),
            f"{prefix}_loss": self.loss,
            f"{prefix}_perplexity": self.perplexity,
        }
        if self.exact_match is not None:
            out[f"{prefix}_exact_match"] = self.exact_match
            out[f"{prefix}_exact_match_records"] = float(self.exact_match_records)
        if self.token_accuracy is not None:
            out[f"{prefix}_token_accuracy"] = self.token_accuracy
        return out


@dataclass(frozen=True)
class Retention:
    """How much of what the parent knew the candidate still knows: score_after / score_before.

    ``basis`` names the score behind ``value``: exact match when the records have short
    targets and the parent got at least one right (a ratio of hits is the most direct
    "still knows it"), else exp(-loss), whose ratio is exp(loss_before - loss_after).
    Both ratios are reported whenever they exist.
    """

    value: float
    basis: str  # "exact_match" | "loss"
    exact_match_ratio: float | None
    loss_ratio: float
    records: int


def merge_results(*results: EvalResult) -> EvalResult:
    """One result for the union of disjoint record sets scored separately."""
    tokens = sum(r.tokens for r in results)
    targets = sum(r.exact_match_records for r in results)
    hits = sum((r.exact_match or 0.0) * r.exact_match_records for r in results)
    accurate = [r for r in results if r.token_accuracy is not None]
    accurate_tokens = sum(r.tokens for r in accurate)
    return EvalResult(
        records=sum(r.records for r in results),
        tokens=tokens,
        loss=sum(r.loss * r.tokens for r in results if r.tokens) / tokens if tokens else math.nan,
        exact_match=hits / targets if targets else None,
        exact_match_records=targets,
        skipped=sum(r.skipped for r in results),
        token_accuracy=(
            sum((r.token_accuracy or 0.0) * r.tokens for r in accurate) / accurate_tokens
            if accurate_tokens
            else None
        ),
    )


def retention(before: EvalResult, after: EvalResult) -> Retention:
    loss_ratio = math.exp(min(700.0, before.loss - after.loss))
    em_ratio = None
    if before.exact_match and after.exact_match is not None:  # before > 0: defined ratio
        em_ratio = after.exact_match / before.exact_match
    if em_ratio is not None:
        return Retention(em_ratio, "exact_match", em_ratio, loss_ratio, after.exact_match_records)
    return Retention(loss_ratio, "loss", None, loss_ratio, after.records)


def build_retention_set(
    previous_records: Sequence[Record],
    base_probe_records: Sequence[Record],
    size: int = DEFAULT_RETENTION_SIZE,
    seed: int = 0,
) -> list[Record]:
    """A deterministic retention set of at most ``size`` distinct records: half from
    earlier batches (the lineage's replay buffer), half from the base model's probes,
    either side filling in when the other runs short.

    Probes that also sit in ``previous_records`` count as probes (the buffer is seeded with
    them). Pass probes that are *not* replayed (split the probe set once: one part seeds
    the buffer, the other measures retention), or retention on them says little.
    """
    probes = _distinct(base_probe_records)
    probe_keys = {_key(r) for r in probes}
    previous = [r for r in _distinct(previous_records) if _key(r) not in probe_keys]
    rng = random.Random(seed)
    rng.shuffle(probes)
    rng.shuffle(previous)
    take_previous = min(len(previous), size - min(len(probes), size // 2))
    take_probes = min(len(probes), size - take_previous)
    return previous[:take_previous] + probes[:take_probes]


def _key(record: Record) -> tuple[Any, ...]:
    """Identity by content: the same text with another weight or timestamp is a duplicate."""
    return record.prompt, record.completion, record.messages


def _distinct(records: Sequence[Record]) -> list[Record]:
    seen: dict[tuple[Any, ...], Record] = {}
    for r in records:
        seen.setdefault(_key(r), r)
    return list(seen.values())


def load_model(base_dir: Path, adapter_dir: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode, fp32; the adapter applied when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        # Any method's artifact: a partial fine-tune is written into the base, PEFT wraps.
        from ftops_trainer.methods import apply_adapter

        model = apply_adapter(model, adapter_dir)
    torch.nn.Module.eval(model)
    return model, tokenizer


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(tokenizer.eos_token_id if pad is None else pad)


def _loss_sums(model: Any, examples: Sequence[Example], pad_id: int) -> tuple[float, int, int]:
    """Summed completion-token cross-entropy, token count and correctly predicted tokens
    for one right-padded batch: the training loop's own batching and loss (unit weights),
    so the score is exactly what training optimises, virtual prompt-tuning positions
    included."""
    import torch

    from ftops_trainer.dataset import IGNORE_INDEX
    from ftops_trainer.loop import collate, label_tokens, weighted_token_loss

    batch, weights = collate(examples, [1.0] * len(examples), pad_id, torch.device("cpu"))
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total = weighted_token_loss(logits, labels, weights)
    # Prompt tuning prepends virtual positions: only the last labels.shape[1] are the input.
    predicted = logits[:, -labels.shape[1] :][:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    correct = int(((predicted == targets) & (targets != IGNORE_INDEX)).sum())
    return float(total), sum(label_tokens(e) for e in examples), correct


# A record's prompt ids, its reference completion and that completion's token count.
_Target = tuple[list[int], str, int]


def _greedy_hits(model: Any, tokenizer: Any, batch: Sequence[_Target], pad_id: int) -> int:
    """How many prompts' greedy continuations start with their completion."""
    import torch

    prompts = [p for p, _, _ in batch]
    width = max(map(len, prompts))
    # Left padding: every row's generation starts right after its own prompt.
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max(n for _, _, n in batch) + _GENERATION_SLACK,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(
        t.strip().startswith(ref.strip()) for t, (_, ref, _) in zip(texts, batch, strict=True)
    )


def evaluate_model(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cutoff_len: int = DEFAULT_CUTOFF_LEN,
    max_target_tokens: int = DEFAULT_MAX_TARGET_TOKENS,
) -> EvalResult:
    """Score an already loaded model (see ``load_model``); no grad, deterministic."""
    import torch

    pad_id = _pad_id(tokenizer)
    examples = [e for r in records if (e := tokenize(r, tokenizer, cutoff_len)) is not None]
    # Exact match needs a prompt to continue and a short target to compare against.
    targets: list[_Target] = []
    for r in records:
        if (prefix := generation_prefix(r, tokenizer)) is not None:
            prompt_ids, reference = prefix
            n = len(tokenizer(reference, add_special_tokens=False)["input_ids"])
            if 0 < n <= max_target_tokens and len(prompt_ids) + n <= cutoff_len:
                targets.append((prompt_ids, reference, n))
    total, tokens, correct, hits = 0.0, 0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch_total, batch_tokens, batch_correct = _loss_sums(
                model, examples[start : start + batch_size], pad_id
            )
            total += batch_total
            tokens += batch_tokens
            correct += batch_correct
        for start in range(0, len(targets), batch_size):
            hits += _greedy_hits(model, tokenizer, targets[start : start + batch_size], pad_id)
    return EvalResult(
        records=len(examples),
        tokens=tokens,
        loss=total / tokens if tokens else math.nan,
        exact_match=hits / len(targets) if targets else None,
        exact_match_records=len(targets),
        skipped=len(records) - len(examples),
        token_accuracy=correct / tokens if tokens else None,
    )


def evaluate_sets(
    base_dir: Path,
    sets: Mapping[str, Sequence[Record]],
    *,
    adapter_dir: Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cutoff_len: int = DEFAULT_CUTOFF_LEN,
    max_target_tokens: int = DEFAULT_MAX_TARGET_TOKENS,
) -> dict[str, EvalResult]:
    """Load the model once and score each named record set."""
    model, tokenizer = load_model(base_dir, adapter_dir)
    return {
        name: evaluate_model(
            model,
            tokenizer,
            records,
            batch_size=batch_size,
            cutoff_len=cutoff_len,
            max_target_tokens=max_target_tokens,
        )
        for name, records in sets.items()
    }


def evaluate(
    base_dir: Path,
    records: Sequence[Record],
    *,
    adapter_dir: Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cutoff_len: int = DEFAULT_CUTOFF_LEN,
    max_target_tokens: int = DEFAULT_MAX_TARGET_TOKENS,
) -> EvalResult:
    return evaluate_sets(
        base_dir,
        {"records": records},
        adapter_dir=adapter_dir,
        batch_size=batch_size,
        cutoff_len=cutoff_len,
        max_target_tokens=max_target_tokens,
    )["records"]
