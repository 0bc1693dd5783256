"""Fully sharded data parallel (FSDP2) for the frozen base model.

In adapter training the base model is frozen and large while the trainable tensors are
small. Sharding the base across the workers (each keeps 1/N of every weight and gathers a
layer's weights only while that layer runs) lets a base that does not fit one worker's
memory train; the trainable tensors are left out of the sharding (``ignored_params``), so
they stay ordinary replicated tensors whose gradients the loop sums exactly as in the
replicated (DDP) mode. The adapter is therefore the same in both modes.

Every worker must run the same number of forward and backward passes (the gathers are
collectives): the loop pads a worker whose shard of a step is empty with a zero-weight pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _layer_classes(model: nn.Module) -> set[str]:
    """Class names of the transformer blocks: Hugging Face models list them in
    ``_no_split_modules`` (the units that must stay whole on one device)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def shard_frozen_base(
    model: nn.Module, trainable: Sequence[torch.Tensor], world_size: int, device_type: str = "cpu"
) -> int:
    """Shard ``model``'s frozen weights over the default process group (all ``world_size``
    ranks, every node), one unit per transformer block plus the rest at the root. The
    mesh's device type is the workers' ("cuda" under NCCL: each rank's current device).
    Returns the number of sharded blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    ignored = {p for p in model.parameters() if any(p is t for t in trainable)}
    classes = _layer_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return len(blocks)
