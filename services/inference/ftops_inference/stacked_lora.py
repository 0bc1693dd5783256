"""Mixed-adapter LoRA with a cost independent of how many adapters share a batch.

PEFT's mixed batches (``adapter_names=``) loop over the distinct adapters of a batch in
every LoRA layer: with 8 adapters that is 8 gathers, 16 small matmuls and 8 scatters per
layer and step, which on small models costs more than the base model itself. Here the A
and B matrices of every adapter in the model are stacked per layer (rank padded with
zeros, which adds exact zeros; B pre-scaled), so a batch costs two gathers and two batched
matmuls per layer whatever its mix (the idea behind S-LoRA/punica kernels, in plain torch).

PEFT still owns the adapters (injection, weights, deletion); its own LoRA contribution is
switched off during our forward passes and ours added by a forward hook on each LoRA
layer. Adapters this path cannot express exactly (DoRA, LoRA bias, embedding or
non-Linear LoRA layers, fan_in_fan_out) make ``supported`` false and the backend uses
PEFT's ``adapter_names`` path instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

BASE_SLOT = 0


class StackedLoRA:
    def __init__(self) -> None:
        self._slots: dict[str, int] = {}
        # Per LoRA layer: (A^T stacked [n+1, in, r], (s*B)^T stacked [n+1, r, out]).
        self._stacks: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: dict[Any, Any] = {}  # LoRA layer -> its forward hook
        self._index: torch.Tensor | None = None  # slot per row, set during a forward
        self.supported = False

    def rebuild(self, peft_model: Any) -> None:
        """Restack after an adapter was attached or removed (on the model thread)."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer

        adapters = list(peft_model.peft_config)
        self._slots = {name: slot for slot, name in enumerate(adapters, start=1)}
        self._stacks = {}
        layers: list[Any] = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        self.supported = bool(adapters) and all(
            _expressible(m, LoraLinear, adapters) for m in layers
        )
        # PEFT's own LoRA path is off while ours serves, on when it has to serve instead.
        for layer in layers:
            layer.enable_adapters(not self.supported)
        if not self.supported:
            return
        for layer in layers:
            names = [n for n in adapters if n in layer.lora_A]
            if not names:
                continue
            rank = max(layer.lora_A[n].weight.shape[0] for n in names)
            weight = layer.lora_A[names[0]].weight
            a = torch.zeros(
                len(adapters) + 1, layer.in_features, rank, dtype=weight.dtype, device=weight.device
            )
            b = torch.zeros(
                len(adapters) + 1,
                rank,
                layer.out_features,
                dtype=weight.dtype,
                device=weight.device,
            )
            for name in names:
                slot, r = self._slots[name], layer.lora_A[name].weight.shape[0]
                a[slot, :, :r] = layer.lora_A[name].weight.detach().t()
                b[slot, :r, :] = (layer.lora_B[name].weight.detach() * layer.scaling[name]).t()
            self._stacks[layer] = (a, b)
            if layer not in self._hooks:  # layers appear when an adapter targets new modules
                self._hooks[layer] = layer.register_forward_hook(self._add_delta)

    @contextlib.contextmanager
    def active(self, adapter_names: list[str], device: torch.device) -> Iterator[None]:
        """Rows' adapters for one forward pass (``"__base__"`` or unknown: no LoRA)."""
        slots = [self._slots.get(name, BASE_SLOT) for name in adapter_names]
        # Base rows only: no LoRA work at all.
        self._index = torch.tensor(slots, dtype=torch.long, device=device) if any(slots) else None
        try:
            yield
        finally:
            self._index = None

    def _add_delta(
        self, module: Any, args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        stacks = self._stacks.get(module)
        if self._index is None or stacks is None:
            return None
        a, b = stacks
        x = args[0]
        rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
        index = self._index
        delta = torch.bmm(torch.bmm(rows, a.index_select(0, index)), b.index_select(0, index))
        return output + delta.reshape(output.shape).to(output.dtype)


def _expressible(layer: Any, linear_type: Any, adapters: list[str]) -> bool:
    if not layer.lora_A and not getattr(layer, "lora_embedding_A", {}):
        return True  # an injected layer no adapter uses any more
    if not isinstance(layer, linear_type) or getattr(layer, "lora_embedding_A", {}):
        return False
    if getattr(layer, "fan_in_fan_out", False) or getattr(layer, "merged", False):
        return False
    for name in adapters:
        if name not in layer.lora_A:
            continue
        if layer.use_dora.get(name, False) or getattr(layer, "lora_bias", {}).get(name, False):
            return False
        if layer.lora_B[name].bias is not None:
            return False
    return True
