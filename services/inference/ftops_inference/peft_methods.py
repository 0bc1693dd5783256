"""AdaLoRA, IA3, prompt tuning, prefix tuning and partial fine-tunes on the HF backend,
beside the LoRA adapters and the base in the same continuous batch.

PEFT serves these methods one adapter at a time only: ``adapter_names`` (mixed batches)
covers LoRA-like layers, a PeftModel holds adapters of one type, and IA3 injected into the
base would wrap the very layers the LoRA fallback wraps. So the replica computes each from
its PEFT artifact exactly as PEFT's forward does, per row (the tests hold it to PeftModel's
own output):

- AdaLoRA adds x (A * E)^T B^T * alpha / (init_r + 1e-5) to a layer's output (its SVD form
  with the ranks it pruned to): a forward hook on the base ``nn.Linear`` adds it to its
  adapter's rows, in PEFT's order of operations. Mixes with anything.
- IA3 scales a layer's output (or, for its feed-forward modules, its input) by a learned
  vector: a forward hook (pre-hook) on the base ``nn.Linear`` multiplies each row by its
  adapter's vector, rows of other adapters and of the base by exact ones. Mixes with
  anything.
- Prompt tuning puts ``num_virtual_tokens`` learned embeddings before the prompt (positions
  0..n-1, the prompt after them, as PEFT does). The batch engine lays the row out with that
  many extra input columns, and the prefill fills them from the adapter; after the prefill
  the row is a plain base row (the virtual tokens are in its KV cache). Rows with virtual
  input tokens are prefilled apart from the others (their prefill passes embeddings).
- Prefix tuning puts learned keys and values in every layer's KV cache before the prompt
  (the prompt's positions start after them, as PEFT does): the engine gives the row that
  many cache columns, the prefill starts from a cache holding them. Then a plain row too.
- A partial fine-tune (the trainer's top layers) replaces the parameters of a few layers:
  the replica keeps only those layers' tensors and swaps them into the model's modules
  for the forward passes of that adapter's batches. Those apply to every row, so such an
  adapter has a batch to itself (``exclusive``): the engine does not mix it with other
  rows and takes requests in arrival order, so neither side starves.

Everything here runs on the model thread; ``validate`` refuses (FailedPrecondition, the
reason travels in ``adapter.load_failed``) before anything in the model changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ftops_inference.adapter_methods import (
    ADALORA,
    IA3,
    PARTIAL,
    PREFIX_TUNING,
    PROMPT_KEY,
    PROMPT_TUNING,
    adapter_kind,
    ia3_feedforward,
)
from ftops_runtime.errors import FailedPrecondition

PEFT_PREFIX = "base_model.model."
IA3_SUFFIX = ".ia3_l"
# Model types whose prefix-tuning caches PEFT builds in a special way (Gemma 2-4's own
# cache layout); those PEFT post-processes are added from its table at check time. Not
# served here rather than served wrong.
_SPECIAL_PREFIX_TYPES = ("gemma2", "gemma3", "gemma4")


@dataclass
class _Adapter:
    kind: str
    config: dict[str, Any]
    # IA3: key -> (module name, vector, feed-forward, saved shape)
    ia3: dict[str, tuple[str, torch.Tensor, bool, list[int]]] = field(default_factory=dict)
    # Prompt tuning: [n, hidden]; prefix tuning: [n, layers * 2 * token_dim] as saved.
    prompt: torch.Tensor | None = None
    # Prefix tuning: per layer (keys, values), each [kv heads, n, head dim].
    prefix: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # Partial: parameter name -> the fine-tuned parameter.
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    # AdaLoRA: module -> its low-rank term; and the saved tensors by key (for weights()).
    lowrank: dict[str, _LowRank] = field(default_factory=dict)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def virtual(self) -> int:
        return 0 if self.prompt is None else int(self.prompt.shape[0])


@dataclass(frozen=True)
class _LowRank:
    """AdaLoRA's term of one layer: x @ ae^T @ b^T * scaling / ranknum."""

    ae: torch.Tensor  # lora_A * lora_E [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float
    ranknum: torch.Tensor  # [1]: init_r + 1e-5, as PEFT keeps it


@dataclass
class _Scaled:
    """One linear layer's IA3 vectors by adapter (on its output and on its input), and its
    AdaLoRA terms by adapter."""

    out: dict[str, torch.Tensor] = field(default_factory=dict)
    inp: dict[str, torch.Tensor] = field(default_factory=dict)
    lowrank: dict[str, _LowRank] = field(default_factory=dict)
    out_hook: Any = None
    in_hook: Any = None
    delta_hook: Any = None


class MethodAdapters:
    """The non-LoRA adapters of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        config: Any = getattr(model, "config", None)
        self._config = config
        # By the base model's own names, taken before PEFT wraps any layer (it keeps the
        # original modules as its layers' base_layer, so these stay the ones computing).
        from transformers.pytorch_utils import Conv1D

        # Linear layers and GPT-2's Conv1D (weight [in, out]): by (in, out) features.
        self._linears: dict[str, torch.nn.Module] = {}
        self._features: dict[str, tuple[int, int]] = {}
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                self._linears[name] = m
                self._features[name] = (m.in_features, m.out_features)
            elif isinstance(m, Conv1D):
                self._linears[name] = m
                self._features[name] = (m.nx, m.nf)
        self._owners: dict[str, tuple[torch.nn.Module, str]] = {}
        for name, module in model.named_modules():
            for attr, param in module._parameters.items():
                if param is not None:
                    self._owners[f"{name}.{attr}" if name else attr] = (module, attr)
        embed: Any = model.get_input_embeddings()  # type: ignore[operator]
        self._embed: torch.nn.Module = embed
        self._adapters: dict[str, _Adapter] = {}
        self._scaled: dict[str, _Scaled] = {}
        self._ia3_plan: list[tuple[str, torch.Tensor]] = []
        self._rows: dict[str, torch.Tensor | None] = {}  # AdaLoRA adapter -> rows (None: all)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    # -- what the engine asks ----------------------------------------------------------

    def virtual_tokens(self, name: str) -> tuple[int, int]:
        """(input columns, cache columns) the adapter puts before a row's prompt."""
        adapter = self._adapters.get(name)
        if adapter is None:
            return 0, 0
        if adapter.kind == PROMPT_TUNING:
            return adapter.virtual, 0
        if adapter.kind == PREFIX_TUNING:
            return 0, adapter.virtual
        return 0, 0

    def exclusive(self, name: str) -> str | None:
        """The adapter's name when its rows must have their batch to themselves."""
        adapter = self._adapters.get(name)
        return name if adapter is not None and adapter.kind == PARTIAL else None

    def prefill_group(self, name: str) -> str | None:
        adapter = self._adapters.get(name)
        return "embeds" if adapter is not None and adapter.kind == PROMPT_TUNING else None

    # -- adapters ----------------------------------------------------------------------

    def add(self, name: str, config: dict[str, Any], state: Mapping[str, torch.Tensor]) -> None:
        adapter = self.validate(name, config, state)
        self._adapters[name] = adapter
        for module, vector, feedforward, _ in adapter.ia3.values():
            scaled = self._scaled.setdefault(module, _Scaled())
            linear = self._linears[module]
            if feedforward:
                scaled.inp[name] = vector
                if scaled.in_hook is None:
                    scaled.in_hook = linear.register_forward_pre_hook(self._in_hook(scaled))
            else:
                scaled.out[name] = vector
                if scaled.out_hook is None:
                    scaled.out_hook = linear.register_forward_hook(self._out_hook(scaled))
        for module, term in adapter.lowrank.items():
            scaled = self._scaled.setdefault(module, _Scaled())
            scaled.lowrank[name] = term
            if scaled.delta_hook is None:
                linear = self._linears[module]
                scaled.delta_hook = linear.register_forward_hook(self._delta_hook(scaled))

    def remove(self, name: str) -> None:
        adapter = self._adapters.pop(name)
        modules = {m for m, *_ in adapter.ia3.values()} | set(adapter.lowrank)
        for module in modules:
            scaled = self._scaled[module]
            scaled.out.pop(name, None)
            scaled.inp.pop(name, None)
            scaled.lowrank.pop(name, None)
            if not scaled.out and scaled.out_hook is not None:
                scaled.out_hook.remove()
                scaled.out_hook = None
            if not scaled.inp and scaled.in_hook is not None:
                scaled.in_hook.remove()
                scaled.in_hook = None
            if not scaled.lowrank and scaled.delta_hook is not None:
                scaled.delta_hook.remove()
                scaled.delta_hook = None
            if scaled.out_hook is None and scaled.in_hook is None and scaled.delta_hook is None:
                del self._scaled[module]

    def weights(self, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The adapter's config and state dict as read (CPU copies), for the CPU tier."""
        adapter = self._adapters[name]
        state: dict[str, torch.Tensor] = {}
        for key, (_, vector, _, shape) in adapter.ia3.items():
            state[key] = vector.reshape(shape).to("cpu", copy=True)
        if adapter.prompt is not None:
            state[PROMPT_KEY] = adapter.prompt.to("cpu", copy=True)
        for key, param in adapter.params.items():
            state[key] = param.detach().to("cpu", copy=True)
        for key, tensor in adapter.saved.items():
            state[key] = tensor.to("cpu", copy=True)
        return adapter.config, state

    def validate(
        self, name: str, config: dict[str, Any], state: Mapping[str, torch.Tensor]
    ) -> _Adapter:
        """The adapter checked against this model and placed on its device; the model is
        not touched."""
        kind = adapter_kind(config)
        if kind == ADALORA:
            return self._adalora(name, config, state)
        if kind == IA3:
            return self._ia3(name, config, state)
        if kind in (PROMPT_TUNING, PREFIX_TUNING):
            return self._prompt(name, kind, config, state)
        if kind == PARTIAL:
            return self._partial(name, config, state)
        raise FailedPrecondition(f"version {name}: adapter type {kind!r} is not served")

    def _weight(self) -> torch.Tensor:
        weight: torch.Tensor = self._embed.weight  # type: ignore[assignment]
        return weight

    def _ia3(
        self, name: str, config: dict[str, Any], state: Mapping[str, torch.Tensor]
    ) -> _Adapter:
        adapter = _Adapter(IA3, config)
        for key, tensor in state.items():
            module = key.removeprefix(PEFT_PREFIX).removesuffix(IA3_SUFFIX)
            linear = self._linears.get(module)
            if not key.endswith(IA3_SUFFIX) or linear is None:
                raise FailedPrecondition(
                    f"version {name}: tensor {key!r} is not an IA3 vector of a linear layer "
                    "of the base model"
                )
            feedforward = ia3_feedforward(config, module)
            fan_in, fan_out = self._features[module]
            expected = [1, fan_in] if feedforward else [fan_out, 1]
            if list(tensor.shape) != expected:
                raise FailedPrecondition(
                    f"version {name}: tensor {key!r} has shape {list(tensor.shape)}, "
                    f"{module} needs {expected}"
                )
            weight: torch.Tensor = linear.weight  # type: ignore[assignment]
            # PEFT keeps a half-precision base's adapter weights in float32.
            dtype = (
                torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            )
            vector = tensor.flatten().to(weight.device, dtype)
            adapter.ia3[key] = (module, vector, feedforward, list(tensor.shape))
        if not adapter.ia3:
            raise FailedPrecondition(f"version {name}: the adapter holds no IA3 vectors")
        return adapter

    def _adalora(
        self, name: str, config: dict[str, Any], state: Mapping[str, torch.Tensor]
    ) -> _Adapter:
        adapter = _Adapter(ADALORA, config)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            stem, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if kind not in ("A", "B", "E") or stem not in self._linears:
                raise FailedPrecondition(
                    f"version {name}: tensor {key!r} is not an AdaLoRA matrix of a linear "
                    "layer of the base model"
                )
            parts.setdefault(stem, {})[kind] = tensor
            adapter.saved[key] = tensor  # as read (CPU), for the CPU tier
        init_r = config.get("init_r")
        alpha = config.get("lora_alpha")
        if not isinstance(init_r, int) or not isinstance(alpha, int | float):
            raise FailedPrecondition(f"version {name}: adalora needs init_r and lora_alpha")
        for module, found in parts.items():
            linear = self._linears[module]
            fan_in, fan_out = self._features[module]
            a, b, e = found.get("A"), found.get("B"), found.get("E")
            if a is None or b is None or e is None:
                raise FailedPrecondition(f"version {name}: {module} lacks lora_A, B or E")
            rank = a.shape[0]
            if (
                list(a.shape) != [rank, fan_in]
                or list(b.shape) != [fan_out, rank]
                or list(e.shape) != [rank, 1]
            ):
                raise FailedPrecondition(
                    f"version {name}: AdaLoRA tensors of {module} do not fit linear "
                    f"{fan_in}->{fan_out}"
                )
            weight: torch.Tensor = linear.weight  # type: ignore[assignment]
            dtype = (
                torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
            )
            if rank == 0:  # pruned away: PEFT adds an exact zero
                continue
            # PEFT keeps init_r as the rank divisor (and alpha, or r when alpha is 0).
            ranknum = torch.full((1,), float(init_r), device=weight.device) + 1e-5
            adapter.lowrank[module] = _LowRank(
                ae=a.to(weight.device, dtype) * e.to(weight.device, dtype),
                b=b.to(weight.device, dtype),
                scaling=float(alpha) if alpha > 0 else float(rank),
                ranknum=ranknum,
            )
        if not adapter.saved:
            raise FailedPrecondition(f"version {name}: the adapter holds no AdaLoRA tensors")
        return adapter

    def _prompt(
        self, name: str, kind: str, config: dict[str, Any], state: Mapping[str, torch.Tensor]
    ) -> _Adapter:
        tensor = state.get(PROMPT_KEY)
        count = config.get("num_virtual_tokens")
        if tensor is None or set(state) != {PROMPT_KEY} or tensor.dim() != 2:
            raise FailedPrecondition(f"version {name}: the adapter holds no {PROMPT_KEY} alone")
        if tensor.shape[0] != count:
            raise FailedPrecondition(
                f"version {name}: {PROMPT_KEY} has {tensor.shape[0]} rows for "
                f"num_virtual_tokens={count}"
            )
        context = int(getattr(self._config, "max_position_embeddings", 0) or 0)
        if context and tensor.shape[0] >= context // 2:
            raise FailedPrecondition(
                f"version {name}: {tensor.shape[0]} virtual tokens would take half or more "
                f"of the base model's {context} positions"
            )
        weight = self._weight()
        adapter = _Adapter(kind, config, prompt=tensor.to(weight.device))
        if kind == PROMPT_TUNING:
            if tensor.shape[1] != weight.shape[1]:
                raise FailedPrecondition(
                    f"version {name}: {PROMPT_KEY} has width {tensor.shape[1]}, the base "
                    f"model's embeddings {weight.shape[1]}"
                )
            return adapter
        adapter.prefix = self._prefix_cache(name, config, tensor.to(weight.device))
        return adapter

    def _prefix_cache(
        self, name: str, config: dict[str, Any], tensor: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """PEFT's get_prompt for a decoder-only model, once: the saved embedding viewed as
        [n, layers * 2, heads, head dim] and split per layer into keys and values."""
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING

        mc: Any = self._config
        model_type = str(getattr(mc, "model_type", ""))
        special = (
            *_SPECIAL_PREFIX_TYPES,
            *TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING,
        )
        if any(kind in model_type for kind in special):
            raise FailedPrecondition(
                f"version {name}: prefix tuning on model type {model_type!r} needs a cache "
                "layout this replica does not build"
            )
        layers = int(getattr(mc, "num_hidden_layers", 0) or 0)
        heads = int(getattr(mc, "num_attention_heads", 0) or 0)
        kv_heads = int(getattr(mc, "num_key_value_heads", 0) or heads)
        head_dim = int(getattr(mc, "head_dim", 0) or (mc.hidden_size // heads))
        want = {"num_layers": layers, "num_attention_heads": kv_heads}
        for field_name, value in want.items():
            if config.get(field_name) != value:
                raise FailedPrecondition(
                    f"version {name}: prefix tuning made for {field_name}="
                    f"{config.get(field_name)}, the base model has {value}"
                )
        token_dim = config.get("token_dim")
        if token_dim != kv_heads * head_dim:
            raise FailedPrecondition(
                f"version {name}: prefix tuning made for token_dim={token_dim}, the base "
                f"model's keys are {kv_heads} x {head_dim}"
            )
        count = tensor.shape[0]
        if tensor.shape[1] != layers * 2 * token_dim:
            raise FailedPrecondition(
                f"version {name}: {PROMPT_KEY} has width {tensor.shape[1]}, prefix tuning "
                f"of this base needs {layers * 2 * token_dim}"
            )
        dtype = self._weight().dtype
        kv = tensor.to(dtype).view(count, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]

    def _partial(
        self, name: str, config: dict[str, Any], state: Mapping[str, torch.Tensor]
    ) -> _Adapter:
        layers = int(getattr(self._config, "num_hidden_layers", 0) or 0)
        if config.get("num_hidden_layers") != layers:
            raise FailedPrecondition(
                f"version {name}: a partial fine-tune of {config.get('num_hidden_layers')} "
                f"layers, the base model has {layers}"
            )
        prefixes = tuple(f"{config['layers_module']}.{i}." for i in config["layers"])
        adapter = _Adapter(PARTIAL, config)
        for key, tensor in state.items():
            owner = self._owners.get(key)
            if not key.startswith(prefixes) or owner is None:
                raise FailedPrecondition(
                    f"version {name}: tensor {key!r} is not a parameter of the base model's "
                    f"layers {config['layers']}"
                )
            module, attr = owner
            current: torch.Tensor = module._parameters[attr]  # type: ignore[assignment]
            if tensor.shape != current.shape:
                raise FailedPrecondition(
                    f"version {name}: tensor {key!r} has shape {list(tensor.shape)}, the base "
                    f"model's {list(current.shape)}"
                )
            value = tensor.to(current.device, current.dtype)
            adapter.params[key] = torch.nn.Parameter(value, requires_grad=False)
        if not adapter.params:
            raise FailedPrecondition(f"version {name}: the partial fine-tune holds no tensors")
        return adapter

    # -- forward (model thread) -------------------------------------------------------

    def prefill_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        adapter_names: list[str],
    ) -> dict[str, Any]:
        """Model inputs for a prefill whose rows have virtual tokens: the input embeddings
        with prompt-tuning rows' virtual columns filled, and a cache holding prefix rows'
        keys and values (``attention_mask`` is that cache's columns plus the input's)."""
        from transformers import DynamicCache

        batch, width = input_ids.shape
        cache_width = attention_mask.shape[1] - width
        rows = [(i, self._adapters.get(n)) for i, n in enumerate(adapter_names)]
        out: dict[str, Any] = {}
        prompted = [(i, a) for i, a in rows if a is not None and a.kind == PROMPT_TUNING]
        if prompted:
            embeds = self._embed(input_ids)
            real = attention_mask[:, cache_width:].sum(-1)
            for i, adapter in prompted:
                assert adapter.prompt is not None
                start = width - int(real[i])
                embeds[i, start : start + adapter.virtual] = adapter.prompt.to(embeds.dtype)
            out["input_ids"], out["inputs_embeds"] = None, embeds
        if cache_width:
            prefixed = [(i, a) for i, a in rows if a is not None and a.kind == PREFIX_TUNING]
            layers = []
            for layer in range(int(self._config.num_hidden_layers)):
                keys0, _ = prefixed[0][1].prefix[layer]
                shape = (batch, keys0.shape[0], cache_width, keys0.shape[2])
                keys = keys0.new_zeros(shape)
                values = keys0.new_zeros(shape)
                for i, adapter in prefixed:
                    k, v = adapter.prefix[layer]
                    keys[i, :, cache_width - adapter.virtual :] = k
                    values[i, :, cache_width - adapter.virtual :] = v
                layers.append((keys, values))
            out["past_key_values"] = DynamicCache(layers, config=self._config)
        return out

    @contextlib.contextmanager
    def active(self, adapter_names: list[str], device: torch.device) -> Iterator[None]:
        """The rows' adapters for one forward pass: IA3 vectors per row, and a partial
        fine-tune's parameters in the model (its batch holds its rows only)."""
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            if name in self._adapters:
                rows.setdefault(name, []).append(row)
        swapped: list[tuple[torch.nn.Module, str, Any]] = []
        try:
            for name, indices in rows.items():
                adapter = self._adapters[name]
                if adapter.kind == IA3:
                    index = torch.tensor(indices, dtype=torch.long, device=device)
                    self._ia3_plan.append((name, index))
                elif adapter.kind == ADALORA:
                    every = len(indices) == len(adapter_names)
                    rows_of = None if every else torch.tensor(indices, device=device)
                    self._rows[name] = rows_of
                elif adapter.kind == PARTIAL:
                    if len(indices) != len(adapter_names):
                        raise RuntimeError(
                            f"partial fine-tune {name} shares a batch with other rows"
                        )
                    for key, param in adapter.params.items():
                        module, attr = self._owners[key]
                        swapped.append((module, attr, module._parameters[attr]))
                        module._parameters[attr] = param
            yield
        finally:
            for module, attr, original in reversed(swapped):
                module._parameters[attr] = original
            self._ia3_plan = []
            self._rows = {}

    def _factor(self, vectors: dict[str, torch.Tensor], batch: int) -> torch.Tensor | None:
        factor: torch.Tensor | None = None
        for name, index in self._ia3_plan:
            vector = vectors.get(name)
            if vector is None:
                continue
            if factor is None:
                factor = vector.new_ones(batch, vector.shape[0])
            factor[index] = vector
        return factor

    def _out_hook(self, scaled: _Scaled) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            factor = self._factor(scaled.out, output.shape[0])
            if factor is None:
                return None
            view = factor.view(output.shape[0], *([1] * (output.dim() - 2)), -1)
            return (output * view).to(output.dtype)

        return hook

    def _delta_hook(self, scaled: _Scaled) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            result: torch.Tensor | None = None
            for name, rows in self._rows.items():
                term = scaled.lowrank.get(name)
                if term is None:
                    continue
                x = args[0] if rows is None else args[0].index_select(0, rows)
                x = x.to(term.ae.dtype)
                delta = (x @ term.ae.T @ term.b.T) * term.scaling / term.ranknum
                base = output if result is None else result
                # PEFT's `result += delta`: added in the wider dtype, kept in the output's.
                if rows is None:
                    result = (base + delta).to(base.dtype)
                else:
                    added = (base.index_select(0, rows) + delta).to(base.dtype)
                    result = base.index_copy(0, rows, added)
            return result

        return hook

    def _in_hook(self, scaled: _Scaled) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> Any:
            x = args[0]
            factor = self._factor(scaled.inp, x.shape[0])
            if factor is None:
                return None
            view = factor.view(x.shape[0], *([1] * (x.dim() - 2)), -1)
            return ((x.to(factor.dtype) * view).to(x.dtype), *args[1:])

        return hook
