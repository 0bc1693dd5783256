"""LoRA training on a base model: a plain, deterministic torch loop (no Trainer magic).

Blocking and CPU/GPU heavy: the job manager runs it in a worker thread and passes a
progress callback plus a stop flag, so the gRPC loop stays responsive and shutdown is
prompt (the loop checks the flag every step).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftops_trainer.dataset import IGNORE_INDEX, Example, Record, tokenize

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# "Empty means the attention projections" (trainer.proto); Llama-family names.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

ProgressFn = Callable[[int, int, float], None]


class TrainingStopped(Exception):
    """The stop flag was raised (trainer shutting down) before training finished."""


class NothingToTrain(ValueError):
    """Every example lost all its trainable tokens to the cutoff."""


@dataclass(frozen=True)
class TrainParams:
    # Tuned so the tiny dev model learns all 40 of its new facts (greedy exact match 1.0)
    # in ~7 s on 2 CPU cores (200 steps). Many epochs suit small fact sets; large
    # datasets should pass their own num_epochs.
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    learning_rate: float = 2e-3
    num_epochs: int = 40
    batch_size: int = 8
    cutoff_len: int = 256
    seed: int = 0
    max_steps: int = 0  # 0 = all epochs


@dataclass
class TrainResult:
    adapter_dir: Path
    final_loss: float  # mean loss over the last epoch
    steps: int
    seconds: float
    examples: int  # examples trained on (records minus those truncated to nothing)
    losses: list[float] = field(default_factory=list)  # per step


def _collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def total_steps(n_examples: int, params: TrainParams) -> int:
    steps = math.ceil(n_examples / params.batch_size) * params.num_epochs
    return min(steps, params.max_steps) if params.max_steps else steps


def _batches(n: int, params: TrainParams) -> list[list[int]]:
    """The whole schedule up front: a seeded shuffle per epoch (deterministic order)."""
    rng = random.Random(params.seed)
    schedule: list[list[int]] = []
    for _ in range(params.num_epochs):
        order = list(range(n))
        rng.shuffle(order)
        schedule += [order[i : i + params.batch_size] for i in range(0, n, params.batch_size)]
    return schedule[: params.max_steps] if params.max_steps else schedule


def _export_adapter(model: Any, out_dir: Path, base_model_name: str) -> None:
    """Save the adapter and keep only its config and safetensors weights (no README,
    nothing pickled). The config names the registered base model, not this host's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in ADAPTER_FILES:
            shutil.move(str(Path(tmp) / name), out_dir / name)
    config_path = out_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model_name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train_adapter(
    base_dir: Path,
    records: Sequence[Record],
    params: TrainParams,
    out_dir: Path,
    *,
    base_model_name: str = "",
    parent_adapter_dir: Path | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``records`` and write it to ``out_dir``.

    With ``parent_adapter_dir`` training continues from that adapter (its LoRA shape wins
    over ``params.r``/``alpha``/``target_modules``, which cannot change mid-lineage).
    """
    # Imported here: the service starts (and answers health checks) without paying
    # for the transformers/peft import until the first job runs.
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = [e for r in records if (e := tokenize(r, tokenizer, params.cutoff_len)) is not None]
    if not examples:
        raise NothingToTrain(
            f"no example has a completion token within cutoff_len={params.cutoff_len}; "
            "raise cutoff_len or shorten the prompts"
        )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id  # padded positions are masked out anyway

    torch.manual_seed(params.seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if parent_adapter_dir is not None:
        model = PeftModel.from_pretrained(base, str(parent_adapter_dir), is_trainable=True)
        # The parent's config names the registered base, not a path; PEFT reads the base
        # config from there on save, so point it at the local directory meanwhile.
        for config in model.peft_config.values():
            config.base_model_name_or_path = str(base_dir)
    else:
        lora = LoraConfig(
            r=params.r,
            lora_alpha=params.alpha,
            lora_dropout=params.dropout,
            target_modules=list(params.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)

    schedule = _batches(len(examples), params)
    steps_per_epoch = math.ceil(len(examples) / params.batch_size)
    losses: list[float] = []
    model.train()
    for step, idx in enumerate(schedule, start=1):
        if should_stop is not None and should_stop():
            raise TrainingStopped(f"stopped at step {step - 1} of {len(schedule)}")
        batch = _collate([examples[i] for i in idx], pad_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(float(loss.item()))
        if progress is not None:
            progress(step, len(schedule), losses[-1])
    model.eval()

    _export_adapter(model, out_dir, base_model_name or str(base_dir))
    last_epoch = losses[-steps_per_epoch:]
    return TrainResult(
        adapter_dir=out_dir,
        final_loss=sum(last_epoch) / len(last_epoch),
        steps=len(losses),
        seconds=time.monotonic() - started,
        examples=len(examples),
        losses=losses,
    )
