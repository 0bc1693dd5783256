"""Regularisation towards the parent adapter, against forgetting what the lineage learnt.

The anchor is the trainable weights as training starts: the parent's when continuing
(for ``partial`` without a parent, the base layers themselves, i.e. L2-SP). ``l2`` pulls
every weight back equally; ``ewc`` weights each by its diagonal Fisher information,
estimated on the parent from a few examples (replay or held-out records), so weights
that mattered for the old data move least (Kirkpatrick et al., 2017).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Named = Sequence[tuple[str, torch.nn.Parameter]]


class Regularizer:
    def __init__(
        self,
        kind: str,
        weight: float,
        trainable: Named,
        fisher: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if kind not in ("l2", "ewc"):
            raise ValueError(f"unknown regularization {kind!r}")
        if kind == "ewc" and fisher is None:
            raise ValueError("ewc needs a Fisher estimate")
        self.kind = kind
        self.weight = weight
        self.anchor = {name: p.detach().clone() for name, p in trainable}
        self.fisher = fisher

    def penalty(self, trainable: Named) -> torch.Tensor:
        """``weight * sum((w - w0)^2)`` for l2; ``weight/2 * sum(F * (w - w0)^2)`` for ewc."""
        terms = []
        for name, p in trainable:
            sq = (p - self.anchor[name]).pow(2)
            if self.fisher is not None:
                terms.append(0.5 * (self.fisher[name] * sq).sum())
            else:
                terms.append(sq.sum())
        return self.weight * torch.stack(terms).sum()


def estimate_fisher(
    trainable: Named, n_examples: int, loss_of: Callable[[int], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: each squared gradient summed over examples, normalised.

    ``loss_of(i)`` is example ``i``'s loss under the current (parent) weights; one example
    a backward pass, since the square of a batch gradient is not the mean of squares.
    """
    fisher = {name: torch.zeros_like(p) for name, p in trainable}
    for i in range(n_examples):
        for _, p in trainable:
            p.grad = None
        torch.autograd.backward(loss_of(i))
        for name, p in trainable:
            if p.grad is not None:
                fisher[name] += p.grad.detach().pow(2)
    for _, p in trainable:
        p.grad = None
    # Scaled to mean 1, so regularization_weight means about the same for ewc as for l2.
    mean = torch.cat([f.reshape(-1) for f in fisher.values()]).mean()
    scale = 1.0 / float(mean) if float(mean) > 0 else 0.0
    return {name: f * scale for name, f in fisher.items()}
