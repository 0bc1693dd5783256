"""Data pipeline deduplication: throughput of exact + near-duplicate removal on short
synthetic records, and recall of planted near-duplicates at the default threshold.

Baselines in the same run: exact dedup alone (the floor), and datasketch used directly
(a MinHash per record fed through ``update``, or ``MinHash.generator`` with
``update_batch``, then ``MinHashLSH`` query + insert), on a subset because it is slow.
Rows are per-record times (one sample a repeat), so "per s" is records a second.

    .venv/bin/python -m bench.data_pipeline [--quick] [--records N]
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections.abc import Callable

from datasketch import MinHash, MinHashLSH

from bench.report import Report
from ftops_trainer.dataset import Record
from ftops_trainer.pipeline import (
    CleaningConfig,
    NearDedupConfig,
    PipelineConfig,
    QualityConfig,
    run_pipeline,
)

NGRAM = 5
THRESHOLD = NearDedupConfig().threshold
TARGET_RATE = 20_000.0
TARGET_RECALL = 0.95
DEDUP_ONLY = PipelineConfig(
    cleaning=CleaningConfig(enabled=False), quality=QualityConfig(enabled=False)
)
EXACT_ONLY = PipelineConfig(
    cleaning=CleaningConfig(enabled=False),
    quality=QualityConfig(enabled=False),
    near_dedup=NearDedupConfig(enabled=False),
)
_WORD = re.compile(r"\w+")


def _grams(text: str) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.casefold())
    if len(words) < NGRAM:
        return {(w,) for w in words}
    return {tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)}


def _jaccard(a: str, b: str) -> float:
    x, y = _grams(a), _grams(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def _edit(words: list[str], rng: random.Random, vocab: list[str]) -> list[str]:
    """A light edit: some keep Jaccard >= 0.8 (near-duplicates), a middle substitution
    or deletion usually does not (those are rightly kept)."""
    out = list(words)
    kind = rng.randrange(6)
    if kind == 0:
        out.append(rng.choice(vocab))
    elif kind == 1:
        out.insert(0, rng.choice(vocab))
    elif kind == 2:
        out[-1] = rng.choice(vocab)
    elif kind == 3:
        out = [w.capitalize() if rng.random() < 0.3 else w for w in out]
        out[rng.randrange(len(out))] += ","
    elif kind == 4:
        out[rng.randrange(len(out))] = rng.choice(vocab)
    else:
        del out[rng.randrange(len(out))]
    return out


def synthetic(n: int, seed: int = 0) -> tuple[list[Record], dict[int, float], set[int]]:
    """Short records (8-30 words); ~6% are light edits of a recent record (planted
    near-duplicates, mapped to their true Jaccard similarity) and ~2% duplicates up to
    case and spacing (their indices)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    texts: list[str] = []
    planted: dict[int, float] = {}
    exact: set[int] = set()
    for i in range(n):
        roll = rng.random()
        if i > 10 and roll < 0.06:
            source = texts[rng.randrange(max(0, i - 1000), i)]
            texts.append(" ".join(_edit(source.split(), rng, vocab)))
            planted[i] = _jaccard(source, texts[-1])
        elif i > 10 and roll < 0.08:
            exact.add(i)
            texts.append("  " + texts[rng.randrange(max(0, i - 1000), i)].upper())
        else:
            texts.append(" ".join(rng.choices(vocab, k=rng.randint(8, 30))))
    return [Record(completion=t) for t in texts], planted, exact


def _shingle_bytes(text: str) -> list[bytes]:
    return [" ".join(g).encode() for g in _grams(text)]


def datasketch_dedup(records: list[Record], bulk: bool) -> list[Record]:
    """datasketch as its docs show it: MinHashLSH with its default (optimal) bands; a
    candidate counts when the MinHash estimate reaches the threshold."""
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    shingled = [_shingle_bytes(r.completion) for r in records]
    if bulk:
        sketches = list(MinHash.generator(shingled, num_perm=128))
    else:
        sketches = []
        for grams in shingled:
            m = MinHash(num_perm=128)
            for g in grams:
                m.update(g)
            sketches.append(m)
    kept: list[Record] = []
    seen: set[bytes] = set()
    for i, (record, sketch) in enumerate(zip(records, sketches, strict=True)):
        key = " ".join(record.completion.casefold().split()).encode()
        if key in seen:
            continue
        seen.add(key)
        if any(sketch.jaccard(sketches[j]) >= THRESHOLD for j in lsh.query(sketch)):
            continue
        lsh.insert(i, sketch, check_duplication=False)
        kept.append(record)
    return kept


def _time(fn: Callable[[], list[Record]], repeats: int) -> tuple[list[float], list[Record]]:
    samples: list[float] = []
    kept: list[Record] = []
    for _ in range(repeats):
        started = time.perf_counter()
        kept = fn()
        samples.append(time.perf_counter() - started)
    return samples, kept


def _caught(records: list[Record], indices: list[int], kept: list[Record]) -> int:
    alive = {id(r) for r in kept}
    return sum(1 for i in indices if id(records[i]) not in alive)


def _recall(records: list[Record], planted: dict[int, float], kept: list[Record]) -> float:
    near = [i for i, sim in planted.items() if sim >= THRESHOLD]
    return _caught(records, near, kept) / len(near) if near else float("nan")


def _per_record(samples: list[float], count: int) -> list[float]:
    return [s / count for s in samples]


def main(n: int = 100_000, subset: int = 10_000, repeats: int = 3) -> None:
    records, planted, exact = synthetic(n)
    report = Report(
        "data_pipeline",
        f"exact + near-dup dedup of {n:,} short records (8-30 words), one core",
        f"exact dedup only; datasketch MinHash + MinHashLSH used directly ({subset:,} records)",
    )
    exact_s, _ = _time(lambda: run_pipeline(records, EXACT_ONLY).records, repeats)
    ours_s, kept = _time(lambda: run_pipeline(records, DEDUP_ONLY).records, repeats)
    head = records[:subset]
    naive_s, _ = _time(lambda: datasketch_dedup(head, bulk=False), 1)
    bulk_s, bulk_kept = _time(lambda: datasketch_dedup(head, bulk=True), 1)
    report.add(f"exact dedup only ({n:,})", _per_record(exact_s, n))
    ours = report.add(f"ftops exact + near-dup ({n:,})", _per_record(ours_s, n))
    report.add(f"datasketch update()+LSH ({subset:,})", _per_record(naive_s, subset))
    bulk = report.add(f"datasketch generator+LSH ({subset:,})", _per_record(bulk_s, subset))

    near = [i for i, sim in planted.items() if sim >= THRESHOLD]
    below = [i for i, sim in planted.items() if sim < THRESHOLD]
    originals = sorted(set(range(n)) - set(planted) - exact)
    recall = _recall(records, planted, kept)
    head_recall = _recall(head, {i: s for i, s in planted.items() if i < subset}, bulk_kept)
    met = {True: "met", False: "MISSED"}
    report.notes["records/s exact + near-dup"] = (
        f"{ours.per_s:,.0f} (target >= {TARGET_RATE:,.0f}: {met[ours.per_s >= TARGET_RATE]})"
    )
    report.notes["speed-up vs datasketch generator+LSH"] = f"{ours.per_s / bulk.per_s:.1f}x"
    report.notes[f"recall, planted near-dups with Jaccard >= {THRESHOLD}"] = (
        f"{recall:.3f} of {len(near)} (target >= {TARGET_RECALL}: {met[recall >= TARGET_RECALL]})"
    )
    report.notes[f"recall, datasketch default bands (first {subset:,})"] = f"{head_recall:.3f}"
    report.notes["planted edits below the threshold dropped (rightly kept: low)"] = (
        f"{_caught(records, below, kept)}/{len(below)}"
    )
    report.notes["case/space duplicates dropped"] = (
        f"{_caught(records, sorted(exact), kept)}/{len(exact)}"
    )
    report.notes["unrelated records dropped (false positives)"] = (
        f"{_caught(records, originals, kept)}/{len(originals)}"
    )
    report.write()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k records, one repeat")
    parser.add_argument("--records", type=int, default=0, help="records (default 100k)")
    args = parser.parse_args()
    count = args.records or (20_000 if args.quick else 100_000)
    main(count, subset=min(count, 2_000 if args.quick else 10_000), repeats=1 if args.quick else 3)
