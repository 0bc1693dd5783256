"""The training loop, shared by the single-process and the data-parallel paths.

One optimizer step trains on ``batch_size`` examples. The objective is the weighted
token-mean cross-entropy: every completion token's loss counts ``weight`` times (its
example's weight), divided by the weighted token count of the whole step's batch. So a
weight of 2 is the same as the example appearing twice, weights of 1 give exactly the
plain mean over tokens (the usual Hugging Face causal-LM loss), and because each
micro-batch (accumulation) and each worker's shard (data parallel) divides its own sum by
that same global count, the summed gradients are the single-batch gradient: the adapter
does not depend on ``grad_accum_steps`` or the number of workers, up to float rounding.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ftops_trainer import checkpoints
from ftops_trainer.dataset import IGNORE_INDEX, Example
from ftops_trainer.methods import PreparedModel, prepare_model
from ftops_trainer.params import TrainParams
from ftops_trainer.regularization import Regularizer, estimate_fisher
from ftops_trainer.schedule import lr_factor, plan_batches, resolve_warmup, split

ProgressFn = Callable[[int, int, float], None]


class TrainingStopped(Exception):
    """The stop flag was raised (trainer shutting down) before training finished."""


class NothingToTrain(ValueError):
    """Every example lost all its trainable tokens to the cutoff."""


@dataclass(frozen=True)
class TrainMetrics:
    """What ``on_metrics`` gets after every optimizer step (on rank 0)."""

    step: int
    total_steps: int
    epoch: float  # fractional, e.g. 2.5 = half-way through the third epoch
    loss: float  # this step's training loss (without regularisation terms)
    learning_rate: float
    grad_norm: float | None  # before clipping; None when clipping is off
    tokens_per_second: float  # input tokens (padding excluded) per second, this run so far
    eta_seconds: float
    eval_loss: float | None = None  # set on steps that ran a held-out evaluation


MetricsFn = Callable[[TrainMetrics], None]


@dataclass
class TrainResult:
    adapter_dir: Path
    final_loss: float  # mean loss over the last epoch
    steps: int
    seconds: float
    examples: int  # examples trained on (records minus those truncated to nothing)
    losses: list[float] = field(default_factory=list)  # per step
    method: str = "lora"
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    best_step: int | None = None  # step of the lowest eval loss
    stopped_early: bool = False
    resumed_from_step: int = 0  # the checkpoint's step, 0 when started afresh
    tokens: int = 0  # input tokens trained on by this run
    truncated: int = 0  # examples cut to fit cutoff_len
    world_size: int = 1
    # Bytes of frozen base weights one worker holds (1/N of them with a sharded base).
    base_bytes_per_worker: int = 0


@dataclass(frozen=True)
class Job:
    """Everything a training run needs, picklable so data-parallel workers get a copy."""

    base_dir: Path
    examples: list[Example]
    weights: list[float]
    pad_id: int
    params: TrainParams
    out_dir: Path
    base_model_name: str
    parent_adapter_dir: Path | None = None
    eval_examples: list[Example] = field(default_factory=list)
    eval_weights: list[float] = field(default_factory=list)
    fisher_examples: list[Example] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    resume: bool = False


@dataclass
class Hooks:
    should_stop: Callable[[], bool] | None = None
    progress: ProgressFn | None = None
    on_metrics: MetricsFn | None = None


class Comm(Protocol):
    """Collectives across data-parallel workers (trivial for a single process)."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def device(self) -> torch.device | None:
        """The worker's device (None: the job's ``device`` setting decides)."""

    def any(self, flag: bool) -> bool: ...
    def sum_(self, tensors: list[torch.Tensor]) -> None: ...
    def broadcast_(self, tensors: list[torch.Tensor]) -> None: ...


class LocalComm:
    rank = 0
    world_size = 1
    device = None

    def any(self, flag: bool) -> bool:
        return flag

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        pass

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but this trainer has no CUDA GPU")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_precision(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. ``auto`` is fp32 on CPU, where bf16
    autocast is usually slower than fp32 for small matrices."""
    if mode == "no" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
        if device.type != "cuda":
            raise ValueError("mixed_precision='fp16' needs CUDA; use 'bf16' or 'no' on CPU")
        return torch.float16
    return torch.bfloat16


def label_tokens(example: Example) -> int:
    """Tokens the loss covers: labelled positions after the first (nothing predicts it)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def collate(
    examples: Sequence[Example], weights: Sequence[float], pad_id: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}, torch.tensor(weights, device=device)


def weighted_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Sum over tokens of weight x cross-entropy (fp32); the caller divides by the
    weighted token count. Prompt tuning prepends virtual positions: only the last
    ``labels.shape[1]`` logits belong to the input."""
    logits = logits[:, -labels.shape[1] :]
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    return (ce * weights[:, None]).sum()


def _forward(
    prepared: PreparedModel,
    batch: dict[str, torch.Tensor],
    weights: torch.Tensor,
    amp: torch.dtype | None,
) -> torch.Tensor:
    device = batch["input_ids"].device
    kwargs: dict[str, Any] = {}
    if prepared.method != "prefix_tuning":  # prefix tuning feeds its prefix as the cache
        kwargs["use_cache"] = False
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = prepared.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
        )
    return weighted_token_loss(out.logits, batch["labels"], weights)


def fingerprint(job: Job) -> str:
    """What a checkpoint must match to be resumed: the parameters that shape the math,
    the data, and the parent's weights (by content: a re-downloaded parent matches)."""
    h = hashlib.sha256()
    skip = {"checkpoint_every", "keep_checkpoints"}
    params = {k: v for k, v in asdict(job.params).items() if k not in skip}
    h.update(json.dumps(params, sort_keys=True).encode())
    for group in (job.examples, job.eval_examples, job.fisher_examples):
        h.update(json.dumps([[e.input_ids, e.labels] for e in group]).encode())
    h.update(json.dumps([job.weights, job.eval_weights]).encode())
    if job.parent_adapter_dir is not None:
        for path in sorted(Path(job.parent_adapter_dir).iterdir()):
            if path.is_file():
                h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@dataclass
class _State:
    """Everything besides weights and optimizer that a checkpoint carries."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    best_loss: float = math.inf
    best_step: int | None = None
    bad_evals: int = 0
    best: dict[str, torch.Tensor] | None = None  # weights at best_step (early stopping)


class _Run:
    def __init__(self, job: Job, comm: Comm, hooks: Hooks) -> None:
        self.job, self.comm, self.hooks = job, comm, hooks
        p = self.params = job.params
        # A data-parallel worker's device was placed by its launcher (cuda:{local_rank}).
        self.device = comm.device if comm.device is not None else resolve_device(p.device)
        self.amp = resolve_precision(p.mixed_precision, self.device)
        schedule = plan_batches(len(job.examples), p.batch_size, p.num_epochs, p.seed)
        self.schedule = schedule[: p.max_steps] if p.max_steps else schedule
        self.total = len(self.schedule)
        self.steps_per_epoch = math.ceil(len(job.examples) / p.batch_size)
        self.n_tokens = [label_tokens(e) for e in job.examples]

        torch.manual_seed(p.seed)
        self.prepared = prepare_model(
            job.base_dir,
            p,
            total_steps=self.total,
            parent_adapter_dir=job.parent_adapter_dir,
            device=self.device,
        )
        self.trainable = self.prepared.trainable()
        if not self.trainable:
            raise ValueError(f"method {self.prepared.method} left no trainable parameter")
        self.tensors = [t for _, t in self.trainable]
        # Sharded base: every rank must run the same number of passes (see sharding.py).
        self.sharded = comm.world_size > 1 and p.parallelism == "fsdp"
        if comm.world_size > 1:
            comm.broadcast_([t.data for t in self.tensors])  # identical start on every rank
            if self.sharded:
                from ftops_trainer.sharding import shard_frozen_base

                shard_frozen_base(
                    self.prepared.model, self.tensors, comm.world_size, self.device.type
                )
            if comm.rank:
                torch.manual_seed(p.seed + comm.rank)  # its own dropout masks
        self.regularizer = self._regularizer()
        self.optimizer = torch.optim.AdamW(
            self.tensors, lr=p.learning_rate, weight_decay=p.weight_decay
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.warmup = resolve_warmup(self.total, p.warmup_steps, p.warmup_ratio)
        self.state = _State()
        self.fingerprint = fingerprint(job)
        self.resumed_from = 0
        if comm.world_size > 1:
            self._agree("the training data, parameters or parent", self.fingerprint)
        if job.resume and job.checkpoint_dir is not None:
            latest = checkpoints.latest(job.checkpoint_dir)
            if latest is not None:
                self._restore(latest)
        if comm.world_size > 1:
            self._agree(
                "the checkpoint to resume from (is checkpoint_dir shared by every node?)",
                f"{self.resumed_from:x}",
            )

    def _agree(self, what: str, hex_value: str) -> None:
        """Every rank must hold rank 0's value (nodes derive their inputs themselves):
        a mismatch fails every rank at once instead of training on different data."""
        mine = torch.tensor([int(hex_value[:15], 16)], dtype=torch.int64)
        ref = mine.clone()
        self.comm.broadcast_([ref])
        if self.comm.any(not torch.equal(mine, ref)):
            raise ValueError(f"data-parallel workers disagree with rank 0 on {what}")

    # -- pieces ---------------------------------------------------------------------------

    def _regularizer(self) -> Regularizer | None:
        p = self.params
        if p.regularization == "none" or p.regularization_weight == 0:
            return None
        fisher = None
        if p.regularization == "ewc":
            examples = self.job.fisher_examples[: p.fisher_examples]
            model = self.prepared.model
            model.eval()

            def loss_of(i: int) -> torch.Tensor:
                batch, w = collate([examples[i]], [1.0], self.job.pad_id, self.device)
                num = _forward(self.prepared, batch, w, self.amp)
                return num / max(1, label_tokens(examples[i]))

            fisher = estimate_fisher(self.trainable, len(examples), loss_of)
            model.train()
        return Regularizer(p.regularization, p.regularization_weight, self.trainable, fisher)

    def _penalty(self) -> torch.Tensor | None:
        terms = [t for t in (self.prepared.penalty(),) if t is not None]
        if self.regularizer is not None:
            terms.append(self.regularizer.penalty(self.trainable))
        return torch.stack(terms).sum() if terms else None

    @torch.no_grad()
    def evaluate(self) -> float:
        job, comm = self.job, self.comm
        model = self.prepared.model
        model.eval()
        examples, weights = job.eval_examples, job.eval_weights
        denom = sum(w * label_tokens(e) for e, w in zip(examples, weights, strict=True))
        shards = split(list(range(len(examples))), comm.world_size)
        mine = shards[comm.rank]
        total = torch.zeros((), device=self.device)
        size = self.params.batch_size
        # Rank 0 holds the largest shard: with a sharded base every rank makes its passes.
        passes = math.ceil(len(shards[0]) / size) if self.sharded else math.ceil(len(mine) / size)
        for n in range(passes):
            chunk = mine[n * size : (n + 1) * size]
            if chunk:
                batch, w = collate(
                    [examples[i] for i in chunk],
                    [weights[i] for i in chunk],
                    job.pad_id,
                    self.device,
                )
            else:
                batch, w = self._idle_batch()
            total += _forward(self.prepared, batch, w, self.amp)
        comm.sum_([total])
        model.train()
        return float(total) / denom if denom else math.nan

    def _idle_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A zero-weight pass for a rank with nothing to do: it contributes nothing but
        takes part in the sharded base's gathers."""
        return collate([self.job.examples[0]], [0.0], self.job.pad_id, self.device)

    def _train_step(self, step: int) -> tuple[float, float | None]:
        """One optimizer step; returns (loss, grad norm)."""
        job, comm, p = self.job, self.comm, self.params
        idx = self.schedule[step]
        lr = p.learning_rate * lr_factor(
            step, total=self.total, warmup=self.warmup, kind=p.lr_scheduler
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        denom = sum(job.weights[i] * self.n_tokens[i] for i in idx) or 1.0
        numerator = torch.zeros((), device=self.device)
        shard = split(idx, comm.world_size)[comm.rank]
        for micro in split(shard, p.grad_accum_steps):
            if micro:
                batch, w = collate(
                    [job.examples[i] for i in micro],
                    [job.weights[i] for i in micro],
                    job.pad_id,
                    self.device,
                )
            elif self.sharded:
                batch, w = self._idle_batch()
            else:
                continue
            num = _forward(self.prepared, batch, w, self.amp)
            loss = num / denom
            torch.autograd.backward(self.scaler.scale(loss) if self.scaler else loss)
            numerator += num.detach()
        # Step-level terms (regularisation) count once per step: on rank 0 only.
        if comm.rank == 0 and (penalty := self._penalty()) is not None:
            torch.autograd.backward(self.scaler.scale(penalty) if self.scaler else penalty)
        if comm.world_size > 1:
            grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in self.tensors]
            comm.sum_([*grads, numerator])
            for t, g in zip(self.tensors, grads, strict=True):
                t.grad = g
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if p.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.tensors, p.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.prepared.after_step(step + 1)  # AdaLoRA: after the step, before zero_grad
        self.optimizer.zero_grad(set_to_none=True)
        return float(numerator) / denom, grad_norm

    def _after_eval(self, step: int, eval_loss: float) -> bool:
        """Record an evaluation; True when early stopping says stop."""
        st, patience = self.state, self.params.early_stopping_patience
        st.eval_losses.append((step, eval_loss))
        if eval_loss < st.best_loss:
            st.best_loss, st.best_step, st.bad_evals = eval_loss, step, 0
            if patience:
                st.best = {n: t.detach().clone() for n, t in self.trainable}
        else:
            st.bad_evals += 1
        return bool(patience) and st.bad_evals >= patience

    # -- checkpoints ----------------------------------------------------------------------

    def _checkpoint(self) -> None:
        st = self.state
        optim_tensors, optim_meta = checkpoints.optimizer_state(self.optimizer)
        rng_tensors, rng_meta = checkpoints.rng_state()
        extra_tensors, extra_meta = self.prepared.extra_state()
        tensors: dict[str, dict[str, torch.Tensor]] = {
            "model": {n: t for n, t in self.trainable},
            "optimizer": optim_tensors,
            "rng": rng_tensors,
            "extra": extra_tensors,
        }
        if st.best is not None:
            tensors["best"] = st.best
        state = {
            "fingerprint": self.fingerprint,
            "total": self.total,
            "losses": st.losses,
            "eval_losses": st.eval_losses,
            "best_loss": st.best_loss,
            "best_step": st.best_step,
            "bad_evals": st.bad_evals,
            "optimizer": optim_meta,
            "rng": rng_meta,
            "extra": extra_meta,
            # The learning rate is a pure function of the step: this is the whole schedule.
            "scheduler": {
                "kind": self.params.lr_scheduler,
                "warmup": self.warmup,
                "total": self.total,
                "base_lr": self.params.learning_rate,
            },
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        assert self.job.checkpoint_dir is not None
        checkpoints.save(
            self.job.checkpoint_dir, st.step, tensors, state, keep=self.params.keep_checkpoints
        )

    def _restore(self, path: Path) -> None:
        tensors, state = checkpoints.load(path)
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"checkpoint {path} was written by a different run (parameters, data or "
                "parent differ); remove it or train without resume"
            )
        weights = tensors.get("model", {})
        if set(weights) != {n for n, _ in self.trainable}:
            raise ValueError(f"checkpoint {path}: its weights do not match the model")
        with torch.no_grad():
            for name, t in self.trainable:
                t.copy_(weights[name].to(t.device))
        checkpoints.load_optimizer_state(
            self.optimizer, tensors.get("optimizer", {}), state["optimizer"]
        )
        self.prepared.load_extra_state(tensors.get("extra", {}), state.get("extra") or {})
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        st = self.state
        st.step = int(state["step"])
        st.losses = [float(x) for x in state["losses"]]
        st.eval_losses = [(int(s), float(v)) for s, v in state["eval_losses"]]
        st.best_loss = float(state["best_loss"])
        st.best_step = state["best_step"]
        st.bad_evals = int(state["bad_evals"])
        st.best = tensors.get("best")
        # Every rank restores rank 0's RNG: exact for one process, and for several
        # whenever dropout is 0 (nothing else draws random numbers while training).
        checkpoints.set_rng_state(tensors["rng"], state["rng"])
        self.resumed_from = st.step

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> TrainResult | None:
        job, comm, hooks, p, st = self.job, self.comm, self.hooks, self.params, self.state
        eval_every = p.eval_every or self.steps_per_epoch
        model = self.prepared.model
        model.train()
        started = time.monotonic()
        tokens = 0
        stopped_early = False
        for step in range(st.step, self.total):
            stop = hooks.should_stop() if hooks.should_stop is not None else False
            if comm.any(stop):
                raise TrainingStopped(f"stopped at step {step} of {self.total}")
            loss, grad_norm = self._train_step(step)
            st.losses.append(loss)
            st.step = done = step + 1
            tokens += sum(len(job.examples[i].input_ids) for i in self.schedule[step])
            eval_loss = None
            if job.eval_examples and (done % eval_every == 0 or done == self.total):
                eval_loss = self.evaluate()
                stopped_early = self._after_eval(done, eval_loss) and done < self.total
            if (
                job.checkpoint_dir is not None
                and p.checkpoint_every
                and done % p.checkpoint_every == 0
                and done < self.total
                and not stopped_early
                and comm.rank == 0
            ):
                self._checkpoint()
            if comm.rank == 0:
                self._report(done, loss, grad_norm, eval_loss, tokens, started)
            if stopped_early:
                break
        if p.early_stopping_patience and st.best is not None:
            with torch.no_grad():  # export the best evaluated weights
                for name, t in self.trainable:
                    t.copy_(st.best[name])
        model.eval()
        if comm.rank != 0:
            return None
        self.prepared.export(job.out_dir, job.base_model_name or str(job.base_dir))
        last_epoch = st.losses[-self.steps_per_epoch :]
        return TrainResult(
            adapter_dir=job.out_dir,
            final_loss=sum(last_epoch) / len(last_epoch),
            steps=len(st.losses),
            seconds=time.monotonic() - started,
            examples=len(job.examples),
            losses=list(st.losses),
            method=self.prepared.method,
            eval_losses=list(st.eval_losses),
            best_step=st.best_step,
            stopped_early=stopped_early,
            resumed_from_step=self.resumed_from,
            truncated=sum(bool(getattr(e, "truncated", False)) for e in job.examples),
            tokens=tokens,
            world_size=comm.world_size,
            base_bytes_per_worker=self._base_bytes(),
        )

    def _base_bytes(self) -> int:
        total = 0
        for param in self.prepared.model.parameters():
            if param.requires_grad:
                continue
            local = param.to_local() if hasattr(param, "to_local") else param  # DTensor shard
            total += local.numel() * local.element_size()
        return total

    def _report(
        self,
        done: int,
        loss: float,
        grad_norm: float | None,
        eval_loss: float | None,
        tokens: int,
        started: float,
    ) -> None:
        hooks = self.hooks
        if hooks.progress is not None:
            hooks.progress(done, self.total, loss)
        if hooks.on_metrics is not None:
            elapsed = max(1e-9, time.monotonic() - started)
            run_steps = done - self.resumed_from
            lr = self.optimizer.param_groups[0]["lr"]
            hooks.on_metrics(
                TrainMetrics(
                    step=done,
                    total_steps=self.total,
                    epoch=done / self.steps_per_epoch,
                    loss=loss,
                    learning_rate=float(lr),
                    grad_norm=grad_norm,
                    tokens_per_second=tokens / elapsed,
                    eta_seconds=(self.total - done) * elapsed / max(1, run_steps),
                    eval_loss=eval_loss,
                )
            )


def run_training(job: Job, comm: Comm, hooks: Hooks) -> TrainResult | None:
    """Train and export (rank 0 exports and returns the result; other ranks None)."""
    return _Run(job, comm, hooks).run()
