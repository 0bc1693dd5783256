"""Exact and near-duplicate removal; the first occurrence is kept."""

from __future__ import annotations

import numpy as np

from ftops_trainer.dataset import Record
from ftops_trainer.pipeline.config import NearDedupConfig
from ftops_trainer.pipeline.minhash import band_keys, band_params, shingles, signatures
from ftops_trainer.pipeline.text import exact_key, near_dup_text

# A bucket holding this many kept records takes no more: it only happens on templated
# data, and without a cap each new record would be checked against all of them.
MAX_BUCKET = 64
# Candidates verified a record, the ones sharing the most bands first.
MAX_VERIFY = 8
# Records a signature chunk (bounds the memory of the signatures in flight).
_RECORDS_PER_CHUNK = 8192


def exact_dedup(records: list[Record]) -> tuple[list[Record], dict[str, float]]:
    seen: set[bytes] = set()
    kept: list[Record] = []
    for record in records:
        key = exact_key(record)
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept, {}


def near_dedup(
    records: list[Record], config: NearDedupConfig, seed: int
) -> tuple[list[Record], dict[str, float]]:
    values, offsets = shingles([near_dup_text(r) for r in records], config.ngram)
    bands, rows = band_params(config.threshold, config.num_perm, config.recall_at_threshold)
    keys = np.empty((len(records), bands), dtype=np.uint64)
    for lo in range(0, len(records), _RECORDS_PER_CHUNK):
        hi = min(lo + _RECORDS_PER_CHUNK, len(records))
        part = offsets[lo : hi + 1]
        sig = signatures(values[part[0] : part[-1]], part - part[0], config.num_perm, seed)
        keys[lo:hi] = band_keys(sig, bands, rows, seed)
    # Only a record sharing some band key with another can be, or have, a candidate;
    # the rest (nearly all on typical data) are kept without entering the index.
    lonely = np.ones(len(records), dtype=bool)
    for band in range(bands):
        _, inverse, counts = np.unique(keys[:, band], return_inverse=True, return_counts=True)
        lonely &= counts[inverse] == 1
    bounds: list[int] = offsets.tolist()
    sets: dict[int, set[int]] = {}

    def shingle_set(i: int) -> set[int]:
        if i not in sets:
            sets[i] = set(values[bounds[i] : bounds[i + 1]].tolist())
        return sets[i]

    def similar(i: int, j: int) -> bool:
        a, b = shingle_set(i), shingle_set(j)
        common = len(a & b)
        return common >= config.threshold * (len(a) + len(b) - common)

    tables: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    drop: set[int] = set()
    verified = 0
    for i in np.flatnonzero(~lonely).tolist():
        if bounds[i] == bounds[i + 1]:  # no words: only exact dedup applies
            continue
        row: list[int] = keys[i].tolist()
        shared: dict[int, int] = {}
        for table, key in zip(tables, row, strict=True):
            for j in table.get(key, ()):
                shared[j] = shared.get(j, 0) + 1
        if shared:
            ranked = sorted(shared, key=shared.__getitem__, reverse=True)[:MAX_VERIFY]
            verified += len(ranked)
            if any(similar(i, j) for j in ranked):
                drop.add(i)
                sets.pop(i, None)  # never compared again
                continue
        for table, key in zip(tables, row, strict=True):
            bucket = table.setdefault(key, [])
            if len(bucket) < MAX_BUCKET:
                bucket.append(i)
    kept = [r for i, r in enumerate(records) if i not in drop]
    return kept, {
        "threshold": config.threshold,
        "num_perm": config.num_perm,
        "bands": bands,
        "rows": rows,
        "candidates_verified": verified,
    }
