"""Trainer throughput: ``train_adapter`` (ftops' loop: weighted loss, schedule, clipping,
metrics callback) against a plain PEFT + PyTorch loop, on the tiny model with the same
LoRA, data, batch order, optimizer and steps. Baseline: the plain loop.

Throughput is input tokens (padding excluded) per second over steps 2..N, from per-step
timestamps (the trainer's through its ``on_metrics`` callback), alternating the two cases
in one process for a few rounds. One torch thread for both: stable when other processes
share the cores. Memory comes from a fresh subprocess per case that imports, loads the
model, trains and saves once: its peak RSS (``ru_maxrss``, the whole process, torch and
the imports included), and the peak RSS growth during the run alone (``VmHWM`` reset via
``/proc/self/clear_refs`` after the imports, minus the RSS then). tracemalloc would miss
torch's allocations, so it is not used."""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.models import TINY, bench_model, model_argument
from bench.report import Report

STEPS = 40
BATCH = 8
ROUNDS = 5
THREADS = 1
LR = 2e-3
TARGET_RATIO = 0.95


def _records() -> list[Any]:
    import ftops_tinymodel
    from ftops_trainer.dataset import Record

    return [Record(f["prompt"], f["completion"]) for f in ftops_tinymodel.new_facts()]


def _params() -> Any:
    from ftops_trainer.training import TrainParams

    return TrainParams(
        batch_size=BATCH, num_epochs=STEPS, max_steps=STEPS, learning_rate=LR, seed=0
    )


def run_trainer(model_dir: Path, out: Path) -> tuple[list[float], list[int]]:
    """Per-step end times and tokens, through the trainer's own callback."""
    from ftops_trainer.training import TrainMetrics, train_adapter

    stamps: list[float] = []

    def on_metrics(m: TrainMetrics) -> None:
        stamps.append(time.perf_counter())

    train_adapter(model_dir, _records(), _params(), out, on_metrics=on_metrics)
    return stamps, _step_tokens(model_dir)


def _step_tokens(model_dir: Path) -> list[int]:
    """Input tokens of every step, from the same tokenisation and batch plan."""
    from transformers import AutoTokenizer

    from ftops_trainer.dataset import tokenize
    from ftops_trainer.schedule import plan_batches

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = [e for r in _records() if (e := tokenize(r, tok, 256)) is not None]
    plan = plan_batches(len(examples), BATCH, STEPS, 0)[:STEPS]
    return [sum(len(examples[i].input_ids) for i in idx) for idx in plan]


def run_plain(model_dir: Path, out: Path) -> tuple[list[float], list[int]]:
    """The baseline: what one writes with PEFT and PyTorch alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftops_trainer.dataset import IGNORE_INDEX, tokenize
    from ftops_trainer.schedule import plan_batches

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = [e for r in _records() if (e := tokenize(r, tok, 256)) is not None]
    plan = plan_batches(len(examples), BATCH, STEPS, 0)[:STEPS]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model: Any = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    stamps = []
    for idx in plan:
        batch = [examples[i] for i in idx]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), IGNORE_INDEX)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
            mask[row, : len(e.input_ids)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # what a loop logs each step
        stamps.append(time.perf_counter())
    model.save_pretrained(str(out), safe_serialization=True)
    return stamps, [sum(len(examples[i].input_ids) for i in idx) for idx in plan]


CASES = {"plain": run_plain, "trainer": run_trainer}


def _steps(stamps: list[float], tokens: list[int]) -> tuple[list[float], int]:
    """Durations of steps 2..N (step 1 pays one-off warm-up) and their tokens."""
    return [b - a for a, b in itertools.pairwise(stamps)], sum(tokens[1:])


def _memory(case: str, base_model: str) -> dict[str, float]:
    """Peak RSS of a fresh process running the case once (MiB)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.train_throughput",
            "--memory",
            case,
            "--base-model",
            base_model,
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_child(case: str, base_model: str) -> None:
    torch.set_num_threads(THREADS)
    model_dir = bench_model(base_model).path
    import peft  # noqa: F401  (both cases import it; measured after the imports)
    import transformers  # noqa: F401

    import ftops_trainer.training  # noqa: F401

    # Reset the peak (VmHWM) so it covers the run, not the imports before it.
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_mib("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        CASES[case](model_dir, Path(tmp) / "adapter")
    peak = _rss_mib("VmHWM")
    whole = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps({"process_peak_mib": round(whole, 1), "run_growth_mib": round(peak - before, 1)})
    )


def main(base_model: str = TINY) -> None:
    torch.set_num_threads(THREADS)
    model = bench_model(base_model)
    model_dir = model.path
    durations: dict[str, list[float]] = {case: [] for case in CASES}
    tokens: dict[str, int] = dict.fromkeys(CASES, 0)
    with tempfile.TemporaryDirectory() as tmp:
        run_plain(model_dir, Path(tmp) / "warmup")  # first-use costs out of the rounds
        for r in range(ROUNDS):
            for case, run in CASES.items():
                steps, n = _steps(*run(model_dir, Path(tmp) / f"{case}-{r}"))
                durations[case] += steps
                tokens[case] += n
    memory = {case: _memory(case, base_model) for case in CASES}

    report = Report(
        model.report_name("train_throughput"),
        f"LoRA r=8 on {model.name}, {STEPS} steps x batch {BATCH}, {ROUNDS} rounds "
        f"alternating, {THREADS} torch thread; rows are optimizer steps",
        "plain PEFT + PyTorch loop (HF loss, AdamW, clipping)",
    )
    base = report.add("plain PEFT + torch loop", durations["plain"])
    ours = report.add("ftops train_adapter", durations["trainer"])
    tps = {case: tokens[case] / sum(durations[case]) for case in CASES}
    # Same step of the same round, one case right after the other: the median of the
    # per-step ratios shrugs off bursts from other processes that the totals absorb.
    paired = statistics.median(
        p / t for p, t in zip(durations["plain"], durations["trainer"], strict=True)
    )
    report.notes["tokens/s plain (total tokens / total time)"] = round(tps["plain"], 1)
    report.notes["tokens/s ftops (total tokens / total time)"] = round(tps["trainer"], 1)
    report.notes["throughput ratio ftops/plain, totals"] = f"{tps['trainer'] / tps['plain']:.3f}"
    report.notes["throughput ratio ftops/plain, median of paired steps"] = (
        f"{paired:.3f} (target >= {TARGET_RATIO})"
    )
    report.notes["p50 step time ratio plain/ftops"] = f"{base.p50_ms / ours.p50_ms:.3f}"
    for case, label in (("plain", "plain"), ("trainer", "ftops")):
        m = memory[case]
        report.notes[f"peak RSS {label}, whole process (MiB)"] = m["process_peak_mib"]
        report.notes[f"peak RSS growth during the run {label} (MiB)"] = m["run_growth_mib"]
    report.write()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory", choices=sorted(CASES), help="internal: one memory run")
    model_argument(parser)
    args = parser.parse_args()
    if args.memory:
        _memory_child(args.memory, args.base_model)
    else:
        main(args.base_model)
