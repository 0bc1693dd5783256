"""Adapter training on a base model: a plain, deterministic torch loop (no Trainer magic).

Blocking and CPU/GPU heavy: the job manager runs it in a worker thread and passes a
progress callback plus a stop flag, so the gRPC loop stays responsive and shutdown is
prompt (the loop checks the flag every step).

The pieces: ``methods`` (LoRA/DoRA/rsLoRA, AdaLoRA, IA3, prompt and prefix tuning,
top-layer partial fine-tuning, QLoRA on CUDA), ``schedule`` (batches, warmup + decay),
``loop`` (the optimizer steps, weighting, evaluation, early stopping), ``checkpoints``
(resumable, no pickles), ``regularization`` (L2/EWC towards the parent) and
``distributed`` (data parallel over worker processes: gloo on CPU, NCCL on GPUs, one
node or a gang of several).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftops_trainer.dataset import Example, Record, tokenize_all
from ftops_trainer.loop import (
    Hooks,
    Job,
    LocalComm,
    MetricsFn,
    NothingToTrain,
    ProgressFn,
    TrainingStopped,
    TrainMetrics,
    TrainResult,
    run_training,
)
from ftops_trainer.methods import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    MethodUnavailable,
    qlora_problem,
    validate_method,
)
from ftops_trainer.params import DEFAULT_TARGET_MODULES, TrainParams, total_steps, validate_training

if TYPE_CHECKING:
    from ftops_trainer.distributed import NodeSpec

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILES",
    "ADAPTER_WEIGHTS",
    "DEFAULT_TARGET_MODULES",
    "InvalidTrainParams",
    "MethodUnavailable",
    "MetricsFn",
    "NothingToTrain",
    "ProgressFn",
    "TrainMetrics",
    "TrainParams",
    "TrainResult",
    "TrainingStopped",
    "total_steps",
    "train_adapter",
    "train_member",
]


class InvalidTrainParams(ValueError):
    """The parameters cannot train on this base model; the message lists every problem."""


def _tokenized(
    records: Sequence[Record], tokenizer: Any, params: TrainParams
) -> tuple[list[Example], list[float], str]:
    """Examples, their loss weights, and the tokenisation summary."""
    report = tokenize_all(
        records,
        tokenizer,
        params.cutoff_len,
        train_on_prompt=params.train_on_prompt,
        overlong=params.overlong,  # type: ignore[arg-type]  # validated
    )
    weights = [float(getattr(e, "weight", 1.0)) for e in report.examples]
    if any(w < 0 for w in weights):
        raise InvalidTrainParams(f"example weights must be >= 0, got {min(weights)}")
    return report.examples, weights, report.summary()


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
    on_metrics: MetricsFn | None = None,
    eval_records: Sequence[Record] | None = None,
    replay_records: Sequence[Record] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    world_size: int = 1,
    node: NodeSpec | None = None,
) -> TrainResult:
    """Train an adapter on ``records`` and write it to ``out_dir``.

    With ``parent_adapter_dir`` training continues from that adapter: its method and shape
    win over ``params`` (a lineage cannot change them mid-way).

    ``eval_records`` are scored every ``eval_every`` steps (default once an epoch) and
    drive early stopping; ``replay_records`` (else the eval, else the training records)
    estimate the Fisher information for ``regularization="ewc"``. With
    ``params.checkpoint_every`` a checkpoint lands in ``checkpoint_dir`` (default: next to
    ``out_dir``) every N steps; ``resume=True`` continues from the newest one there.
    ``world_size > 1`` trains data-parallel in that many worker processes (one per GPU on
    CUDA); ``node`` makes this node 0 of a multi-node gang (``train_member`` the others).
    """
    result = _train(
        base_dir,
        records,
        params,
        out_dir,
        base_model_name=base_model_name,
        parent_adapter_dir=parent_adapter_dir,
        progress=progress,
        should_stop=should_stop,
        on_metrics=on_metrics,
        eval_records=eval_records,
        replay_records=replay_records,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        world_size=world_size,
        node=node,
    )
    assert result is not None  # global rank 0 trains here
    return result


def train_member(
    base_dir: Path,
    records: Sequence[Record],
    params: TrainParams,
    out_dir: Path,
    *,
    node: NodeSpec,
    world_size: int,
    base_model_name: str = "",
    parent_adapter_dir: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    eval_records: Sequence[Record] | None = None,
    replay_records: Sequence[Record] | None = None,
    checkpoint_dir: Path | None = None,
) -> None:
    """Node ``node.node_rank`` (> 0) of a multi-node job: the same inputs as node 0's
    ``train_adapter``; its workers take part in every collective, node 0 exports."""
    if node.node_rank < 1:
        raise ValueError("train_member is for nodes other than node 0")
    _train(
        base_dir,
        records,
        params,
        out_dir,
        base_model_name=base_model_name,
        parent_adapter_dir=parent_adapter_dir,
        should_stop=should_stop,
        eval_records=eval_records,
        replay_records=replay_records,
        checkpoint_dir=checkpoint_dir,
        resume=True,
        world_size=world_size,
        node=node,
    )


def _train(
    base_dir: Path,
    records: Sequence[Record],
    params: TrainParams,
    out_dir: Path,
    *,
    base_model_name: str,
    parent_adapter_dir: Path | None,
    should_stop: Callable[[], bool] | None,
    eval_records: Sequence[Record] | None,
    replay_records: Sequence[Record] | None,
    checkpoint_dir: Path | None,
    resume: bool,
    world_size: int,
    node: NodeSpec | None,
    progress: ProgressFn | None = None,
    on_metrics: MetricsFn | None = None,
) -> TrainResult | None:
    # Imported here: the service starts (and answers health checks) without paying
    # for the transformers/peft import until the first job runs.
    from transformers import AutoTokenizer

    started = time.monotonic()
    problems = validate_training(params)
    if world_size < 1:
        problems.append(f"world_size={world_size} must be at least 1")
    if params.method == "qlora" and (why := qlora_problem()):
        raise MethodUnavailable(why)
    problems += validate_method(params, base_dir, parent_adapter_dir=parent_adapter_dir)
    if problems:
        raise InvalidTrainParams("; ".join(problems))

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples, weights, summary = _tokenized(records, tokenizer, params)
    if not examples:
        raise NothingToTrain(
            f"no record yields a trainable example with cutoff_len={params.cutoff_len} "
            f"and overlong={params.overlong!r} ({summary})"
        )
    eval_examples, eval_weights, _ = _tokenized(eval_records or [], tokenizer, params)
    fisher_examples: list[Example] = []
    if params.regularization == "ewc":
        replay = _tokenized(replay_records, tokenizer, params)[0] if replay_records else []
        fisher_examples = replay or eval_examples or examples
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id  # padded positions are masked out anyway
    if params.checkpoint_every and checkpoint_dir is None:
        checkpoint_dir = out_dir.with_name(out_dir.name + ".checkpoints")

    job = Job(
        base_dir=Path(base_dir),
        examples=examples,
        weights=weights,
        pad_id=int(pad_id),
        params=params,
        out_dir=Path(out_dir),
        base_model_name=base_model_name,
        parent_adapter_dir=parent_adapter_dir,
        eval_examples=eval_examples,
        eval_weights=eval_weights,
        fisher_examples=fisher_examples,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )
    hooks = Hooks(should_stop=should_stop, progress=progress, on_metrics=on_metrics)
    if world_size == 1 and node is None:
        result = run_training(job, LocalComm(), hooks)
        assert result is not None  # rank 0 always returns one
    else:
        from ftops_trainer.distributed import run_data_parallel

        result = run_data_parallel(job, world_size, hooks, node)
    if result is not None:
        result.seconds = time.monotonic() - started
    return result
