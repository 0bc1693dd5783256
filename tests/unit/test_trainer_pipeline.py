"""The data pipeline: each stage's behaviour and counts, near-duplicate recall on a
planted set, determinism for a seed, and the report's wire-compatible details."""

from __future__ import annotations

import random
import re
from dataclasses import replace

import numpy as np
import pytest
from datasketch import MinHash

from ftops_trainer.dataset import Record
from ftops_trainer.pipeline import (
    BalanceConfig,
    CleaningConfig,
    DecayConfig,
    ExactDedupConfig,
    NearDedupConfig,
    PipelineConfig,
    QualityConfig,
    StageReport,
    run_pipeline,
)
from ftops_trainer.pipeline.cleaning import clean_text
from ftops_trainer.pipeline.minhash import band_params, shingles, signatures
from ftops_trainer.pipeline.quality import score

ONLY_CLEANING = PipelineConfig(
    quality=QualityConfig(enabled=False),
    exact_dedup=ExactDedupConfig(enabled=False),
    near_dedup=NearDedupConfig(enabled=False),
)
NOTHING = replace(ONLY_CLEANING, cleaning=CleaningConfig(enabled=False))


def stage(result_stages: list[StageReport], name: str) -> StageReport:
    (found,) = [s for s in result_stages if s.name == name]
    return found


def text(s: str, category: str = "", timestamp: float | None = None) -> Record:
    return Record(completion=s, category=category, timestamp=timestamp)


# --- cleaning ------------------------------------------------------------------------


def test_clean_text_strips_controls_and_collapses_runs_but_keeps_indentation() -> None:
    assert clean_text("a\x00b\x07c\u200b d\ufeff") == "abc d"
    assert clean_text("one  \t two\u00a0three") == "one two three"
    assert clean_text("line   \r\nnext\rlast  \n") == "line\nnext\nlast\n"
    assert clean_text("def f():\n    return  1\n\tx") == "def f():\n    return 1\n\tx"
    assert clean_text("a\n\n\n\n\nb") == "a\n\nb"
    assert clean_text("form\x0cfeed") == "form feed"
    assert clean_text(" 50 credits.") == " 50 credits."  # a completion's opening space
    assert clean_text("e\u0301") == "\u00e9"  # NFC


def test_cleaning_drops_records_left_empty_and_counts_changes() -> None:
    records = [
        text("fine"),
        text("needs  cleaning"),
        text("\x00\x01\u200b"),
        Record(prompt="\x07 ", completion="x"),
        Record(messages=(("user", "q"), ("assistant", "\x00"))),
        Record(messages=(("user", "q\x00"), ("assistant", "a"))),
    ]
    result = run_pipeline(records, ONLY_CLEANING)
    assert result.records == [
        text("fine"),
        text("needs cleaning"),
        Record(messages=(("user", "q"), ("assistant", "a"))),
    ]
    cleaning = stage(result.stages, "cleaning")
    assert (cleaning.records_in, cleaning.records_out) == (6, 3)
    assert cleaning.details == {"changed": 2, "dropped_empty": 3}


# --- quality -------------------------------------------------------------------------


def test_quality_drops_junk_and_keeps_ordinary_short_records() -> None:
    good = [
        text("Product AB-17 costs 50 credits."),
        Record(prompt="Product AB-17 costs", completion=" 50 credits."),
        text("fine"),
        Record(prompt="2+2=", completion="4"),
    ]
    junk = [text("@@@@ #### !!!! ???? %%%% ^^^^"), text(" ".join(["buy"] * 12))]
    config = replace(NOTHING, quality=QualityConfig())
    result = run_pipeline(good + junk, config)
    assert result.records == good
    quality = stage(result.stages, "quality")
    assert (quality.records_in, quality.records_out) == (6, 4)
    assert quality.details["weakest.alnum"] == 1
    assert quality.details["weakest.repetition"] == 1
    assert quality.details["threshold"] == 0.5


def test_quality_signals_weights_and_threshold_are_configurable() -> None:
    config = QualityConfig()
    value, found = score("abc abc abc abc abc", config)
    assert found["length"] == 1.0  # 19 characters, within [16, 32000]
    assert found["alnum"] == 1.0
    assert found["repetition"] == pytest.approx(1 / 3)  # 3 trigrams, 1 distinct
    assert value == pytest.approx((1 / 3) ** 0.5)  # repetition weighs 2 of 4
    only_alnum = QualityConfig(weights={"alnum": 1.0}, threshold=0.99)
    kept = run_pipeline([text("+-*/ 5"), text("word.")], replace(NOTHING, quality=only_alnum))
    assert kept.records == [text("word.")]
    strict = replace(NOTHING, quality=QualityConfig(threshold=0.9))
    assert run_pipeline([text("fine")], strict).records == []
    with pytest.raises(ValueError, match="unknown quality signals"):
        QualityConfig(weights={"perplexity": 1.0})
    with pytest.raises(ValueError, match="threshold"):
        QualityConfig(threshold=1.5)


# --- exact dedup ---------------------------------------------------------------------


def test_exact_dedup_ignores_case_and_whitespace_and_keeps_the_first() -> None:
    records = [
        text("The cat sat.", category="first"),
        text("the  CAT\nsat.", category="second"),
        text("The cat sat!"),  # punctuation differs: not an exact duplicate
        Record(prompt="The cat", completion="sat."),  # a different structure
        Record(messages=(("user", "hi"), ("assistant", "yo"))),
        Record(messages=(("user", "HI"), ("assistant", "yo "))),
        Record(messages=(("assistant", "hi"), ("user", "yo"))),  # roles count
    ]
    config = replace(NOTHING, exact_dedup=ExactDedupConfig())
    result = run_pipeline(records, config)
    assert result.records == [records[0], records[2], records[3], records[4], records[6]]
    report = stage(result.stages, "exact_dedup")
    assert (report.records_in, report.records_out) == (7, 5)


# --- near dedup ----------------------------------------------------------------------

NEAR_ONLY = replace(NOTHING, near_dedup=NearDedupConfig())


def word_grams(s: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", s.casefold())
    if len(words) < n:
        return {(w,) for w in words}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = word_grams(a), word_grams(b)
    return len(x & y) / len(x | y)


def planted(n_base: int, n_copies: int, seed: int) -> tuple[list[Record], list[int], list[float]]:
    """Random records with light edits of earlier ones mixed in: the records, the
    indices of the copies, and each copy's true Jaccard similarity to its source."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    texts: list[str] = []
    copies: list[int] = []
    sims: list[float] = []
    for _ in range(n_base + n_copies):
        if texts and len(copies) < n_copies and rng.random() < n_copies / (n_base + n_copies):
            source = rng.choice(texts)
            words = source.split()
            edit = rng.randrange(4)
            if edit == 0:
                words.append(rng.choice(vocab))
            elif edit == 1:
                words.insert(0, rng.choice(vocab))
            elif edit == 2:
                words[-1] = rng.choice(vocab)
            else:
                words = [w.upper() if rng.random() < 0.3 else w for w in words]
                words[len(words) // 2] += ","
            copies.append(len(texts))
            texts.append(" ".join(words))
            sims.append(jaccard(source, texts[-1]))
        else:
            texts.append(" ".join(rng.choices(vocab, k=rng.randint(25, 40))))
    return [text(t) for t in texts], copies, sims


def test_near_dedup_finds_planted_near_duplicates_and_nothing_else() -> None:
    records, copies, sims = planted(n_base=3000, n_copies=300, seed=7)
    assert min(sims) >= 0.8  # every planted copy is a near-duplicate by definition
    result = run_pipeline(records, NEAR_ONLY)
    kept = {id(r) for r in result.records}
    caught = sum(1 for i in copies if id(records[i]) not in kept)
    assert caught / len(copies) >= 0.95
    originals = [r for i, r in enumerate(records) if i not in set(copies)]
    assert all(id(r) in kept for r in originals)  # no false drop
    near = stage(result.stages, "near_dedup")
    assert near.records_in - near.records_out == caught
    assert (near.details["threshold"], near.details["num_perm"]) == (0.8, 128)


def test_near_dedup_respects_the_threshold_and_keeps_the_first() -> None:
    base = " ".join(f"w{i}" for i in range(30))
    edited = base.replace("w15", "x15")  # 5 of 26 shingles change: Jaccard 21/31
    assert jaccard(base, edited) < 0.8
    kept = run_pipeline([text(base), text(edited)], NEAR_ONLY).records
    assert len(kept) == 2
    lower = replace(NEAR_ONLY, near_dedup=NearDedupConfig(threshold=0.6))
    assert run_pipeline([text(base), text(edited)], lower).records == [text(base)]


def test_short_records_compare_as_word_sets() -> None:
    records = [text("red green blue"), text("Blue, green... red!"), text("red green")]
    assert run_pipeline(records, NEAR_ONLY).records == [records[0], records[2]]


def test_a_shared_system_prompt_does_not_make_chats_near_duplicates() -> None:
    system = " ".join(f"rule{i}" for i in range(200))
    chats = [
        Record(messages=(("system", system), ("user", f"q{i} about w{i}"), ("assistant", f"a{i}")))
        for i in range(20)
    ]
    assert len(run_pipeline(chats, NEAR_ONLY).records) == 20


def test_signatures_equal_datasketch_minhash_of_the_same_shingles() -> None:
    texts = ["the quick brown fox jumps over the lazy dog again", "a b c", "", "one two"]
    values, offsets = shingles(texts, 5)
    assert offsets.tolist() == [0, 6, 9, 9, 11]
    sig = signatures(values, offsets, num_perm=64, seed=3)
    for i in range(len(texts)):
        reference = MinHash(num_perm=64, seed=3, hashfunc=int)
        reference.update_batch(values[offsets[i] : offsets[i + 1]].tolist())
        assert np.array_equal(sig[i], reference.hashvalues)


def test_bands_reach_the_recall_target_at_the_threshold() -> None:
    bands, rows = band_params(0.8, 128, 0.95)
    assert bands * rows <= 128
    assert 1 - (1 - 0.8**rows) ** bands >= 0.95
    assert 1 - (1 - 0.8 ** (rows + 1)) ** (128 // (rows + 1)) < 0.95  # the fewest bands


# --- balance -------------------------------------------------------------------------


def categorised(counts: dict[str, int]) -> list[Record]:
    return [text(f"{c} {i}", category=c) for c, n in counts.items() for i in range(n)]


def balanced(records: list[Record], target: dict[str, float], seed: int = 0) -> list[Record]:
    config = replace(NOTHING, balance=BalanceConfig(target=target), seed=seed)
    return run_pipeline(records, config).records


def test_balance_downsamples_towards_the_target_and_keeps_order() -> None:
    records = categorised({"a": 30, "b": 10, "c": 4, "": 3})
    config = replace(NOTHING, balance=BalanceConfig(target={"a": 0.5, "b": 0.5, "z": 1.0}))
    result = run_pipeline(records, config)
    counts = {c: sum(r.category == c for r in result.records) for c in ("a", "b", "c", "")}
    # "z" is missing, so a and b split evenly; unlisted categories pass through.
    assert counts == {"a": 10, "b": 10, "c": 4, "": 3}
    assert [records.index(r) for r in result.records] == sorted(
        records.index(r) for r in result.records
    )
    report = stage(result.stages, "balance")
    assert (report.records_in, report.records_out) == (47, 27)
    assert report.details["before.a"] == 30
    assert report.details["after.a"] == 10
    assert (report.details["missing"], report.details["unlisted"]) == (1, 7)


def test_balance_with_uneven_shares_and_determinism_for_a_seed() -> None:
    records = categorised({"a": 100, "b": 100})
    kept = balanced(records, {"a": 0.8, "b": 0.2})
    assert sum(r.category == "a" for r in kept) == 100
    assert sum(r.category == "b" for r in kept) == 25
    assert balanced(records, {"a": 0.8, "b": 0.2}) == kept
    assert balanced(records, {"a": 0.8, "b": 0.2}, seed=1) != kept


def test_balance_without_a_target_is_skipped() -> None:
    records = categorised({"a": 3, "b": 1})
    result = run_pipeline(records, NOTHING)
    assert result.records == records
    assert stage(result.stages, "balance").details == {"skipped": 1.0}


# --- decay ---------------------------------------------------------------------------


def test_decay_halves_the_weight_every_half_life_from_the_newest_record() -> None:
    day = 86_400.0
    records = [
        text("newest", timestamp=10 * day),
        text("one half-life", timestamp=9 * day),
        text("two half-lives", timestamp=8 * day),
        text("no timestamp"),
    ]
    config = replace(NOTHING, decay=DecayConfig(half_life_s=day))
    result = run_pipeline(records, config)
    assert [r.weight for r in result.records] == [1.0, 0.5, 0.25, 1.0]
    report = stage(result.stages, "decay")
    assert report.details["without_timestamp"] == 1
    assert report.details["min_weight"] == 0.25
    assert report.details["newest"] == 10 * day
    assert stage(run_pipeline(records, NOTHING).stages, "decay").details == {"skipped": 1.0}


# --- the whole pipeline --------------------------------------------------------------


def test_every_stage_reports_and_counts_chain() -> None:
    records, _, _ = planted(n_base=300, n_copies=30, seed=1)
    records += [text("The cat sat."), text("the cat  sat."), text("@@@ ### !!! ???"), text("\x00")]
    records = [
        replace(r, category=("a" if i % 3 else "b"), timestamp=float(i))
        for i, r in enumerate(records)
    ]
    config = PipelineConfig(
        balance=BalanceConfig(target={"a": 0.5, "b": 0.5}), decay=DecayConfig(half_life_s=100.0)
    )
    result = run_pipeline(records, config)
    names = [s.name for s in result.stages]
    assert names == ["cleaning", "quality", "exact_dedup", "near_dedup", "balance", "decay"]
    assert result.stages[0].records_in == len(records)
    for before, after in zip(result.stages, result.stages[1:], strict=False):
        assert after.records_in == before.records_out
    assert result.stages[-1].records_out == len(result.records)
    assert all(s.dropped >= 1 for s in result.stages[:5])
    for s in result.stages:  # the wire format is map<string, double>
        assert all(isinstance(float(v), float) for v in s.details.values())
    assert "near_dedup" in result.summary()


def test_the_pipeline_is_deterministic_for_a_seed() -> None:
    records, _, _ = planted(n_base=500, n_copies=50, seed=2)
    records = [replace(r, category=("a" if i % 4 else "b")) for i, r in enumerate(records)]
    config = PipelineConfig(balance=BalanceConfig(target={"a": 0.5, "b": 0.5}), seed=5)
    first, second = run_pipeline(records, config), run_pipeline(records, config)
    assert first.records == second.records
    assert [s.details for s in first.stages] == [s.details for s in second.stages]


def test_disabled_stages_pass_records_through() -> None:
    records = [text("dup"), text("dup"), text("\x00")]
    result = run_pipeline(
        records,
        PipelineConfig(
            cleaning=CleaningConfig(enabled=False),
            quality=QualityConfig(enabled=False),
            exact_dedup=ExactDedupConfig(enabled=False),
            near_dedup=NearDedupConfig(enabled=False),
            balance=BalanceConfig(enabled=False, target={"a": 1.0}),
            decay=DecayConfig(enabled=False, half_life_s=1.0),
        ),
    )
    assert result.records == records
    assert all(s.details == {"skipped": 1.0} for s in result.stages)


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="near-dup threshold"):
        NearDedupConfig(threshold=0.0)
    with pytest.raises(ValueError, match="half_life_s"):
        DecayConfig(half_life_s=0)
    with pytest.raises(ValueError, match="shares"):
        BalanceConfig(target={"a": 0.0})
