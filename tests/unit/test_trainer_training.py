"""Training on the tiny model: loss falls, only safetensors come out, the adapter changes
what the model says; the loop's math (weighting, schedule, accumulation, data parallel),
checkpoints that resume to the same adapter, early stopping and regularisation."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ftops_tinymodel
from ftops_trainer.dataset import IGNORE_INDEX, Record
from ftops_trainer.loop import weighted_token_loss
from ftops_trainer.params import validate_training
from ftops_trainer.schedule import lr_factor, resolve_warmup
from ftops_trainer.training import (
    ADAPTER_FILES,
    NothingToTrain,
    TrainingStopped,
    TrainMetrics,
    TrainParams,
    total_steps,
    train_adapter,
)

FACTS = [Record(f["prompt"], f["completion"]) for f in ftops_tinymodel.new_facts()[:8]]
FEW_STEPS = TrainParams(num_epochs=6, batch_size=4, learning_rate=5e-3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One torch thread: OpenMP pools crawl (10-100x) when other processes share the
    cores, and one thread keeps float reductions repeatable."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path, atol: float = 1e-4) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=atol, rtol=1e-3), key


@pytest.fixture(scope="module")
def trained(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[float], list[TrainMetrics]]:
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    seen: list[tuple[int, int, float]] = []
    metrics: list[TrainMetrics] = []
    result = train_adapter(
        tiny_model_dir,
        FACTS,
        FEW_STEPS,
        out,
        base_model_name="tiny",
        progress=lambda s, t, loss: seen.append((s, t, loss)),
        on_metrics=metrics.append,
    )
    assert result.steps == total_steps(len(FACTS), FEW_STEPS) == 12
    assert [s for s, _, _ in seen] == list(range(1, 13))
    return out, result.losses, metrics


def test_loss_decreases(trained: tuple[Path, list[float], list[TrainMetrics]]) -> None:
    _, losses, _ = trained
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2


def test_metrics_follow_the_schedule(
    trained: tuple[Path, list[float], list[TrainMetrics]],
) -> None:
    _, losses, metrics = trained
    assert [m.step for m in metrics] == list(range(1, 13))
    assert [m.loss for m in metrics] == losses
    assert all(m.total_steps == 12 and m.tokens_per_second > 0 for m in metrics)
    assert metrics[-1].eta_seconds == 0
    assert metrics[0].eta_seconds > 0
    assert metrics[-1].epoch == 6
    # Default: a constant rate (no warmup); the schedules are tested below.
    assert all(m.learning_rate == pytest.approx(5e-3) for m in metrics)


def test_adapter_is_config_and_safetensors_only(
    trained: tuple[Path, list[float], list[TrainMetrics]],
) -> None:
    out, _, _ = trained
    assert sorted(p.name for p in out.iterdir()) == sorted(ADAPTER_FILES)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8
    assert config["lora_alpha"] == 16
    assert config["base_model_name_or_path"] == "tiny"  # not this host's path
    weights = _weights(out)
    assert weights
    assert all("lora_" in k for k in weights)


def test_adapter_changes_the_output(
    tiny_model_dir: Path, trained: tuple[Path, list[float], list[TrainMetrics]]
) -> None:
    out, _, _ = trained
    base, tok = ftops_tinymodel.load(tiny_model_dir)
    tuned, _ = ftops_tinymodel.load(tiny_model_dir, out)
    ids = tok(FACTS[0].prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits, atol=1e-4)


def test_continue_from_parent_and_stop_flag(
    tiny_model_dir: Path, trained: tuple[Path, list[float], list[TrainMetrics]], tmp_path: Path
) -> None:
    parent, parent_losses, _ = trained
    child = train_adapter(
        tiny_model_dir,
        FACTS,
        TrainParams(num_epochs=1, batch_size=4, r=4),  # r is ignored: the parent's shape wins
        tmp_path / "child",
        parent_adapter_dir=parent,
    )
    # It starts where the parent ended, not from scratch.
    assert child.losses[0] < parent_losses[0] * 0.7
    assert json.loads((tmp_path / "child" / "adapter_config.json").read_text())["r"] == 8
    with pytest.raises(TrainingStopped):
        train_adapter(tiny_model_dir, FACTS, FEW_STEPS, tmp_path / "x", should_stop=lambda: True)


def test_prompts_longer_than_cutoff_leave_nothing_to_train(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(NothingToTrain, match="cutoff_len=4"):
        train_adapter(
            tiny_model_dir, FACTS, TrainParams(cutoff_len=4, overlong="refuse"), tmp_path / "a"
        )


# -- the loss and the schedule (no model) -------------------------------------------------


def test_unit_weights_give_the_plain_token_mean_and_weight_2_counts_twice() -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :2] = IGNORE_INDEX  # a prompt
    labels[2, 4:] = IGNORE_INDEX  # padding
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    plain = weighted_token_loss(logits, labels, torch.ones(3)) / tokens
    assert torch.allclose(plain, ForCausalLMLoss(logits, labels, vocab_size=11), atol=1e-6)

    # Weight 2 on the first example == the first example twice in the batch.
    w = torch.tensor([2.0, 1.0, 1.0])
    n0 = int((labels[0, 1:] != IGNORE_INDEX).sum())
    weighted = weighted_token_loss(logits, labels, w) / (tokens + n0)
    twice = ForCausalLMLoss(
        torch.cat([logits[:1], logits]), torch.cat([labels[:1], labels]), vocab_size=11
    )
    assert torch.allclose(weighted, twice, atol=1e-6)


def test_lr_schedules() -> None:
    total, warmup = 20, resolve_warmup(20, warmup_steps=0, warmup_ratio=0.1)
    assert warmup == 2
    for kind in ("cosine", "linear", "constant"):
        f = [lr_factor(s, total=total, warmup=warmup, kind=kind) for s in range(total)]
        assert f[:3] == [0.5, 1.0, 1.0]  # ramps, then starts from the full rate
        assert all(0 < x <= 1 for x in f)
        if kind == "constant":
            assert set(f[1:]) == {1.0}
        else:
            assert f[2:] == sorted(f[2:], reverse=True)
            assert f[-1] < 0.1
    assert lr_factor(10, total=20, warmup=0, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(10, total=20, warmup=0, kind="linear") == pytest.approx(0.5)
    assert resolve_warmup(20, warmup_steps=5, warmup_ratio=0.5) == 5  # steps win


# -- accumulation, checkpoints, early stopping, regularisation ----------------------------


def test_gradient_accumulation_matches_one_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    params = TrainParams(num_epochs=1, batch_size=8, learning_rate=5e-3)
    one = train_adapter(tiny_model_dir, FACTS, params, tmp_path / "one")
    acc = train_adapter(
        tiny_model_dir, FACTS, replace(params, grad_accum_steps=3), tmp_path / "acc"
    )
    assert one.losses == pytest.approx(acc.losses, rel=1e-5)
    _assert_same_adapter(tmp_path / "one", tmp_path / "acc")


def test_resume_from_checkpoint_equals_an_uninterrupted_run(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Dropout on, so the restored RNG state matters too.
    params = TrainParams(
        num_epochs=5,
        max_steps=10,
        batch_size=4,
        learning_rate=5e-3,
        dropout=0.1,
        warmup_steps=2,
        checkpoint_every=4,
    )
    full = train_adapter(
        tiny_model_dir, FACTS, params, tmp_path / "full", checkpoint_dir=tmp_path / "ck_full"
    )
    calls = itertools.count()
    with pytest.raises(TrainingStopped, match="step 6 of 10"):  # "killed" after 6 steps
        train_adapter(
            tiny_model_dir,
            FACTS,
            params,
            tmp_path / "resumed",
            checkpoint_dir=tmp_path / "ck",
            should_stop=lambda: next(calls) >= 6,
        )
    (checkpoint,) = (tmp_path / "ck").iterdir()  # step 4 only; 8 was never reached
    assert checkpoint.name == "step-00000004"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["state.json", "tensors.safetensors"]
    groups = {k.split("/")[0] for k in load_file(str(checkpoint / "tensors.safetensors"))}
    assert {"model", "optimizer", "rng"} <= groups

    resumed = train_adapter(
        tiny_model_dir,
        FACTS,
        params,
        tmp_path / "resumed",
        checkpoint_dir=tmp_path / "ck",
        resume=True,
    )
    assert resumed.resumed_from_step == 4
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    _assert_same_adapter(tmp_path / "full", tmp_path / "resumed", atol=1e-6)
    # keep_checkpoints=2: steps 4 and 8 of the full run.
    assert sorted(p.name for p in (tmp_path / "ck_full").iterdir()) == [
        "step-00000004",
        "step-00000008",
    ]

    # Another run's checkpoint (different data) is refused rather than silently mixed in.
    with pytest.raises(ValueError, match="different run"):
        train_adapter(
            tiny_model_dir,
            FACTS[:4],
            params,
            tmp_path / "other",
            checkpoint_dir=tmp_path / "ck",
            resume=True,
        )


def test_early_stopping_keeps_the_best_evaluated_adapter(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Held-out answers that contradict the training ones: eval loss rises as it learns.
    wrong = [Record(r.prompt, FACTS[(i + 1) % len(FACTS)].completion) for i, r in enumerate(FACTS)]
    metrics: list[TrainMetrics] = []
    result = train_adapter(
        tiny_model_dir,
        FACTS,
        TrainParams(
            num_epochs=10, batch_size=4, learning_rate=1e-2, eval_every=1, early_stopping_patience=2
        ),
        tmp_path / "a",
        eval_records=wrong,
        on_metrics=metrics.append,
    )
    assert result.stopped_early
    assert result.steps < 20
    assert result.best_step is not None
    losses = dict(result.eval_losses)
    assert len(losses) == result.steps
    assert losses[result.best_step] == min(losses.values())
    assert result.steps == result.best_step + 2  # patience 2
    assert [m.eval_loss for m in metrics] == [losses[m.step] for m in metrics]


def test_regularization_towards_the_parent_limits_forgetting(
    tiny_model_dir: Path,
    trained: tuple[Path, list[float], list[TrainMetrics]],
    tmp_path: Path,
) -> None:
    parent, _, _ = trained
    old = ftops_tinymodel.new_facts()[:8]  # what the parent learnt (FACTS)
    new = [Record(f["prompt"], f["completion"]) for f in ftops_tinymodel.new_facts()[8:16]]
    parent_weights = _weights(parent)

    def child(kind: str) -> tuple[float, float]:
        """(squared distance from the parent, loss on the parent's facts)."""
        out = tmp_path / kind
        train_adapter(
            tiny_model_dir,
            new,
            TrainParams(
                num_epochs=3,
                batch_size=4,
                learning_rate=1e-2,
                regularization=kind,
                regularization_weight=1.0,
            ),
            out,
            parent_adapter_dir=parent,
            replay_records=FACTS,  # EWC's Fisher comes from the old data
        )
        weights = _weights(out)
        model, tok = ftops_tinymodel.load(tiny_model_dir, out)
        drift = sum(float((weights[k] - v).pow(2).sum()) for k, v in parent_weights.items())
        return drift, ftops_tinymodel.completion_loss(model, tok, old)

    free_drift, free_old_loss = child("none")
    for kind in ("l2", "ewc"):
        drift, old_loss = child(kind)
        assert drift < 0.7 * free_drift, kind
        assert old_loss < 0.7 * free_old_loss, kind


# -- data parallel ------------------------------------------------------------------------


def test_two_workers_train_the_same_adapter_as_one_process(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # 5 examples, batches of 4: the second batch has one example, so one worker's shard
    # is empty and it must still take part in the gradient sum.
    records = FACTS[:5]
    params = TrainParams(num_epochs=2, batch_size=4, learning_rate=5e-3)
    single = train_adapter(tiny_model_dir, records, params, tmp_path / "single")
    seen: list[int] = []
    data_parallel = train_adapter(
        tiny_model_dir,
        records,
        params,
        tmp_path / "ddp",
        world_size=2,
        progress=lambda step, total, loss: seen.append(step),
    )
    assert data_parallel.world_size == 2
    assert seen == [1, 2, 3, 4]
    assert data_parallel.losses == pytest.approx(single.losses, rel=1e-5)
    _assert_same_adapter(tmp_path / "single", tmp_path / "ddp")


def test_sharded_base_trains_the_same_adapter_as_one_process(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # FSDP: the frozen base is sharded over the two workers. The odd last batch leaves one
    # worker's shard empty: it must still join every gather (a zero-weight pass) or the
    # run would hang; the eval set (3 records over 2 workers) is uneven as well.
    records = FACTS[:5]
    params = TrainParams(num_epochs=2, batch_size=4, learning_rate=5e-3, eval_every=1)
    single = train_adapter(
        tiny_model_dir, records, params, tmp_path / "single", eval_records=FACTS[5:8]
    )
    sharded = train_adapter(
        tiny_model_dir,
        records,
        replace(params, parallelism="fsdp"),
        tmp_path / "fsdp",
        eval_records=FACTS[5:8],
        world_size=2,
    )
    assert sharded.world_size == 2
    # Each worker holds about half of the base (the tiny model is one unit of embeddings
    # plus its blocks; small tensors may round up to a full row).
    assert sharded.base_bytes_per_worker < 0.6 * single.base_bytes_per_worker
    assert sharded.losses == pytest.approx(single.losses, rel=1e-5)
    assert [loss for _, loss in sharded.eval_losses] == pytest.approx(
        [loss for _, loss in single.eval_losses], rel=1e-5
    )
    _assert_same_adapter(tmp_path / "single", tmp_path / "fsdp")


def test_parallelism_must_be_known() -> None:
    assert any("parallelism" in p for p in validate_training(TrainParams(parallelism="zero3")))
