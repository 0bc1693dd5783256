"""Forgetting on a real model (SmolLM2-135M-Instruct by default), CPU: three incremental
batches of new chat-format facts (``bench.real_facts``: made-up products, companies,
planets... no pretrained model knows), each version trained from the previous one, as a
lineage does in production, with the model's size recipe (``ftops_trainer.recipes``).

After each job:

- ``new EM``: greedy exact match on the facts that job trained on (target >= 0.9);
- ``earlier EM``: exact match on the earlier batches' facts (target >= 0.9 with replay);
- ``GK ret``: general-knowledge retention against the base model: exact match on the
  held-out half of the general-knowledge probes the base model answers right
  (``ftops_trainer.probes``), after / the base model's (target >= 0.97);
- ``gate``: the trainer's default gate against the parent (learned on the batch,
  retention on the held-out probes and the earlier batches, new-data loss on the batch,
  the base model's probes over the lineage).

The replay buffer starts, as in production, from the other half of the probes, and
every job's batch is added to it. Configurations: the recipe as ``ftops train`` runs it
(replay 0.1), without replay, and with replay 0.5 plus EWC towards the parent.
Baseline: the base model (its exact match on the new facts is the "knows none" floor).

    python -m bench.forgetting_real [--facts 12] [--quick] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.forgetting import exact_match as _em
from bench.forgetting import gate_summary
from bench.real_facts import batches as fact_batches
from bench.report import write_rows
from ftops_trainer.dataset import Record, parse_jsonl
from ftops_trainer.evaluation import EvalResult, evaluate_sets, merge_results
from ftops_trainer.gate import GateConfig, evaluate_gate, sample_records
from ftops_trainer.probes import cached_summary, general_probes
from ftops_trainer.recipes import Recipe, base_recipe, recipe_epochs, recipe_params
from ftops_trainer.replay import ReplayBuffer, mix_replay
from ftops_trainer.runner import probe_split
from ftops_trainer.training import TrainParams, train_adapter

NAME = "forgetting_real"
BATCHES = 3
SEED = 0
TARGET_NEW_EM = 0.9
TARGET_EARLIER_EM = 0.9
TARGET_GK = 0.97


@dataclass(frozen=True)
class Config:
    label: str
    ratio: float
    regularization: str = "none"
    regularization_weight: float = 0.0


CONFIGS = [
    Config("recipe (replay 0.1)", 0.1),
    Config("no replay", 0.0),
    Config("replay 0.5 + EWC 1", 0.5, "ewc", 1.0),
]
QUICK = CONFIGS[:2]


@dataclass
class Row:
    config: str
    job: int
    trained: str  # new + replayed records
    steps: int
    train_s: float
    tokens_per_s: float
    new_em: float  # the headline: exact match on this job's own batch
    earlier_em: float  # exact match on the earlier batches (nan for the first job)
    gk_em: float
    gk_ret: float  # gk_em / the base model's
    gate: str


def _records(rows: list[dict[str, object]]) -> list[Record]:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    parsed = parse_jsonl(data)
    assert not parsed.errors, parsed.report()
    return parsed.records


def _run_config(
    cfg: Config,
    recipe: Recipe,
    params: TrainParams,
    model_dir: Path,
    work: Path,
    probe_seed: list[Record],
    gk: list[Record],
    batches: list[list[Record]],
    base: dict[str, EvalResult],
) -> list[Row]:
    params = replace(
        params, regularization=cfg.regularization, regularization_weight=cfg.regularization_weight
    )
    buffer = ReplayBuffer(seed=SEED)
    buffer.add(probe_seed)
    parent_dir: Path | None = None
    parent = base
    rows = []
    for job, batch in enumerate(batches):
        mixed = mix_replay(batch, buffer, cfg.ratio, seed=SEED + job)
        # As the trainer fits them to the job's dataset (replay comes on top).
        epochs = recipe_epochs(recipe, len(batch), params.batch_size)
        out = work / f"{cfg.label}-{job}".replace(" ", "_").replace("(", "").replace(")", "")
        result = train_adapter(
            model_dir,
            mixed,
            replace(params, num_epochs=epochs),
            out,
            base_model_name=model_dir.name,
            parent_adapter_dir=parent_dir,
            replay_records=buffer.records or None,
        )
        buffer.add(batch)
        sets = {"gk": gk} | {f"b{i}": batches[i] for i in range(job + 1)}
        ev = evaluate_sets(model_dir, sets, adapter_dir=out)
        earlier = [f"b{i}" for i in range(job)]
        gate = evaluate_gate(
            GateConfig(),
            retention_before=merge_results(parent["gk"], *(parent[k] for k in earlier)),
            retention_after=merge_results(ev["gk"], *(ev[k] for k in earlier)),
            new_before=parent[f"b{job}"],
            new_after=ev[f"b{job}"],
            new_on_training_data=True,
            base_probes_before=base["gk"] if job else None,
            base_probes_after=ev["gk"] if job else None,
            learned_before=parent[f"b{job}"],
            learned_after=ev[f"b{job}"],
        )
        base_gk = _em(base["gk"])
        rows.append(
            Row(
                config=cfg.label,
                job=job + 1,
                trained=f"{len(batch)}+{len(mixed) - len(batch)}",
                steps=result.steps,
                train_s=round(result.seconds, 1),
                tokens_per_s=round(result.tokens / result.seconds, 1) if result.seconds else 0,
                new_em=_em(ev[f"b{job}"]),
                earlier_em=_em(merge_results(*(ev[k] for k in earlier))) if earlier else math.nan,
                gk_em=_em(ev["gk"]),
                gk_ret=_em(ev["gk"]) / base_gk if base_gk else math.nan,
                gate=gate_summary(gate),
            )
        )
        print(_format_row(rows[-1]), flush=True)
        parent_dir, parent = out, {**parent, **ev}
    return rows


HEADER = (
    f"{'config':<22} {'job':>3} {'trained':>7} {'steps':>5} {'train s':>7} {'tok/s':>6} "
    f"{'new EM':>6} {'earlier EM':>10} {'GK EM':>5} {'GK ret':>6}  gate"
)


def _format_row(r: Row) -> str:
    earlier = "-" if math.isnan(r.earlier_em) else f"{r.earlier_em:.3f}"
    return (
        f"{r.config:<22} {r.job:>3} {r.trained:>7} {r.steps:>5} {r.train_s:>7.1f} "
        f"{r.tokens_per_s:>6.1f} {r.new_em:>6.3f} {earlier:>10} {r.gk_em:>5.3f} "
        f"{r.gk_ret:>6.3f}  {r.gate}"
    )


def _met(r: Row, replayed: bool) -> bool:
    earlier_ok = math.isnan(r.earlier_em) or not replayed or r.earlier_em >= TARGET_EARLIER_EM
    return r.new_em >= TARGET_NEW_EM and r.gk_ret >= TARGET_GK and earlier_ok


def _verdicts(rows: list[Row], configs: list[Config]) -> dict[str, str]:
    out = {}
    for cfg in configs:
        own = [r for r in rows if r.config == cfg.label]
        jobs = [r.job for r in own if _met(r, cfg.ratio > 0)]
        met = (
            "met after every job"
            if len(jobs) == len(own)
            else f"met after job(s) {jobs}"
            if jobs
            else "never met"
        )
        new = ", ".join(f"{r.new_em:.3f}" for r in own)
        earlier = ", ".join(f"{r.earlier_em:.3f}" for r in own[1:])
        gk = ", ".join(f"{r.gk_ret:.3f}" for r in own)
        out[f"target, {cfg.label}"] = f"new EM {new}; earlier EM {earlier}; GK ret {gk}; {met}"
    return out


def _describe(p: TrainParams) -> str:
    return (
        f"LoRA r {p.r} alpha {p.alpha} on {'+'.join(p.target_modules)}, lr {p.learning_rate:g} "
        f"{p.lr_scheduler}, {p.num_epochs} epochs, batch {p.batch_size}"
    )


def main(
    facts: int = 12,
    quick: bool = False,
    model: Path | None = None,
    gk_size: int = 48,
    only: list[int] | None = None,
) -> Path:
    from transformers.utils import logging as hf_logging

    from ftops_runtime.hashing import model_fingerprint

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    started = time.monotonic()
    if model is None:
        from ftops_models import smollm2_dir

        model = smollm2_dir()
    model_dir = Path(model).resolve()
    recipe = base_recipe(model_dir)
    assert recipe is not None, f"no safetensors weights in {model_dir}"
    config = json.loads((model_dir / "config.json").read_text())
    params = recipe_params(recipe, str(config.get("model_type", "")))

    t0 = time.monotonic()
    fingerprint = model_fingerprint(model_dir)
    probes = general_probes(model_dir, fingerprint)
    probe_s = time.monotonic() - t0
    summary = cached_summary(fingerprint) or {}
    probe_seed, held = probe_split(probes)
    # Each job scores these by greedy generation: a seeded sample keeps that affordable on
    # CPU (the trainer's own retention set takes up to 256).
    gk = sample_records(held, gk_size, SEED)
    batches = [_records(b) for b in fact_batches(facts, BATCHES, SEED)]
    base = evaluate_sets(model_dir, {"gk": gk} | {f"b{i}": b for i, b in enumerate(batches)})
    configs = [CONFIGS[i] for i in only] if only else QUICK if quick else CONFIGS
    print(HEADER, flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            rows += _run_config(
                cfg, recipe, params, model_dir, Path(tmp), probe_seed, gk, batches, base
            )

    b_base = merge_results(*(base[f"b{i}"] for i in range(BATCHES)))
    notes: dict[str, str | float] = {
        "model": f"{model_dir.name} ({summary.get('base_dir', model_dir)})",
        "recipe": f"{recipe.name}: {_describe(params)} (at least {recipe.min_steps} steps: "
        f"{recipe_epochs(recipe, facts, params.batch_size)} epochs for {facts} facts)",
        "facts": f"{BATCHES} batches of {facts} made-up chat facts (bench.real_facts, seed {SEED})",
        "general-knowledge probes": (
            f"the base model answers {summary.get('kept', len(probes))} of "
            f"{summary.get('total', '?')} right ({summary.get('kept_by_kind', {})}); "
            f"{len(probe_seed)} seed the replay buffer, {len(held)} held out, of which a "
            f"sample of {len(gk)} measures GK; "
            f"filtered in {summary.get('seconds', round(probe_s, 1))} s (cached after)"
        ),
        "base model": f"new facts EM {_em(b_base):.3f}, GK EM {_em(base['gk']):.3f}",
        "gate": "default GateConfig (learned >= 0.9, retention >= 0.95) vs the parent",
        "targets": f"after each job: new EM >= {TARGET_NEW_EM}, earlier EM >= "
        f"{TARGET_EARLIER_EM} (with replay), GK ret >= {TARGET_GK}",
        **_verdicts(rows, configs),
        "wall_s": round(time.monotonic() - started, 1),
    }
    return _write(rows, notes, quick)


def _write(rows: list[Row], notes: dict[str, str | float], quick: bool) -> Path:
    description = (
        "a real model over 3 incremental jobs of new chat facts: exact match on each job's "
        "facts (headline), on the earlier jobs' facts, and general-knowledge retention"
    )
    lines = [_format_row(r) for r in rows]
    return write_rows(NAME, description, HEADER, lines, rows, notes, quick=quick)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--facts", type=int, default=12, help="new facts per batch")
    parser.add_argument("--quick", action="store_true", help="2 configurations instead of 3")
    parser.add_argument("--model", type=Path, default=None, help="a model directory")
    parser.add_argument("--gk-size", type=int, default=48, help="held-out probes scored")
    parser.add_argument(
        "--configs", default="", help="comma-separated indices into CONFIGS (default: all)"
    )
    args = parser.parse_args()
    only = [int(i) for i in args.configs.split(",") if i.strip()] or None
    main(facts=args.facts, quick=args.quick, model=args.model, gk_size=args.gk_size, only=only)
