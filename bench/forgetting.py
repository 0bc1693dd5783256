"""Forgetting under incremental fine-tuning, with and without replay.

The tiny model knows corpus A (``retention_set()``, from its pretraining facts) and not
corpus B (``new_facts()``). B arrives in 3 batches; each job continues from the previous
job's adapter (``parent_adapter_dir``) and its replay buffer, as a lineage does in
production. A is split once: 20 records seed the replay buffer (the base model's probe
set), 40 are *never trained on* and measure retention, so replay cannot score itself. A
"wide" buffer starts instead from all 230 pretraining sentences minus those 40 (a larger
sample of what the base knows, as a user-supplied retention JSONL could be). "Gentle"
trades learning for retention (lower rate, fewer epochs, LoRA on the MLP output only).
Baseline: the base model (retention 1.0 by definition; its B loss is the reference).

The headline, per job: ``new EM``, greedy exact match on the batch of B that job trained
on (did it learn the facts it was given?), beside ``A EM``, greedy exact match on held-out
A (did it keep what the base knew?). The target needs both: new EM >= 0.9 and A EM >= 0.97.
Loss alone is no evidence of learning facts: a configuration once reported here as meeting
a loss target (B loss -20%) answered none of its new facts.

Other columns: ``A ret`` loss-based retention on held-out A, exp(loss_base - loss);
``A rep EM`` exact match on the 20 A records in the buffers; ``B loss -%`` loss improvement
on all of B vs the base model; ``B seen EM`` exact match on the B batches trained so far
(the lineage's own retention); ``gate`` the default gate vs the parent: learned (exact
match on the batch), retention on held-out A + earlier batches, new-data loss on the batch.

    python -m bench.forgetting [--quick]
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.report import write_rows
from ftops_trainer.dataset import Record
from ftops_trainer.evaluation import EvalResult, evaluate_sets, merge_results
from ftops_trainer.gate import GateConfig, GateResult, evaluate_gate, split_holdout
from ftops_trainer.replay import ReplayBuffer, mix_replay
from ftops_trainer.training import TrainParams, train_adapter

NAME = "forgetting"
BATCHES = 3
# 40 held-out A records: exact match moves in steps of 0.025, so 39/40 still clears 0.97.
A_EVAL_FRACTION = 2 / 3
SEED = 0
TARGET_RETENTION = 0.97
# The facts a job trained on, answered word for word.
TARGET_NEW_EM = 0.9
# A quarter of the default rate and epochs, LoRA on the MLP output only: at equal B loss,
# attention LoRA forgot more in a sweep of this bench.
GENTLE = TrainParams(learning_rate=5e-4, num_epochs=10, target_modules=("down_proj",))
# The default replay ratio with EWC towards the parent: found by a sweep (gentle x replay
# 0.1 x L2/EWC weights 0.3..100 x 10..15 epochs); weaker regularisation forgot 2 of the 40
# held-out facts by job 3, stronger learned B by less than 20%.
GENTLE_EWC = replace(GENTLE, num_epochs=12, regularization="ewc", regularization_weight=2.0)


@dataclass(frozen=True)
class Config:
    label: str
    ratio: float
    params: TrainParams
    # "probes": the buffer starts from the replay part of A (the retention probe set);
    # "pretrain": from a wider sample of what the base knows (its pretraining sentences
    # minus the held-out A facts), as a user-supplied retention JSONL could be.
    seed_source: str = "probes"


CONFIGS = [
    Config("no replay", 0.0, TrainParams()),
    Config("replay 0.1", 0.1, TrainParams()),
    Config("replay 0.5", 0.5, TrainParams()),
    Config("replay 0.8 wide", 0.8, TrainParams(), "pretrain"),
    Config("gentle, no replay", 0.0, GENTLE),
    Config("gentle, replay 0.8 wide", 0.8, GENTLE, "pretrain"),
    Config("gentle+EWC, replay 0.1 wide", 0.1, GENTLE_EWC, "pretrain"),
]
QUICK = [CONFIGS[0], CONFIGS[1], CONFIGS[6]]


@dataclass
class Row:
    config: str
    job: int
    trained: str  # new + replayed records
    steps: int
    train_s: float
    new_em: float  # the headline: exact match on this job's own batch
    a_em: float
    a_ret: float
    a_replay_em: float
    b_loss_drop: float
    b_seen_em: float
    gate: str


def _records(rows: list[dict[str, str]]) -> list[Record]:
    return [Record(prompt=r["prompt"], completion=r["completion"]) for r in rows]


def exact_match(result: EvalResult) -> float:
    return result.exact_match if result.exact_match is not None else math.nan


def _sets(
    a_eval: list[Record], a_replay: list[Record], batches: list[list[Record]]
) -> dict[str, list[Record]]:
    return {"a_eval": a_eval, "a_replay": a_replay} | {f"b{i}": b for i, b in enumerate(batches)}


def _run_config(
    cfg: Config,
    model_dir: Path,
    work: Path,
    seeds: dict[str, list[Record]],
    sets: dict[str, list[Record]],
    base: dict[str, EvalResult],
) -> list[Row]:
    buffer = ReplayBuffer(seed=SEED)
    buffer.add(seeds[cfg.seed_source])  # the lineage's first buffer: base knowledge
    b_all = merge_results(*(base[f"b{i}"] for i in range(BATCHES)))
    parent_dir: Path | None = None
    parent = base
    rows = []
    for job in range(BATCHES):
        batch = sets[f"b{job}"]
        mixed = mix_replay(batch, buffer, cfg.ratio, seed=SEED + job)
        out = work / f"{cfg.label}-{job}".replace(" ", "_").replace(",", "")
        result = train_adapter(
            model_dir, mixed, cfg.params, out, base_model_name="tiny", parent_adapter_dir=parent_dir
        )
        buffer.add(batch)
        ev = evaluate_sets(model_dir, sets, adapter_dir=out)
        earlier = [f"b{i}" for i in range(job)]
        gate = evaluate_gate(
            GateConfig(),
            retention_before=merge_results(parent["a_eval"], *(parent[k] for k in earlier)),
            retention_after=merge_results(ev["a_eval"], *(ev[k] for k in earlier)),
            new_before=parent[f"b{job}"],
            new_after=ev[f"b{job}"],
            new_on_training_data=True,
            learned_before=parent[f"b{job}"],
            learned_after=ev[f"b{job}"],
        )
        b_now = merge_results(*(ev[f"b{i}"] for i in range(BATCHES)))
        rows.append(
            Row(
                config=cfg.label,
                job=job + 1,
                trained=f"{len(batch)}+{len(mixed) - len(batch)}",
                steps=result.steps,
                train_s=round(result.seconds, 1),
                new_em=exact_match(ev[f"b{job}"]),
                a_em=exact_match(ev["a_eval"]),
                a_ret=math.exp(base["a_eval"].loss - ev["a_eval"].loss),
                a_replay_em=exact_match(ev["a_replay"]),
                b_loss_drop=1 - b_now.loss / b_all.loss,
                b_seen_em=exact_match(merge_results(*(ev[f"b{i}"] for i in range(job + 1)))),
                gate=gate_summary(gate),
            )
        )
        print(_format_row(rows[-1]), flush=True)
        parent_dir, parent = out, ev
    return rows


def gate_summary(gate: GateResult) -> str:
    if gate.passed:
        return "pass"
    failed = [
        f"{name} {gate.metrics[name]:.2f}"
        for name, limit in (
            ("learned", "min_learned"),
            ("retention", "min_retention"),
            ("retention_vs_base", "min_retention"),
        )
        if name in gate.metrics and gate.metrics[name] < gate.metrics[limit]
    ]
    return "FAIL " + (", ".join(failed) or "new-data loss")


HEADER = (
    f"{'config':<28} {'job':>3} {'trained':>8} {'steps':>5} {'new EM':>6} {'A EM':>5} "
    f"{'A ret':>5} {'A rep EM':>8} {'B loss -%':>9} {'B seen EM':>9}  gate"
)


def _format_row(r: Row) -> str:
    return (
        f"{r.config:<28} {r.job:>3} {r.trained:>8} {r.steps:>5} {r.new_em:>6.3f} {r.a_em:>5.3f} "
        f"{r.a_ret:>5.3f} {r.a_replay_em:>8.3f} {r.b_loss_drop:>9.1%} {r.b_seen_em:>9.3f}  "
        f"{r.gate}"
    )


def _met(r: Row) -> bool:
    """It learned the facts it was given and kept what the base knew."""
    return r.new_em >= TARGET_NEW_EM and r.a_em >= TARGET_RETENTION


def _verdicts(rows: list[Row]) -> dict[str, str]:
    out = {}
    for r in (r for r in rows if r.job == BATCHES):
        own = [x for x in rows if x.config == r.config]
        jobs = [x.job for x in own if _met(x)]
        met = (
            "met after every job"
            if len(jobs) == len(own)
            else f"met after job(s) {jobs}"
            if jobs
            else "never met"
        )
        new = ", ".join(f"{x.new_em:.3f}" for x in own)
        kept = ", ".join(f"{x.a_em:.3f}" for x in own)
        out[f"target, {r.config}"] = f"new EM per job {new}; A EM per job {kept}; {met}"
    return out


def _describe(p: TrainParams) -> str:
    reg = f", {p.regularization} {p.regularization_weight:g}" if p.regularization != "none" else ""
    return (
        f"lr {p.learning_rate:g}, {p.num_epochs} epochs, batch {p.batch_size}, r {p.r}, "
        f"targets {'+'.join(p.target_modules) or 'default (q/k/v/o_proj)'}{reg}"
    )


def main(quick: bool = False) -> Path:
    from transformers.utils import logging as hf_logging

    from ftops_tinymodel import build, new_facts, retention_set, train_texts

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    started = time.monotonic()
    model_dir = build()
    split = split_holdout(_records(retention_set()), A_EVAL_FRACTION, seed=SEED)
    a_replay, a_eval = split.train, split.holdout
    b = _records(new_facts())
    random.Random(SEED).shuffle(b)  # the file lists prices then capitals; batches mix both
    size = math.ceil(len(b) / BATCHES)
    batches = [b[i : i + size] for i in range(0, len(b), size)]
    sets = _sets(a_eval, a_replay, batches)
    held = {r.prompt + r.completion for r in a_eval}
    seeds = {
        "probes": a_replay,
        "pretrain": [Record(prompt="", completion=t) for t in train_texts() if t not in held],
    }
    base = evaluate_sets(model_dir, sets)
    configs = QUICK if quick else CONFIGS
    print(HEADER, flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            rows += _run_config(cfg, model_dir, Path(tmp), seeds, sets, base)

    b_base = merge_results(*(base[f"b{i}"] for i in range(BATCHES)))
    notes: dict[str, str | float] = {
        "A split": f"{len(a_replay)} records seed the probe buffers, {len(a_eval)} held out "
        "for retention (never trained on)",
        "wide seed": f"{len(seeds['pretrain'])} pretraining sentences minus the held-out A",
        "B": f"{len(b)} new facts in {len(batches)} batches of {[len(x) for x in batches]}, "
        "each job continuing from the previous adapter",
        "base model": f"A EM {exact_match(base['a_eval']):.3f}, A loss {base['a_eval'].loss:.4f}, "
        f"B EM {exact_match(b_base):.3f}, B loss {b_base.loss:.4f}",
        "default params": _describe(TrainParams()),
        "gentle params": _describe(GENTLE),
        "gentle+EWC params": _describe(GENTLE_EWC),
        "gate": "default GateConfig vs the parent; learned and new-data loss on the batch",
        "target": f"after each job: new EM >= {TARGET_NEW_EM} (the batch it trained on) and "
        f"A EM >= {TARGET_RETENTION} (held-out old facts)",
        **_verdicts(rows),
        "wall_s": round(time.monotonic() - started, 1),
    }
    return _write(rows, notes, quick)


def _write(rows: list[Row], notes: dict[str, str | float], quick: bool) -> Path:
    description = (
        "exact match on each job's new facts (headline) and on held-out old facts, over 3 "
        "incremental jobs"
    )
    lines = [_format_row(r) for r in rows]
    return write_rows(NAME, description, HEADER, lines, rows, notes, quick=quick)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 configs instead of 5")
    main(quick=parser.parse_args().quick)
