"""Plain LoRA adapters served from per-layer stacks, without PEFT in the request path.

PEFT's mixed batches (``adapter_names=``) loop over the distinct adapters of a batch in
every LoRA layer (8 adapters: 8 gathers, 16 small matmuls, 8 scatters per layer and step),
and adding an adapter to a PeftModel walks every module of the model (tens of ms that stall
the batch). Here each targeted ``nn.Linear`` gets a forward hook and, per rank class, two
stacks holding its adapters' A^T and B^T in a slot, plus their scaling (rank padded with
zeros up to the class's rank, which adds exact zeros). A forward pass costs two gathers and
two batched matmuls per layer and rank class of the batch's adapters, whatever the mix (the
idea behind S-LoRA/punica kernels, in plain torch), and adding an adapter is a few tensor
copies. The stacks are the only copy in memory: an evicted adapter's state dict is read back
from its slot, bit for bit.

Rank classes (powers of two) keep adapters from taxing each other: one stack padded to the
largest rank loaded made every batch pay for that rank (a rank-4096 adapter receiving no
traffic took a replica's capacity from ~100 to ~25 req/s, and kept it there after it was
unloaded). A batch computes only its own adapters' classes, rows without a stacked adapter
none, and a class's stacks go when its last adapter does.

DoRA too, which PEFT cannot mix in a batch at all: its output is
base(x) + (m/|W + sBA| - 1) * (x W^T) + (m/|W + sBA|) * s x A^T B^T, and the column norms are
fixed once the adapter is loaded, so each slot stores (m/|W + sBA| - 1) per output feature
(zero for plain LoRA and for the base). Only what this computes exactly is accepted
(``unsupported`` says why not): linear layers, no LoRA bias, variants or extra trainable
modules. The backend serves the rest through PEFT.

GPT-2-style ``Conv1D`` layers (weight stored [in, out]) are linear layers too: PEFT's LoRA
on them (``fan_in_fan_out``) computes the same x A^T B^T from the same [r, in] and [out, r]
matrices; only DoRA's column norms read their weight transposed.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# The smallest rank class: smaller ranks pad to it (a few zeros; fewer classes).
MIN_CLASS_RANK = 8
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight"
    r"|lora_magnitude_vector)$"
)
KIND_A, KIND_B, KIND_MAGNITUDE = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"
# LoraConfig fields that change what a LoRA layer computes beyond x A^T B^T * scaling.
# (fan_in_fan_out does not: PEFT sets it per layer, true on Conv1D, false on Linear.)
_VARIANTS = (
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "arrow_config",
    "layer_replication",
    "modules_to_save",
    "trainable_token_indices",
)


@dataclass
class _Bucket:
    """One layer's adapters of one rank class: their A^T and B^T padded to the class's
    rank, one slot per adapter of the class (the class's slot, the same in every layer)."""

    a: torch.Tensor  # [capacity, in, rank]
    b: torch.Tensor  # [capacity, rank, out]
    scale: torch.Tensor  # [capacity, 1, 1]
    # DoRA: (m / |W + sBA| - 1) per output feature [capacity, 1, out], and m itself (for
    # reading the state dict back); None until a DoRA adapter of the class targets it.
    dora: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    users: int = 0


@dataclass
class _Layer:
    hook: Any
    buckets: dict[int, _Bucket] = field(default_factory=dict)  # rank class -> bucket
    # Adapter -> (its rank here, its A key, its B key).
    users: dict[str, tuple[int, str, str]] = field(default_factory=dict)


@dataclass
class _RankClass:
    """The adapters whose rank (in some layer) rounds up to this class's rank: each holds
    one slot, valid in every layer's bucket of the class. Free slots are zero everywhere."""

    slots: dict[str, int] = field(default_factory=dict)
    capacity: int = 0


@dataclass(frozen=True)
class _Group:
    """The rows of one forward pass whose adapters are in one rank class."""

    rank: int
    rows: torch.Tensor | None  # row indices; None = every row of the batch
    slots: torch.Tensor  # each row's slot in the class


def rank_class(rank: int) -> int:
    """The padded rank an adapter of ``rank`` is stacked at: the next power of two, at
    least MIN_CLASS_RANK. It depends on the adapter's own rank only, so what it costs a
    batch (at most twice its rank) does not depend on what else is loaded."""
    return max(MIN_CLASS_RANK, 1 << max(rank - 1, 0).bit_length())


class LoRAStack:
    def __init__(self, model: torch.nn.Module) -> None:
        from transformers.pytorch_utils import Conv1D

        self._linears = {
            name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)
        }
        self._classes: dict[int, _RankClass] = {}
        self._targets: dict[str, list[str]] = {}  # adapter -> module names it targets
        self._configs: dict[str, Any] = {}
        self._layers: dict[str, _Layer] = {}
        self._plan: list[_Group] = []  # during a forward pass

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __len__(self) -> int:
        return len(self._targets)

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
        self._targets[name] = list(pairs)
        self._configs[name] = config
        try:
            for module, pair in pairs.items():
                (key_a, a), (key_b, b) = pair[KIND_A], pair[KIND_B]  # [r, in], [out, r]
                rank = a.shape[0]
                cls = rank_class(rank)
                slot = self._take_slot(cls, name)
                layer = self._layer(module)
                bucket = self._bucket(layer, module, cls)
                layer.users[name] = (rank, key_a, key_b)
                bucket.users += 1
                bucket.a[slot, :, :rank] = a.t()
                bucket.b[slot, :rank, :] = b.t()
                scaling = _scaling(config, module, rank)
                bucket.scale[slot] = scaling
                if KIND_MAGNITUDE in pair:
                    self._set_dora(bucket, module, slot, pair[KIND_MAGNITUDE][1], a, b, scaling)
        except BaseException:
            self.remove(name)
            raise

    def weights(self, name: str) -> tuple[Any, dict[str, torch.Tensor]]:
        """The adapter's config and state dict, read back from its slots (CPU copies)."""
        state: dict[str, torch.Tensor] = {}
        for module in self._targets[name]:
            layer = self._layers[module]
            rank, key_a, key_b = layer.users[name]
            cls = rank_class(rank)
            bucket, slot = layer.buckets[cls], self._classes[cls].slots[name]
            state[key_a] = bucket.a[slot, :, :rank].t().to("cpu", copy=True).contiguous()
            state[key_b] = bucket.b[slot, :rank, :].t().to("cpu", copy=True).contiguous()
            if getattr(self._configs[name], "use_dora", False) and bucket.magnitude is not None:
                key_m = key_a.removesuffix(KIND_A) + KIND_MAGNITUDE
                state[key_m] = bucket.magnitude[slot].to("cpu", copy=True)
        return self._configs[name], state

    def _set_dora(
        self,
        bucket: _Bucket,
        module: str,
        slot: int,
        magnitude: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
    ) -> None:
        weight = _weight(self._linears[module]).detach().to(bucket.a.dtype)
        lora = b.to(bucket.a.device, bucket.a.dtype) @ a.to(bucket.a.device, bucket.a.dtype)
        norm = torch.linalg.norm(weight + scaling * lora, dim=1)
        if bucket.dora is None or bucket.magnitude is None:
            bucket.dora = bucket.a.new_zeros(bucket.a.shape[0], 1, weight.shape[0])
            bucket.magnitude = bucket.a.new_zeros(bucket.a.shape[0], weight.shape[0])
        bucket.magnitude[slot] = magnitude
        bucket.dora[slot, 0] = magnitude.to(norm) / norm - 1

    def remove(self, name: str) -> None:
        self._configs.pop(name, None)
        for module in self._targets.pop(name):
            layer = self._layers.get(module)
            if layer is None or name not in layer.users:
                continue  # add() failed before reaching this module
            cls = rank_class(layer.users.pop(name)[0])
            bucket = layer.buckets[cls]
            bucket.users -= 1
            if not bucket.users:
                del layer.buckets[cls]
            else:
                slot = self._classes[cls].slots[name]
                for tensor in (bucket.a, bucket.b, bucket.scale, bucket.dora, bucket.magnitude):
                    if tensor is not None:
                        tensor[slot].zero_()
            if not layer.users:
                layer.hook.remove()
                del self._layers[module]
        for cls, rank_cls in list(self._classes.items()):
            if rank_cls.slots.pop(name, None) is None:
                continue
            if not rank_cls.slots:
                # The class's buckets went with their last users: nothing stays padded.
                del self._classes[cls]
            elif len(rank_cls.slots) <= rank_cls.capacity // 4:
                self._compact(cls)

    def stacked_ranks(self) -> dict[str, list[int]]:
        """Per stacked layer, the ranks of its buckets (what memory holds)."""
        return {module: sorted(layer.buckets) for module, layer in self._layers.items()}

    # -- forward ---------------------------------------------------------------------

    @contextlib.contextmanager
    def active(self, adapter_names: list[str], device: torch.device) -> Iterator[None]:
        """Rows' adapters for one forward pass; names not stacked here get no LoRA. Each
        layer computes only the rank classes of this batch's adapters, and only for the
        rows in them: other adapters loaded beside them cost the batch nothing."""
        members: dict[int, tuple[list[int], list[int]]] = {}  # class -> (rows, slots)
        for row, name in enumerate(adapter_names):
            if name not in self._targets:
                continue
            for cls, rank_cls in self._classes.items():
                slot = rank_cls.slots.get(name)
                if slot is not None:
                    rows, slots = members.setdefault(cls, ([], []))
                    rows.append(row)
                    slots.append(slot)
        self._plan = [
            _Group(
                cls,
                None
                if len(rows) == len(adapter_names)
                else torch.tensor(rows, dtype=torch.long, device=device),
                torch.tensor(slots, dtype=torch.long, device=device),
            )
            for cls, (rows, slots) in members.items()
        ]
        try:
            yield
        finally:
            self._plan = []

    def _hook(self, module_name: str) -> Any:
        def add_delta(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            plan = self._plan
            if not plan:
                return None
            layer = self._layers[module_name]
            x = args[0]
            rows = x.reshape(x.shape[0], -1, x.shape[-1])
            total: torch.Tensor | None = None
            for group in plan:
                bucket = layer.buckets.get(group.rank)
                if bucket is None:  # none of the group's adapters targets this layer
                    continue
                delta = _bucket_delta(module, bucket, group, rows, output)
                if group.rows is not None:  # scatter the group's rows into the batch
                    full = delta.new_zeros(rows.shape[0], *delta.shape[1:])
                    delta = full.index_add_(0, group.rows, delta)
                total = delta if total is None else total + delta
            if total is None:
                return None
            return output + total.reshape(output.shape).to(output.dtype)

        return add_delta

    # -- storage ---------------------------------------------------------------------

    def _take_slot(self, cls: int, name: str) -> int:
        """``name``'s slot in rank class ``cls`` (taken once, shared by its layers)."""
        rank_cls = self._classes.setdefault(cls, _RankClass())
        slot = rank_cls.slots.get(name)
        if slot is not None:
            return slot
        used = set(rank_cls.slots.values())
        free = next((s for s in range(rank_cls.capacity) if s not in used), None)
        if free is None:
            free = rank_cls.capacity
            self._resize(cls, max(2 * rank_cls.capacity, 1))
        rank_cls.slots[name] = free
        return free

    def _layer(self, module: str) -> _Layer:
        layer = self._layers.get(module)
        if layer is None:
            linear = self._linears[module]
            layer = _Layer(hook=linear.register_forward_hook(self._hook(module)))
            self._layers[module] = layer
        return layer

    def _bucket(self, layer: _Layer, module: str, cls: int) -> _Bucket:
        bucket = layer.buckets.get(cls)
        if bucket is None:
            linear = self._linears[module]
            weight = linear.weight
            in_features, out_features = _features(linear)
            # Adapter weights keep their own dtype (PEFT's default keeps them in float32).
            dtype = (
                torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            )
            capacity = self._classes[cls].capacity
            bucket = _Bucket(
                a=torch.zeros(capacity, in_features, cls, dtype=dtype, device=weight.device),
                b=torch.zeros(capacity, cls, out_features, dtype=dtype, device=weight.device),
                scale=torch.zeros(capacity, 1, 1, dtype=dtype, device=weight.device),
            )
            layer.buckets[cls] = bucket
        return bucket

    def _resize(self, cls: int, capacity: int) -> None:
        for layer in self._layers.values():
            bucket = layer.buckets.get(cls)
            if bucket is None:
                continue
            keep = min(capacity, bucket.a.shape[0])
            for attr in ("a", "b", "scale", "dora", "magnitude"):
                old = getattr(bucket, attr)
                if old is not None:
                    new = old.new_zeros(capacity, *old.shape[1:])
                    new[:keep] = old[:keep]
                    setattr(bucket, attr, new)
        self._classes[cls].capacity = capacity

    def _compact(self, cls: int) -> None:
        """Few adapters left in a large class: move them to the first slots, shrink."""
        rank_cls = self._classes[cls]
        order = sorted(rank_cls.slots, key=rank_cls.slots.__getitem__)
        moves = {rank_cls.slots[name]: new for new, name in enumerate(order)}
        for layer in self._layers.values():
            bucket = layer.buckets.get(cls)
            if bucket is None:
                continue
            for tensor in (bucket.a, bucket.b, bucket.scale, bucket.dora, bucket.magnitude):
                if tensor is None:
                    continue
                for old, new in moves.items():
                    if old != new:
                        tensor[new] = tensor[old]
                # Free slots stay all-zero in every layer: a later adapter relies on it.
                tensor[len(moves) :].zero_()
        rank_cls.slots = {name: moves[slot] for name, slot in rank_cls.slots.items()}
        self._resize(cls, 2 * len(rank_cls.slots))


def _bucket_delta(
    module: Any, bucket: _Bucket, group: _Group, rows: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    """The LoRA (or DoRA) term of one rank class for its rows: [group rows, tokens, out]."""
    x = rows if group.rows is None else rows.index_select(0, group.rows)
    x = x.to(bucket.a.dtype)
    low = torch.bmm(x, bucket.a.index_select(0, group.slots))  # [rows, tokens, rank]
    low = low * bucket.scale.index_select(0, group.slots)
    delta = torch.bmm(low, bucket.b.index_select(0, group.slots))
    if bucket.dora is not None:
        # DoRA rows: rescale x W^T and the LoRA term by m/|W + sBA| (zero elsewhere).
        dora = bucket.dora.index_select(0, group.slots)
        out = output.reshape(rows.shape[0], -1, output.shape[-1])
        if group.rows is not None:
            out = out.index_select(0, group.rows)
        bias = module.bias if module.bias is not None else 0
        base = out.to(delta.dtype) - bias
        delta = dora * base + (1 + dora) * delta
    return delta


def _features(layer: Any) -> tuple[int, int]:
    """(in, out) features of a Linear or a Conv1D (whose weight is [in, out])."""
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    return int(layer.nx), int(layer.nf)


def _weight(layer: Any) -> torch.Tensor:
    """The layer's weight as nn.Linear holds it: [out, in]."""
    weight: torch.Tensor = layer.weight
    return weight if isinstance(layer, torch.nn.Linear) else weight.t()


def _scaling(config: Any, module: str, rank: int) -> float:
    """PEFT's scaling for this module: alpha (per pattern) over r, or sqrt(r) for rsLoRA."""
    alpha = config.lora_alpha
    for pattern, value in (getattr(config, "alpha_pattern", None) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)
