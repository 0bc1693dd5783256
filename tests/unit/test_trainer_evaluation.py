"""Evaluation scores, the retention measure, the retention set and the gate's decisions
(pure logic on hand-made scores), plus one real evaluation of the tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import ftops_tinymodel
from ftops_trainer.dataset import Record
from ftops_trainer.evaluation import (
    EvalResult,
    build_retention_set,
    evaluate_sets,
    merge_results,
    retention,
)
from ftops_trainer.gate import GateConfig, GateResult, evaluate_gate


def score(loss: float, em: float | None = 1.0, n: int = 64) -> EvalResult:
    return EvalResult(
        records=n,
        tokens=4 * n,
        loss=loss,
        exact_match=em,
        exact_match_records=n if em is not None else 0,
    )


def recs(n: int, tag: str) -> list[Record]:
    return [Record(prompt=f"{tag}{i} is", completion=f" {i}.") for i in range(n)]


def pairs(rows: list[dict[str, str]]) -> list[Record]:
    return [Record(prompt=r["prompt"], completion=r["completion"]) for r in rows]


def test_retention_uses_exact_match_when_there_are_targets() -> None:
    r = retention(score(0.1, 0.8), score(0.3, 0.6))
    assert r.basis == "exact_match"
    assert r.value == pytest.approx(0.75)
    assert r.exact_match_ratio == pytest.approx(0.75)
    assert r.loss_ratio == pytest.approx(math.exp(-0.2))  # reported too


def test_retention_falls_back_to_loss() -> None:
    no_targets = retention(score(1.0, None), score(1.5, None))
    assert no_targets.basis == "loss"
    assert no_targets.value == pytest.approx(math.exp(-0.5))
    assert no_targets.exact_match_ratio is None
    never_right = retention(score(1.0, 0.0), score(0.9, 0.0))  # a ratio of 0/0 says nothing
    assert never_right.basis == "loss"
    assert never_right.value == pytest.approx(math.exp(0.1))


def test_merge_results_weights_by_tokens_and_targets() -> None:
    merged = merge_results(score(1.0, 1.0, n=10), score(2.0, 0.0, n=30))
    assert merged.records == 40
    assert merged.loss == pytest.approx((1.0 * 40 + 2.0 * 120) / 160)
    assert merged.exact_match == pytest.approx(0.25)
    assert math.isnan(merge_results().loss)


def test_retention_set_mixes_both_sources_deterministically() -> None:
    previous, probes = recs(100, "old"), recs(100, "probe")
    chosen = build_retention_set(previous, probes, size=64, seed=1)
    assert chosen == build_retention_set(previous, probes, size=64, seed=1)
    assert len(chosen) == len(set(chosen)) == 64
    assert sum(r.prompt.startswith("old") for r in chosen) == 32
    # One side short: the other fills in. Probes inside the buffer count once, as probes.
    few = build_retention_set(recs(5, "old") + probes[:10], probes[:10], size=64)
    assert sorted(r.prompt for r in few) == sorted(r.prompt for r in recs(5, "old") + probes[:10])
    assert build_retention_set([], [], size=64) == []


def test_gate_passes_a_good_candidate() -> None:
    result = evaluate_gate(
        GateConfig(),
        retention_before=score(0.1, 1.0),
        retention_after=score(0.12, 0.98),
        new_before=score(3.0, None, n=20),
        new_after=score(1.0, None, n=20),
    )
    assert result.passed
    assert result.reasons == []
    assert result.metrics["retention"] == pytest.approx(0.98)
    assert result.metrics["retention_on_exact_match"] == 1.0
    assert result.metrics["new_loss_ratio"] == pytest.approx(1 / 3)
    assert result.metrics["new_on_training_data"] == 0.0


def test_gate_fails_on_forgetting_and_on_worse_new_data() -> None:
    result = evaluate_gate(
        GateConfig(),
        retention_before=score(0.1, 1.0),
        retention_after=score(0.5, 0.8125),
        new_before=score(1.0, None, n=8),
        new_after=score(1.2, None, n=8),
        new_on_training_data=True,
    )
    assert not result.passed
    assert result.reasons == [
        "retention 0.812 < 0.950 on 64 retention records (exact match after/before)",
        "new-data loss 1.2000 is 1.200x the parent's 1.0000 (max 1.000x) on 8 training records",
    ]
    assert any("too few records to hold any out" in n for n in result.notes)
    assert result.metrics["new_on_training_data"] == 1.0


def test_gate_thresholds_are_configurable() -> None:
    def gate(config: GateConfig) -> GateResult:
        return evaluate_gate(
            config,
            retention_before=score(1.0, None),
            retention_after=score(1.0 - math.log(0.9), None),  # exp(-loss) ratio 0.9
            new_before=score(2.0, None),
            new_after=score(2.1, None),
        )

    strict = gate(GateConfig())
    assert not strict.passed
    assert "exp(-loss)" in strict.reasons[0]
    assert "1.050x" in strict.reasons[1]
    loose = gate(GateConfig(min_retention=0.89, max_new_loss_ratio=1.1))
    assert loose.passed, loose.reasons
    assert loose.metrics["retention_on_exact_match"] == 0.0


def test_disabled_gate_reports_but_never_blocks() -> None:
    result = evaluate_gate(
        GateConfig(enabled=False),
        retention_before=score(0.1, 1.0),
        retention_after=score(2.0, 0.1),
        new_before=score(1.0, None),
        new_after=score(5.0, None),
    )
    assert result.passed
    assert len(result.reasons) == 2
    assert result.metrics["gate_enabled"] == 0.0
    assert any("gate disabled" in n for n in result.notes)


def test_gate_without_retention_records_or_scores() -> None:
    skipped = evaluate_gate(GateConfig(), new_before=score(2.0), new_after=score(1.0))
    assert skipped.passed
    assert "retention not checked" in skipped.notes[0]
    unscorable = EvalResult(0, 0, math.nan, None, 0, skipped=3)
    failed = evaluate_gate(GateConfig(), new_before=score(2.0), new_after=unscorable)
    assert not failed.passed
    assert "could not be measured" in failed.reasons[0]


def test_tiny_model_base_scores(tiny_model_dir: Path) -> None:
    retained = pairs(ftops_tinymodel.retention_set())
    new = pairs(ftops_tinymodel.new_facts())
    texts = [Record(prompt="", completion=t) for t in ftops_tinymodel.train_texts()[:8]]
    results = evaluate_sets(
        tiny_model_dir, {"retention": retained, "new": new, "texts": texts}, batch_size=32
    )
    kept = results["retention"]
    assert kept.exact_match == 1.0
    assert kept.exact_match_records == kept.records == len(retained)
    assert 0 < kept.loss < 0.5
    assert kept.perplexity == pytest.approx(math.exp(kept.loss))
    assert results["new"].exact_match == 0.0
    assert results["new"].loss > kept.loss + 1  # what it does not know costs far more
    assert results["texts"].exact_match is None  # no prompt: loss only
    assert 0 < results["texts"].loss < math.inf


def test_gate_checks_the_lineage_against_the_base_model_too() -> None:
    from ftops_trainer.gate import GateConfig, evaluate_gate

    def result(loss: float, em: float) -> EvalResult:
        return EvalResult(records=20, tokens=100, loss=loss, exact_match=em, exact_match_records=20)

    same = result(1.0, 1.0)
    # Each step kept 97% of its parent's knowledge, but the lineage lost 10% of the base's.
    verdict = evaluate_gate(
        GateConfig(min_retention=0.95),
        new_before=result(2.0, 0.0),
        new_after=result(1.0, 0.5),
        retention_before=same,
        retention_after=result(1.01, 0.97),
        base_probes_before=result(0.5, 1.0),
        base_probes_after=result(0.9, 0.9),
    )
    assert not verdict.passed
    assert verdict.metrics["retention_vs_base"] == pytest.approx(0.9)
    assert any("base model's knowledge 0.900" in r for r in verdict.reasons)


def test_the_gate_rejects_a_version_that_did_not_learn_its_training_records() -> None:
    """Retention kept and held-out loss lower, but none of its own facts answered: the
    configuration bench/forgetting once reported as meeting its target."""
    verdict = evaluate_gate(
        GateConfig(),
        new_before=score(2.0, 0.0),
        new_after=score(1.5, 0.0),
        retention_before=score(1.0, 1.0),
        retention_after=score(1.0, 1.0),
        learned_before=score(2.0, 0.0, n=20),
        learned_after=score(1.4, 0.0, n=20),
    )
    assert not verdict.passed
    assert verdict.reasons == [
        "learned 0.000 < 0.900: exact match of the completions on 20 of its own training "
        "records (the parent: 0.000); the version did not learn what it was given"
    ]
    assert verdict.metrics["learned"] == 0.0
    assert verdict.metrics["learned_on_exact_match"] == 1.0
    assert verdict.metrics["learned_parent_exact_match"] == 0.0
    assert verdict.metrics["min_learned"] == 0.9
    assert verdict.metrics["retention"] == 1.0  # beside it, each figure reported


def test_the_gate_passes_what_was_learned_and_falls_back_to_token_accuracy() -> None:
    learned = evaluate_gate(
        GateConfig(min_learned=0.9),
        new_before=score(2.0),
        new_after=score(1.0),
        learned_before=score(2.0, 0.0),
        learned_after=score(0.1, 0.95),
    )
    assert learned.passed, learned.reasons
    assert learned.metrics["learned"] == pytest.approx(0.95)
    texts = EvalResult(8, 80, 0.5, None, 0, token_accuracy=0.6)
    on_tokens = evaluate_gate(
        GateConfig(min_learned=0.9),
        new_before=score(2.0),
        new_after=score(1.0),
        learned_before=EvalResult(8, 80, 2.0, None, 0, token_accuracy=0.3),
        learned_after=texts,
    )
    assert on_tokens.metrics["learned_on_exact_match"] == 0.0
    assert (
        "learned 0.600 < 0.900: token accuracy on 8 of its own training records"
        in (on_tokens.reasons[0])
    )
    unmeasured = evaluate_gate(GateConfig(), new_before=score(2.0), new_after=score(1.0))
    assert unmeasured.passed
    assert "learning not checked" in unmeasured.notes[-1]


def test_exact_match_covers_chats_as_training_renders_them(tiny_model_dir: Path) -> None:
    """A chat's last assistant turn is scored after the chat rendered by the model's chat
    template; token accuracy comes with the loss."""
    facts = ftops_tinymodel.retention_set()[:6]
    chats = [
        Record(messages=(("user", f["prompt"]), ("assistant", f["completion"]))) for f in facts
    ]
    result = evaluate_sets(tiny_model_dir, {"chats": chats})["chats"]
    assert result.exact_match is not None
    assert result.exact_match_records == len(chats)
    assert result.token_accuracy is not None
    assert 0.0 <= result.token_accuracy <= 1.0
    retained = evaluate_sets(tiny_model_dir, {"r": pairs(facts)})["r"]
    assert retained.exact_match == 1.0
    assert retained.token_accuracy == pytest.approx(1.0)  # what it knows, token by token
