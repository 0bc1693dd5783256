"""Plain LoRA adapters served from per-layer stacks, without PEFT in the request path.

PEFT's mixed batches (``adapter_names=``) loop over the distinct adapters of a batch in
every LoRA layer (8 adapters: 8 gathers, 16 small matmuls, 8 scatters per layer and step),
and adding an adapter to a PeftModel walks every module of the model (tens of ms that stall
the batch). Here each targeted ``nn.Linear`` gets a forward hook and two stacks holding
every adapter's A^T and B^T in a slot, plus its scaling (rank padded with zeros, which adds
exact zeros; slot 0 is all zeros for rows without an adapter). A forward pass costs two
gathers and two batched matmuls per layer whatever the batch's mix (the idea behind
S-LoRA/punica kernels, in plain torch), and adding an adapter is a few tensor copies. The
stacks are the only copy in memory: an evicted adapter's state dict is read back from its
slot, bit for bit.

DoRA too, which PEFT cannot mix in a batch at all: its output is
base(x) + (m/|W + sBA| - 1) * (x W^T) + (m/|W + sBA|) * s x A^T B^T, and the column norms are
fixed once the adapter is loaded, so each slot stores (m/|W + sBA| - 1) per output feature
(zero for plain LoRA and for the base). Only what this computes exactly is accepted
(``unsupported`` says why not): linear layers, no LoRA bias, variants or extra trainable
modules. The backend serves the rest through PEFT.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

BASE_SLOT = 0
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight"
    r"|lora_magnitude_vector)$"
)
KIND_A, KIND_B, KIND_MAGNITUDE = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"
# LoraConfig fields that change what a LoRA layer computes beyond x A^T B^T * scaling.
_VARIANTS = (
    "lora_bias",
    "fan_in_fan_out",
    "use_qalora",
    "alora_invocation_tokens",
    "arrow_config",
    "layer_replication",
    "modules_to_save",
    "trainable_token_indices",
)


@dataclass
class _Layer:
    a: torch.Tensor  # [capacity, in, rank]
    b: torch.Tensor  # [capacity, rank, out]
    scale: torch.Tensor  # [capacity, 1, 1]
    hook: Any
    # DoRA: (m / |W + sBA| - 1) per output feature [capacity, 1, out], and m itself (for
    # reading the state dict back); None until a DoRA adapter targets this layer.
    dora: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    # Adapter -> (its rank here, its A key, its B key).
    users: dict[str, tuple[int, str, str]] = field(default_factory=dict)


class LoRAStack:
    def __init__(self, model: torch.nn.Module) -> None:
        self._linears = {
            name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
        }
        self._slots: dict[str, int] = {}
        self._targets: dict[str, list[str]] = {}  # adapter -> module names it targets
        self._configs: dict[str, Any] = {}
        self._layers: dict[str, _Layer] = {}
        self._capacity = 1  # slot 0 is the zero (base) slot
        self._index: torch.Tensor | None = None  # slot per row, during a forward pass

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    # -- adapters (model thread) -----------------------------------------------------

    def unsupported(self, config: Any, state: Mapping[str, torch.Tensor]) -> str | None:
        """Why this adapter cannot be stacked exactly; None when it can."""
        if str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1].upper() != "LORA":
            return f"peft_type {config.peft_type}"
        for attr in _VARIANTS:
            if getattr(config, attr, None):
                return f"{attr} is set"
        for key in state:
            match = _KEY.match(key)
            if match is None:
                return f"tensor {key} is not a LoRA A/B weight"
            if match["module"] not in self._linears:
                return f"module {match['module']} is not a linear layer"
        if getattr(config, "use_dora", False) and not any(
            key.endswith(KIND_MAGNITUDE) for key in state
        ):
            return "a DoRA adapter without magnitude vectors"
        return None

    def add(self, name: str, config: Any, state: Mapping[str, torch.Tensor]) -> None:
        pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        for key, tensor in state.items():
            match = _KEY.match(key)
            assert match is not None  # unsupported() was asked first
            pairs.setdefault(match["module"], {})[match["kind"]] = (key, tensor)
        slot = self._take_slot()
        self._slots[name] = slot
        self._targets[name] = list(pairs)
        self._configs[name] = config
        try:
            for module, pair in pairs.items():
                (key_a, a), (key_b, b) = pair[KIND_A], pair[KIND_B]  # [r, in], [out, r]
                rank = a.shape[0]
                layer = self._layer(module, rank)
                layer.users[name] = (rank, key_a, key_b)
                layer.a[slot, :, :rank] = a.t()
                layer.b[slot, :rank, :] = b.t()
                scaling = _scaling(config, module, rank)
                layer.scale[slot] = scaling
                if KIND_MAGNITUDE in pair:
                    self._set_dora(layer, module, slot, pair[KIND_MAGNITUDE][1], a, b, scaling)
        except BaseException:
            self.remove(name)
            raise

    def weights(self, name: str) -> tuple[Any, dict[str, torch.Tensor]]:
        """The adapter's config and state dict, read back from its slots (CPU copies)."""
        slot = self._slots[name]
        state: dict[str, torch.Tensor] = {}
        for module in self._targets[name]:
            layer = self._layers[module]
            rank, key_a, key_b = layer.users[name]
            state[key_a] = layer.a[slot, :, :rank].t().to("cpu", copy=True).contiguous()
            state[key_b] = layer.b[slot, :rank, :].t().to("cpu", copy=True).contiguous()
            if getattr(self._configs[name], "use_dora", False) and layer.magnitude is not None:
                key_m = key_a.removesuffix(KIND_A) + KIND_MAGNITUDE
                state[key_m] = layer.magnitude[slot].to("cpu", copy=True)
        return self._configs[name], state

    def _set_dora(
        self,
        layer: _Layer,
        module: str,
        slot: int,
        magnitude: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
    ) -> None:
        weight = self._linears[module].weight.detach().to(layer.a.dtype)
        lora = b.to(layer.a.device, layer.a.dtype) @ a.to(layer.a.device, layer.a.dtype)
        norm = torch.linalg.norm(weight + scaling * lora, dim=1)
        if layer.dora is None or layer.magnitude is None:
            layer.dora = layer.a.new_zeros(layer.a.shape[0], 1, weight.shape[0])
            layer.magnitude = layer.a.new_zeros(layer.a.shape[0], weight.shape[0])
        layer.magnitude[slot] = magnitude
        layer.dora[slot, 0] = magnitude.to(norm) / norm - 1

    def remove(self, name: str) -> None:
        slot = self._slots.pop(name)
        self._configs.pop(name, None)
        for module in self._targets.pop(name):
            layer = self._layers.get(module)
            if layer is None or name not in layer.users:
                continue  # add() failed before reaching this module
            del layer.users[name]
            if not layer.users:
                layer.hook.remove()
                del self._layers[module]
            else:
                layer.a[slot].zero_()
                layer.b[slot].zero_()
                layer.scale[slot].zero_()
                if layer.dora is not None and layer.magnitude is not None:
                    layer.dora[slot].zero_()
                    layer.magnitude[slot].zero_()
        if len(self._slots) + 1 <= self._capacity // 4:
            self._compact()

    # -- forward ---------------------------------------------------------------------

    @contextlib.contextmanager
    def active(self, adapter_names: list[str], device: torch.device) -> Iterator[None]:
        """Rows' adapters for one forward pass; names not stacked here get no LoRA."""
        slots = [self._slots.get(name, BASE_SLOT) for name in adapter_names]
        # Rows without a stacked adapter only: no LoRA work at all.
        self._index = torch.tensor(slots, dtype=torch.long, device=device) if any(slots) else None
        try:
            yield
        finally:
            self._index = None

    def _hook(self, module_name: str) -> Any:
        def add_delta(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            index = self._index
            if index is None:
                return None
            layer = self._layers[module_name]
            x = args[0]
            rows = x.reshape(x.shape[0], -1, x.shape[-1]).to(layer.a.dtype)
            low = torch.bmm(rows, layer.a.index_select(0, index))  # [batch, tokens, rank]
            low = low * layer.scale.index_select(0, index)
            delta = torch.bmm(low, layer.b.index_select(0, index))
            if layer.dora is not None:
                # DoRA rows: rescale x W^T and the LoRA term by m/|W + sBA| (zero elsewhere).
                dora = layer.dora.index_select(0, index)
                bias = module.bias if module.bias is not None else 0
                base = output.reshape(delta.shape).to(delta.dtype) - bias
                delta = dora * base + (1 + dora) * delta
            return output + delta.reshape(output.shape).to(output.dtype)

        return add_delta

    # -- storage ---------------------------------------------------------------------

    def _take_slot(self) -> int:
        used = set(self._slots.values())
        for slot in range(1, self._capacity):
            if slot not in used:
                return slot
        self._resize(max(2 * self._capacity, 4))
        return self._take_slot()

    def _layer(self, module: str, rank: int) -> _Layer:
        layer = self._layers.get(module)
        linear = self._linears[module]
        weight = linear.weight
        if layer is None:
            # Adapter weights keep their own dtype (PEFT's default keeps them in float32).
            dtype = (
                torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            )
            layer = _Layer(
                a=torch.zeros(
                    self._capacity, linear.in_features, rank, dtype=dtype, device=weight.device
                ),
                b=torch.zeros(
                    self._capacity, rank, linear.out_features, dtype=dtype, device=weight.device
                ),
                scale=torch.zeros(self._capacity, 1, 1, dtype=dtype, device=weight.device),
                hook=linear.register_forward_hook(self._hook(module)),
            )
            self._layers[module] = layer
        elif layer.a.shape[2] < rank:  # a larger rank than any before: pad the others
            grow = rank - layer.a.shape[2]
            layer.a = torch.nn.functional.pad(layer.a, (0, grow))
            layer.b = torch.nn.functional.pad(layer.b, (0, 0, 0, grow))
        return layer

    def _resize(self, capacity: int) -> None:
        for layer in self._layers.values():
            keep = min(capacity, layer.a.shape[0])
            a = layer.a.new_zeros(capacity, *layer.a.shape[1:])
            b = layer.b.new_zeros(capacity, *layer.b.shape[1:])
            scale = layer.scale.new_zeros(capacity, 1, 1)
            a[:keep], b[:keep], scale[:keep] = layer.a[:keep], layer.b[:keep], layer.scale[:keep]
            layer.a, layer.b, layer.scale = a, b, scale
            if layer.dora is not None and layer.magnitude is not None:
                dora = layer.dora.new_zeros(capacity, *layer.dora.shape[1:])
                magnitude = layer.magnitude.new_zeros(capacity, *layer.magnitude.shape[1:])
                dora[:keep], magnitude[:keep] = layer.dora[:keep], layer.magnitude[:keep]
                layer.dora, layer.magnitude = dora, magnitude
        self._capacity = capacity

    def _compact(self) -> None:
        """Few adapters left in a large stack: move them to the first slots, shrink."""
        order = sorted(self._slots, key=self._slots.__getitem__)
        moves = {self._slots[name]: new for new, name in enumerate(order, start=1)}
        for layer in self._layers.values():
            for old, new in moves.items():
                if old != new:
                    layer.a[new], layer.b[new] = layer.a[old], layer.b[old]
                    layer.scale[new] = layer.scale[old]
                    if layer.dora is not None and layer.magnitude is not None:
                        layer.dora[new], layer.magnitude[new] = (
                            layer.dora[old],
                            layer.magnitude[old],
                        )
            # Free slots stay all-zero in every layer: a later adapter relies on it.
            free = len(moves) + 1
            for tensor in (layer.a, layer.b, layer.scale, layer.dora, layer.magnitude):
                if tensor is not None:
                    tensor[free:].zero_()
        self._slots = {name: moves[slot] for name, slot in self._slots.items()}
        self._resize(max(4, 2 * (len(self._slots) + 1)))


def _scaling(config: Any, module: str, rank: int) -> float:
    """PEFT's scaling for this module: alpha (per pattern) over r, or sqrt(r) for rsLoRA."""
    alpha = config.lora_alpha
    for pattern, value in (getattr(config, "alpha_pattern", None) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)
