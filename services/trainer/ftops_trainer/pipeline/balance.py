"""Category balancing by deterministic downsampling.

The largest total that no present category is short of is kept: with target shares s_c
and counts n_c, N = min(n_c / s_c), and category c keeps round(s_c * N) records drawn
with a seeded sample, in their original order. Nothing is ever upsampled.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping

from ftops_trainer.dataset import Record


def balance(
    records: list[Record], target: Mapping[str, float], seed: int
) -> tuple[list[Record], dict[str, float]]:
    counts = Counter(r.category for r in records)
    present = {c: share for c, share in target.items() if counts[c] > 0}
    details = {f"before.{c}": float(n) for c, n in sorted(counts.items())}
    details["missing"] = sum(1 for c in target if counts[c] == 0)
    details["unlisted"] = sum(n for c, n in counts.items() if c not in target)
    if not present:
        return records, details
    total = sum(present.values())
    shares = {c: share / total for c, share in present.items()}
    n = min(counts[c] / shares[c] for c in shares)
    quota = {c: min(counts[c], round(shares[c] * n)) for c in shares}
    by_category: dict[str, list[int]] = {c: [] for c in shares}
    for i, record in enumerate(records):
        if record.category in by_category:
            by_category[record.category].append(i)
    drop: set[int] = set()
    for c, indices in by_category.items():
        # Seeded per category, so one category's draw does not depend on the others.
        chosen = set(random.Random(f"{seed}:{c}").sample(indices, quota[c]))
        drop.update(i for i in indices if i not in chosen)
    kept = [r for i, r in enumerate(records) if i not in drop]
    after = Counter(r.category for r in kept)
    return kept, details | {f"after.{c}": float(n) for c, n in sorted(after.items())}
