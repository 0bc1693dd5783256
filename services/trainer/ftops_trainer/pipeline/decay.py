"""Time-decay sample weights: recent data counts more, old data still counts."""

from __future__ import annotations

from dataclasses import replace

from ftops_trainer.dataset import Record


def decay(records: list[Record], half_life_s: float) -> tuple[list[Record], dict[str, float]]:
    """Multiply each weight by 0.5 ** (age / half_life_s), the age counted from the
    newest timestamp in the set (not the wall clock, so re-running a job on the same
    data gives the same weights). Records without a timestamp are left as they are."""
    stamps = [r.timestamp for r in records if r.timestamp is not None]
    details = {"half_life_s": half_life_s, "without_timestamp": len(records) - len(stamps)}
    if not stamps:
        return records, details
    newest = max(stamps)
    out = [
        r
        if r.timestamp is None
        else replace(r, weight=r.weight * 0.5 ** ((newest - r.timestamp) / half_life_s))
        for r in records
    ]
    weights = [r.weight for r in out]
    return out, {
        **details,
        "newest": newest,
        "min_weight": round(min(weights), 6),
        "mean_weight": round(sum(weights) / len(weights), 6),
    }
