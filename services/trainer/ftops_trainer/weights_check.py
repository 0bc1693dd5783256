"""A trained adapter's weights are checked before anything is uploaded or registered: a
diverged run (NaN, Inf, or values of absurd magnitude) must fail its job, not become a
version that replicas refuse (or, before they checked, served as nonsense)."""

from __future__ import annotations

import math
from pathlib import Path

from safetensors import safe_open

from ftops_runtime.errors import FailedPrecondition

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The inference replicas' default max_adapter_weight: what they would refuse to load.
MAX_ABS_WEIGHT = 1e4


def check_trained_weights(adapter_dir: Path, *, max_abs_weight: float = MAX_ABS_WEIGHT) -> None:
    """Every value finite and within ``max_abs_weight``; the first offending tensor is
    named. One tensor in memory at a time."""
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            tensor = handle.get_tensor(key)
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            # max() propagates NaN, and Inf is its own maximum: one pass finds both.
            peak = float(tensor.abs().max())
            if not math.isfinite(peak):
                raise FailedPrecondition(
                    f"training diverged: tensor {key!r} holds non-finite values (NaN or Inf); "
                    "nothing was registered (try a lower learning rate)"
                )
            if peak > max_abs_weight:
                raise FailedPrecondition(
                    f"training diverged: tensor {key!r} holds values up to {peak:.3g}, beyond "
                    f"{max_abs_weight:g}; nothing was registered (try a lower learning rate)"
                )
