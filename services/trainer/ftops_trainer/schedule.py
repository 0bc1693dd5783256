"""What each optimizer step trains on and at which learning rate: pure functions of the
step and the parameters, so a resumed run replays exactly the steps it missed."""

from __future__ import annotations

import math
import random

LR_SCHEDULERS = ("cosine", "linear", "constant")


def plan_batches(n_examples: int, batch_size: int, num_epochs: int, seed: int) -> list[list[int]]:
    """Every step's example indices, up front: a seeded shuffle per epoch."""
    rng = random.Random(seed)
    schedule: list[list[int]] = []
    for _ in range(num_epochs):
        order = list(range(n_examples))
        rng.shuffle(order)
        schedule += [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]
    return schedule


def resolve_warmup(total: int, warmup_steps: int, warmup_ratio: float) -> int:
    """Warmup length in steps: an explicit count wins over the ratio."""
    steps = warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total)
    return max(0, min(steps, total))


def lr_factor(step: int, *, total: int, warmup: int, kind: str) -> float:
    """Multiplier on the base learning rate for the 0-based optimizer step ``step``.

    Warmup ramps linearly to 1 over ``warmup`` steps (the first step already moves, unlike
    a ramp from 0); then cosine/linear decay towards 0 at ``total``, or a constant.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr_scheduler {kind!r} (one of {', '.join(LR_SCHEDULERS)})")


def split(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` cut into ``parts`` contiguous, near-equal chunks (some may be empty)."""
    size, extra = divmod(len(indices), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(indices[start:end])
        start = end
    return out
