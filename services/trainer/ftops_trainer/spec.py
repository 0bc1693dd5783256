"""Job specs: static validation, the defaults a job actually runs with, and the mapping of
the wire spec onto the training, pipeline, replay and gate configurations."""

from __future__ import annotations

import hashlib
import math
import re
from typing import get_args

from ftops.trainer.v1 import trainer_pb2
from ftops_runtime.errors import InvalidArgument
from ftops_trainer.dataset import Overlong
from ftops_trainer.distributed import world_size_problem
from ftops_trainer.gate import GateConfig
from ftops_trainer.params import (
    METHODS,
    MIXED_PRECISION,
    PARALLELISM,
    REGULARIZATION,
    TrainParams,
)
from ftops_trainer.pipeline import (
    BalanceConfig,
    CleaningConfig,
    DecayConfig,
    ExactDedupConfig,
    NearDedupConfig,
    PipelineConfig,
    QualityConfig,
)
from ftops_trainer.replay import DEFAULT_REPLAY_RATIO
from ftops_trainer.schedule import LR_SCHEDULERS
from ftops_trainer.settings import TrainerSettings

ADAPTER_NAME = re.compile(r"[a-z0-9][a-z0-9\-_.]{0,62}")
OVERLONG: tuple[str, ...] = get_args(Overlong)
DEFAULT_GATE = GateConfig()
DEFAULT_HOLDOUT_FRACTION = 0.1
DEFAULT_NEAR_DUP_THRESHOLD = NearDedupConfig().threshold
MAX_NODES = 16


def spec_fingerprint(spec: trainer_pb2.JobSpec) -> str:
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()


def _in_unit(problems: list[str], name: str, value: float, *, closed: bool = True) -> None:
    ok = 0 <= value <= 1 if closed else 0 <= value < 1
    if not ok or math.isnan(value):
        problems.append(f"{name}={value} must be in [0, 1{']' if closed else ')'}")


def validate_spec(spec: trainer_pb2.JobSpec) -> None:
    """Reject what can never train, before anything is stored (INVALID_ARGUMENT)."""
    problems: list[str] = []
    if not ADAPTER_NAME.fullmatch(spec.adapter):
        problems.append(
            f"adapter {spec.adapter!r} must match {ADAPTER_NAME.pattern} "
            "(lower-case letters, digits, '-', '_', '.'; at most 63 characters)"
        )
    if not spec.base_model:
        problems.append("base_model is required (a base model name registered in the registry)")
    which = spec.WhichOneof("dataset")
    if which == "dataset_jsonl" and not spec.dataset_jsonl:
        problems.append("the dataset file is empty: expected JSONL, one JSON object a line")
    elif which is None or not getattr(spec, which):
        problems.append(
            "a dataset is required: the JSONL itself (dataset_jsonl), a path on the trainer "
            "(dataset_uri) or a registry artifact id (dataset_artifact_id)"
        )
    if spec.method and spec.method not in METHODS:
        problems.append(f"method {spec.method!r} is not one of {', '.join(METHODS)}")
    lora, hp = spec.lora, spec.hyperparameters
    if lora.r > 256:
        problems.append(f"lora.r={lora.r} is too large (at most 256)")
    _in_unit(problems, "lora.dropout", lora.dropout, closed=False)
    if lora.target_r and lora.r and lora.target_r > lora.r:
        problems.append(f"lora.target_r={lora.target_r} must not exceed lora.r={lora.r}")
    if spec.method in ("prompt_tuning", "prefix_tuning") and lora.num_virtual_tokens > 512:
        problems.append("lora.num_virtual_tokens is too large (at most 512)")
    if not 0 <= hp.learning_rate <= 1:
        problems.append(f"hyperparameters.learning_rate={hp.learning_rate} must be in (0, 1]")
    if hp.batch_size > 1024:
        problems.append(f"hyperparameters.batch_size={hp.batch_size} is too large (at most 1024)")
    if hp.num_epochs > 1000:
        problems.append(f"hyperparameters.num_epochs={hp.num_epochs} is too large (at most 1000)")
    if hp.cutoff_len and hp.cutoff_len < 2:
        problems.append("hyperparameters.cutoff_len must be at least 2 tokens")
    if hp.lr_scheduler and hp.lr_scheduler not in LR_SCHEDULERS:
        problems.append(f"hyperparameters.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}")
    if hp.HasField("warmup_ratio"):
        _in_unit(problems, "hyperparameters.warmup_ratio", hp.warmup_ratio, closed=False)
    if hp.HasField("max_grad_norm") and hp.max_grad_norm < 0:
        problems.append("hyperparameters.max_grad_norm must be >= 0 (0 disables clipping)")
    if hp.mixed_precision and hp.mixed_precision not in MIXED_PRECISION:
        problems.append(
            f"hyperparameters.mixed_precision must be one of {', '.join(MIXED_PRECISION)}"
        )
    if hp.regularization and hp.regularization not in REGULARIZATION:
        problems.append(
            f"hyperparameters.regularization must be one of {', '.join(REGULARIZATION)}"
        )
    if hp.regularization_weight < 0:
        problems.append("hyperparameters.regularization_weight must be >= 0")
    if hp.world_size > 64:
        problems.append("hyperparameters.world_size is too large (at most 64)")
    if hp.nodes > MAX_NODES:
        problems.append(f"hyperparameters.nodes is too large (at most {MAX_NODES})")
    if hp.parallelism and hp.parallelism not in PARALLELISM:
        problems.append(f"hyperparameters.parallelism must be one of {', '.join(PARALLELISM)}")
    data = spec.data
    if data.overlong and data.overlong not in OVERLONG:
        problems.append(f"data.overlong must be one of {', '.join(OVERLONG)}")
    if data.HasField("quality_threshold"):
        _in_unit(problems, "data.quality_threshold", data.quality_threshold)
    if data.HasField("near_dup_threshold"):
        _in_unit(problems, "data.near_dup_threshold", data.near_dup_threshold)
    if any(v < 0 or math.isnan(v) for v in data.balance_targets.values()):
        problems.append("data.balance_targets shares must be >= 0")
    if data.balance_targets and sum(data.balance_targets.values()) <= 0:
        problems.append("data.balance_targets shares must not all be 0")
    if data.decay_half_life_days < 0:
        problems.append("data.decay_half_life_days must be >= 0")
    if spec.replay.HasField("ratio"):
        _in_unit(problems, "replay.ratio", spec.replay.ratio, closed=False)
    gate = spec.gate
    if gate.HasField("min_retention") and not 0 <= gate.min_retention <= 2:
        problems.append("gate.min_retention must be in [0, 2]")
    if gate.HasField("max_new_loss_ratio") and gate.max_new_loss_ratio <= 0:
        problems.append("gate.max_new_loss_ratio must be > 0")
    if gate.HasField("holdout_fraction"):
        _in_unit(problems, "gate.holdout_fraction", gate.holdout_fraction, closed=False)
    if problems:
        raise InvalidArgument("invalid job spec: " + "; ".join(problems))


def validate_placement(spec: trainer_pb2.JobSpec, gpu_count: int) -> None:
    """What this trainer's hardware refuses (its queue's replicas are alike): on GPUs each
    worker takes its own, so world_size may not exceed the visible GPU count."""
    device_type = "cuda" if gpu_count > 0 else "cpu"  # the job's device is "auto"
    problem = world_size_problem(device_type, max(1, spec.hyperparameters.world_size), gpu_count)
    if problem:
        raise InvalidArgument(f"invalid job spec: hyperparameters.{problem} on this trainer")


def effective_spec(spec: trainer_pb2.JobSpec, settings: TrainerSettings) -> trainer_pb2.JobSpec:
    """The spec with every default filled in, so a job shows what it actually ran with."""
    d = TrainParams()
    out = trainer_pb2.JobSpec()
    out.CopyFrom(spec)
    out.method = spec.method or "lora"
    out.lora.r = spec.lora.r or d.r
    out.lora.alpha = spec.lora.alpha or d.alpha
    # Empty target_modules stay empty here: the architecture's default, which intake
    # fills in from the base model's config (targets.py) and training resolves otherwise.
    if out.method in ("prompt_tuning", "prefix_tuning") and not out.lora.num_virtual_tokens:
        out.lora.num_virtual_tokens = 8
    if out.method == "partial" and not out.lora.num_layers:
        out.lora.num_layers = 1
    hp = out.hyperparameters
    hp.learning_rate = hp.learning_rate or d.learning_rate
    hp.num_epochs = hp.num_epochs or d.num_epochs
    hp.batch_size = hp.batch_size or d.batch_size
    hp.cutoff_len = hp.cutoff_len or d.cutoff_len
    hp.lr_scheduler = hp.lr_scheduler or d.lr_scheduler
    hp.mixed_precision = hp.mixed_precision or "auto"
    hp.regularization = hp.regularization or "none"
    hp.parallelism = hp.parallelism or "ddp"
    hp.grad_accum_steps = hp.grad_accum_steps or 1
    hp.checkpoint_every = hp.checkpoint_every or settings.checkpoint_every
    if not hp.HasField("warmup_ratio"):
        hp.warmup_ratio = 0.0
    if not hp.HasField("max_grad_norm"):
        hp.max_grad_norm = 1.0
    out.data.overlong = out.data.overlong or "truncate"
    if not out.data.HasField("near_dup_threshold"):
        out.data.near_dup_threshold = DEFAULT_NEAR_DUP_THRESHOLD
    out.data.category_field = out.data.category_field or "category"
    out.data.timestamp_field = out.data.timestamp_field or "timestamp"
    if not out.replay.HasField("ratio"):
        out.replay.ratio = DEFAULT_REPLAY_RATIO
    out.replay.capacity = out.replay.capacity or settings.replay_capacity
    if not out.gate.HasField("min_retention"):
        out.gate.min_retention = settings.gate_min_retention
    if not out.gate.HasField("max_new_loss_ratio"):
        out.gate.max_new_loss_ratio = DEFAULT_GATE.max_new_loss_ratio
    if not out.gate.HasField("holdout_fraction"):
        out.gate.holdout_fraction = DEFAULT_HOLDOUT_FRACTION
    return out


def pipeline_config(spec: trainer_pb2.JobSpec) -> PipelineConfig:
    """The data pipeline a job's (effective) spec asks for."""
    data = spec.data
    return PipelineConfig(
        cleaning=CleaningConfig(enabled=not data.skip_cleaning),
        quality=(
            QualityConfig(enabled=not data.skip_quality, threshold=data.quality_threshold)
            if data.HasField("quality_threshold")
            else QualityConfig(enabled=not data.skip_quality)
        ),
        exact_dedup=ExactDedupConfig(enabled=not data.skip_dedup),
        near_dedup=NearDedupConfig(
            enabled=not data.skip_near_dedup,
            threshold=data.near_dup_threshold or DEFAULT_NEAR_DUP_THRESHOLD,
        ),
        balance=BalanceConfig(target=dict(data.balance_targets) or None),
        decay=DecayConfig(
            half_life_s=data.decay_half_life_days * 86400 if data.decay_half_life_days else None
        ),
        seed=data.seed,
    )


def train_params(spec: trainer_pb2.JobSpec) -> TrainParams:
    """TrainParams from an effective spec (see ``effective_spec``)."""
    lora, hp, d = spec.lora, spec.hyperparameters, TrainParams()
    return TrainParams(
        method=spec.method,
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=tuple(lora.target_modules),
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        target_r=lora.target_r,
        num_virtual_tokens=lora.num_virtual_tokens or d.num_virtual_tokens,
        num_layers=lora.num_layers or d.num_layers,
        learning_rate=hp.learning_rate,
        num_epochs=hp.num_epochs,
        batch_size=hp.batch_size,
        grad_accum_steps=hp.grad_accum_steps or 1,
        cutoff_len=hp.cutoff_len,
        overlong=spec.data.overlong or d.overlong,
        train_on_prompt=spec.data.train_on_prompt,
        seed=hp.seed,
        max_steps=hp.max_steps,
        lr_scheduler=hp.lr_scheduler or d.lr_scheduler,
        warmup_ratio=hp.warmup_ratio,
        max_grad_norm=hp.max_grad_norm,
        mixed_precision=hp.mixed_precision or d.mixed_precision,
        eval_every=hp.eval_every,
        early_stopping_patience=hp.early_stopping_patience,
        checkpoint_every=hp.checkpoint_every,
        regularization=hp.regularization or d.regularization,
        regularization_weight=hp.regularization_weight,
        parallelism=hp.parallelism or d.parallelism,
    )
