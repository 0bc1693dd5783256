"""Training parameters and the checks on the training-loop settings (the method-specific
checks that need the base model's shape live in ``methods.validate_method``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ftops_trainer.schedule import LR_SCHEDULERS

# The Llama-family attention projections: the default targets of a base model that has
# them. Others get their architecture's default (see targets.py).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
METHODS = ("lora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "partial", "qlora")
MIXED_PRECISION = ("no", "bf16", "fp16", "auto")
REGULARIZATION = ("none", "l2", "ewc")
DEVICES = ("auto", "cpu", "cuda")
PARALLELISM = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainParams:
    # Tuned so the tiny dev model learns all 40 of its new facts (greedy exact match 1.0)
    # in ~7 s on 2 CPU cores (200 steps). Many epochs suit small fact sets; large
    # datasets should pass their own num_epochs.
    method: str = "lora"  # lora|adalora|ia3|prompt_tuning|prefix_tuning|partial|qlora
    r: int = 8  # LoRA rank; AdaLoRA's initial rank
    alpha: int = 16
    dropout: float = 0.0
    # Empty: the base architecture's default (targets.default_target_modules; the
    # attention projections q/k/v/o_proj on Llama-family models).
    target_modules: tuple[str, ...] = ()
    use_dora: bool = False  # lora/qlora
    use_rslora: bool = False  # lora/qlora/adalora: scale alpha/sqrt(r)
    target_r: int = 0  # AdaLoRA's final average rank; 0 = r // 2
    # IA3: targets that scale their input (feed-forward) rather than their output;
    # empty = the targets PEFT knows as feed-forward for the model type (down_proj).
    feedforward_modules: tuple[str, ...] = ()
    num_virtual_tokens: int = 8  # prompt/prefix tuning
    num_layers: int = 1  # partial: the top N transformer layers train
    learning_rate: float = 2e-3
    num_epochs: int = 40
    # Examples per optimizer step, over all accumulation micro-batches and workers: the
    # math does not depend on grad_accum_steps or world_size (only memory and speed do).
    batch_size: int = 8
    grad_accum_steps: int = 1
    cutoff_len: int = 256
    overlong: str = "truncate"  # truncate|refuse records longer than cutoff_len
    train_on_prompt: bool = False  # the loss covers the prompt too
    seed: int = 0
    max_steps: int = 0  # 0 = all epochs
    # cosine|linear|constant, after warmup. Constant keeps the tuning above: with cosine
    # decay at this rate the tiny model reaches 0.9 exact match, not 1.0.
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # > 0 wins over warmup_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    mixed_precision: str = "auto"  # no|bf16|fp16|auto (auto: bf16/fp16 on CUDA, no on CPU)
    device: str = "auto"  # auto|cpu|cuda
    eval_every: int = 0  # steps between held-out evaluations; 0 = once an epoch
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    checkpoint_every: int = 0  # steps; 0 = no checkpoints
    keep_checkpoints: int = 2
    regularization: str = "none"  # none|l2|ewc, towards the parent (or starting) weights
    regularization_weight: float = 0.0
    fisher_examples: int = 32  # EWC: examples the diagonal Fisher is estimated on
    # With several workers: ddp replicates the base model, fsdp shards it across them.
    parallelism: str = "ddp"


def total_steps(n_examples: int, params: TrainParams) -> int:
    steps = math.ceil(n_examples / params.batch_size) * params.num_epochs
    return min(steps, params.max_steps) if params.max_steps else steps


def validate_training(params: TrainParams) -> list[str]:
    """Problems with the training-loop settings (no base model needed)."""
    p = params
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(p.batch_size >= 1, f"batch_size={p.batch_size} must be at least 1")
    need(p.num_epochs >= 1, f"num_epochs={p.num_epochs} must be at least 1")
    need(p.max_steps >= 0, f"max_steps={p.max_steps} must be >= 0")
    need(p.cutoff_len >= 2, f"cutoff_len={p.cutoff_len} must be at least 2")
    need(
        p.overlong in ("truncate", "refuse"),
        f"overlong={p.overlong!r} is not one of truncate, refuse",
    )
    need(p.learning_rate > 0, f"learning_rate={p.learning_rate} must be > 0")
    need(p.grad_accum_steps >= 1, f"grad_accum_steps={p.grad_accum_steps} must be at least 1")
    need(
        p.lr_scheduler in LR_SCHEDULERS,
        f"lr_scheduler={p.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}",
    )
    need(0 <= p.warmup_ratio < 1, f"warmup_ratio={p.warmup_ratio} must be in [0, 1)")
    need(p.warmup_steps >= 0, f"warmup_steps={p.warmup_steps} must be >= 0")
    need(p.weight_decay >= 0, f"weight_decay={p.weight_decay} must be >= 0")
    need(p.max_grad_norm >= 0, f"max_grad_norm={p.max_grad_norm} must be >= 0 (0 = off)")
    need(
        p.mixed_precision in MIXED_PRECISION,
        f"mixed_precision={p.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}",
    )
    need(p.device in DEVICES, f"device={p.device!r} is not one of {', '.join(DEVICES)}")
    need(p.eval_every >= 0, f"eval_every={p.eval_every} must be >= 0")
    need(p.early_stopping_patience >= 0, "early_stopping_patience must be >= 0")
    need(p.checkpoint_every >= 0, f"checkpoint_every={p.checkpoint_every} must be >= 0")
    need(p.keep_checkpoints >= 1, f"keep_checkpoints={p.keep_checkpoints} must be at least 1")
    need(
        p.regularization in REGULARIZATION,
        f"regularization={p.regularization!r} is not one of {', '.join(REGULARIZATION)}",
    )
    need(p.regularization_weight >= 0, "regularization_weight must be >= 0")
    need(p.fisher_examples >= 1, f"fisher_examples={p.fisher_examples} must be at least 1")
    need(0 <= p.dropout < 1, f"dropout={p.dropout} must be in [0, 1)")
    need(
        p.parallelism in PARALLELISM,
        f"parallelism={p.parallelism!r} is not one of {', '.join(PARALLELISM)}",
    )
    return problems
