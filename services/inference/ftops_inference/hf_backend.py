"""transformers + PEFT backend: mixed-adapter continuous batching (``batching``) over a
base model with a bounded set of adapters in it (``residency``), plain LoRA served from
stacked weights (``stacked_lora``), other LoRA variants through PEFT, and IA3, prompt
tuning, prefix tuning and partial fine-tunes computed from their artifacts
(``peft_methods``)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftops_inference.adapter_methods import METHOD_NAMES, OTHER_METHODS, adapter_kind
from ftops_inference.backend import (
    AdapterStats,
    Chunk,
    Completion,
    GenerationRequest,
    ModuleShape,
    complete,
)
from ftops_inference.batching import BASE_ADAPTER, BatchEngine, ModelRuntime, new_row
from ftops_inference.peft_methods import MethodAdapters
from ftops_inference.residency import Residency, Tiers
from ftops_inference.stacked_lora import LoRAStack
from ftops_runtime.errors import FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class AdapterWeights:
    """A verified adapter outside the model: its config and CPU state dict. LoRA adapters
    (``method`` "lora") carry their PeftConfig, the other methods their JSON config."""

    config: Any
    state: dict[str, torch.Tensor]
    method: str = "lora"


class _Runtime(ModelRuntime):
    """The model as the batch engine sees it. Only the model thread calls into it.

    Plain LoRA adapters live in ``stack`` (see ``stacked_lora``); the others, and all of
    them with ``lora_kernel = "peft"``, in a PeftModel wrapping the base, served through
    PEFT's ``adapter_names``; IA3, prompt and prefix tuning and partial fine-tunes in
    ``methods`` (see ``peft_methods``). One batch may mix all of them and the base, except
    a partial fine-tune, which has its batches to itself.
    """

    def __init__(
        self, base: Any, tokenizer: Any, eos: set[int], pad: int, *, stacked: bool = True
    ) -> None:
        self.base = base
        self.peft: Any = None  # the PeftModel wrapping ``base`` once PEFT serves an adapter
        self.stack = LoRAStack(base) if stacked else None
        self.methods = MethodAdapters(base)
        self.tokenizer = tokenizer
        self._eos = eos
        self._pad = pad

    @property
    def eos(self) -> set[int]:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def virtual_tokens(self, adapter: str) -> tuple[int, int]:
        return self.methods.virtual_tokens(adapter)

    def exclusive(self, adapter: str) -> str | None:
        return self.methods.exclusive(adapter)

    def prefill_group(self, adapter: str) -> str | None:
        return self.methods.prefill_group(adapter)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Any,
        adapter_names: list[str],
    ) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "past_key_values": past,
            "use_cache": True,
            "logits_to_keep": 1,
        }
        model = self.base
        if self.peft is not None and self.peft.peft_config:
            # Rows of stacked adapters (and the base) are "__base__" to PEFT.
            served = self.peft.peft_config
            model = self.peft
            kwargs["adapter_names"] = [n if n in served else BASE_ADAPTER for n in adapter_names]
        lora: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if self.stack is not None and len(self.stack):
            lora = self.stack.active(adapter_names, input_ids.device)
        methods: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if len(self.methods):
            methods = self.methods.active(adapter_names, input_ids.device)
        with torch.inference_mode(), lora, methods:
            if past is None and (
                attention_mask.shape[1] != input_ids.shape[1]
                or any(self.methods.virtual_tokens(n)[0] for n in adapter_names)
            ):
                kwargs.update(self.methods.prefill_inputs(input_ids, attention_mask, adapter_names))
            out = model(**kwargs)
        return out.logits[:, -1, :], out.past_key_values

    def attach(self, version_id: str, weights: AdapterWeights) -> None:
        if weights.method != "lora":
            self.methods.add(version_id, weights.config, weights.state)
            return
        reason = "lora_kernel is peft"
        if self.stack is not None:
            reason = self.stack.unsupported(weights.config, weights.state) or ""
            if not reason:
                self.stack.add(version_id, weights.config, weights.state)
                return
        if getattr(weights.config, "use_dora", False):
            # PEFT cannot put a DoRA adapter in a mixed batch at all.
            raise FailedPrecondition(
                f"version {version_id} is a DoRA adapter, which this replica can only serve "
                f"from stacked weights, and those do not apply here ({reason})"
            )
        log.info("version %s served through PEFT: %s", version_id, reason)
        self._attach_peft(version_id, weights)

    def _attach_peft(self, version_id: str, weights: AdapterWeights) -> None:
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict

        if self.peft is None:
            self.peft = PeftModel(self.base, weights.config, adapter_name=version_id)
        else:
            self.peft.add_adapter(version_id, weights.config)
        try:
            result: Any = set_peft_model_state_dict(
                self.peft, weights.state, adapter_name=version_id
            )
            unexpected = list(result.unexpected_keys)
            if unexpected:
                raise FailedPrecondition(
                    f"version {version_id}: tensors {unexpected[:3]} match no module of the model"
                )
        except BaseException:
            self.remove(version_id)
            raise
        if self.peft.active_adapter not in self.peft.peft_config:
            self.peft.set_adapter(version_id)
        self.peft.eval()

    def detach(self, version_id: str) -> AdapterWeights:
        """Out of the model; its verified CPU weights come back (for the CPU tier)."""
        if self.stack is not None and version_id in self.stack:
            config, state = self.stack.weights(version_id)
            self.stack.remove(version_id)
            return AdapterWeights(config, state)
        if version_id in self.methods:
            config, state = self.methods.weights(version_id)
            self.methods.remove(version_id)
            return AdapterWeights(config, state, METHOD_NAMES[adapter_kind(config)])
        from peft.utils import get_peft_model_state_dict

        config = self.peft.peft_config[version_id]
        state = {
            k: v.detach().to("cpu", copy=True)
            for k, v in get_peft_model_state_dict(self.peft, adapter_name=version_id).items()
        }
        self.remove(version_id)
        return AdapterWeights(config, state)

    def remove(self, version_id: str) -> None:
        if self.stack is not None and version_id in self.stack:
            self.stack.remove(version_id)
            return
        if version_id in self.methods:
            self.methods.remove(version_id)
            return
        self.peft.delete_adapter(version_id)
        remaining = list(self.peft.peft_config)
        if remaining and self.peft.active_adapter not in remaining:
            self.peft.set_adapter(remaining[0])


class HFPeftBackend:
    """transformers + PEFT; see the module docstring."""

    kind = "hf"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        max_batch_size: int = 8,
        max_batch_wait_ms: float = 2.0,
        max_loaded: int = 8,
        max_cached: int = 32,
        recovery_probe_s: float = 1.0,
        lora_kernel: str = "stacked",
    ) -> None:
        self.model_dir = model_dir
        self.device = torch.device(device)
        self._max_batch_size = max_batch_size
        self._max_batch_wait_s = max_batch_wait_ms / 1000
        self._recovery_probe_s = recovery_probe_s
        self._stacked = lora_kernel == "stacked"
        self._rt: _Runtime | None = None
        self._engine: BatchEngine | None = None
        self._outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Outbox] = (
            weakref.WeakKeyDictionary()
        )
        self._shapes: dict[str, ModuleShape] = {}
        self._context = 0
        self.residency: Residency[AdapterWeights] = Residency(
            Tiers(
                read=self._read,
                attach=self._attach,
                detach=self._detach,
                remove=self._remove,
                drop=_give_back_memory,
            ),
            max_loaded=max_loaded,
            max_cached=max_cached,
        )

    # -- lifecycle -------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def failure(self) -> str | None:
        return self._engine.crashed if self._engine is not None else None

    @property
    def context_length(self) -> int:
        return self._context

    def busy_share(self) -> float:
        """Share of the last second the model thread spent computing (0..1)."""
        return self._engine.busy.share() if self._engine is not None else 0.0

    @property
    def engine(self) -> BatchEngine:
        if self._engine is None:
            raise Unavailable("the base model is still loading; retry shortly")
        return self._engine

    async def start(self) -> None:
        if self._engine is None:
            await asyncio.to_thread(self._load_base)

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    def _load_base(self) -> None:
        # PEFT and safetensors are imported here, off the event loop and before serving:
        # importing PEFT takes ~110 ms of the GIL, which the first hot-load would otherwise
        # take from the requests being served.
        import peft  # noqa: F401
        import safetensors.torch  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.pytorch_utils import Conv1D

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir)
        model = model.to(self.device)
        model.eval()
        shapes: dict[str, ModuleShape] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                shapes[name] = ModuleShape("linear", module.in_features, module.out_features)
            elif isinstance(module, Conv1D):  # GPT-2's: a linear layer, weight [in, out]
                shapes[name] = ModuleShape("linear", module.nx, module.nf)
            elif isinstance(module, torch.nn.Embedding):
                shapes[name] = ModuleShape("embedding", module.num_embeddings, module.embedding_dim)
        eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # Padding is masked out, so any id works; the tokenizer's own when it has one.
        pad = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else min(eos_ids, default=0)
        )
        self._context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self._shapes = shapes
        self._rt = _Runtime(model, tokenizer, eos_ids, int(pad), stacked=self._stacked)
        engine = BatchEngine(
            self._rt,
            device=self.device,
            max_batch_size=self._max_batch_size,
            max_batch_wait_s=self._max_batch_wait_s,
            probe_interval_s=self._recovery_probe_s,
        )
        engine.start()
        self._engine = engine
        log.info("loaded base model %s on %s", self.model_dir, self.device)

    def module_shapes(self) -> Mapping[str, ModuleShape]:
        return self._shapes

    # -- adapters --------------------------------------------------------------------

    def loaded(self) -> list[str]:
        return self.residency.loaded()

    def cached(self) -> list[str]:
        return self.residency.cached()

    def holds(self, version_id: str) -> bool:
        return bool(self.residency.tier(version_id))

    def adapter_stats(self, version_id: str) -> AdapterStats:
        stats = self.residency.stats.get(version_id)
        tier = self.residency.tier(version_id)
        if stats is None:
            return AdapterStats(tier)
        return AdapterStats(tier, stats.loads, stats.reloads, stats.evictions)

    def watch(self, on_change: Callable[[], None], on_event: Callable[[str, str], None]) -> None:
        self.residency.on_change = on_change
        self.residency.on_event = on_event

    async def load_adapter(self, version_id: str, adapter_dir: Path) -> None:
        if self._engine is None:
            raise Unavailable("the base model is still loading; retry shortly")
        await self.residency.add(version_id, adapter_dir)

    async def unload_adapter(self, version_id: str) -> None:
        await self.residency.retire(version_id)

    async def _read(self, adapter_dir: Path) -> AdapterWeights:
        return await asyncio.to_thread(_read_weights, adapter_dir)

    async def _attach(self, version_id: str, weights: AdapterWeights) -> None:
        rt = self._rt
        assert rt is not None
        await self.engine.call(lambda: rt.attach(version_id, weights))

    async def _remove(self, version_id: str) -> None:
        rt = self._rt
        assert rt is not None
        await self.engine.call(lambda: rt.remove(version_id))

    async def _detach(self, version_id: str) -> AdapterWeights:
        rt = self._rt
        assert rt is not None
        weights: AdapterWeights = await self.engine.call(lambda: rt.detach(version_id))
        return weights

    # -- generation ------------------------------------------------------------------

    def _outbox_for(self, loop: asyncio.AbstractEventLoop) -> _Outbox:
        outbox = self._outboxes.get(loop)
        if outbox is None:
            outbox = self._outboxes[loop] = _Outbox(loop)
        return outbox

    async def count_prompt_tokens(self, prompt: str) -> int:
        return len(await asyncio.to_thread(self._encode, prompt))

    def _encode(self, prompt: str) -> list[int]:
        if self._rt is None:
            raise Unavailable("the base model is still loading; retry shortly")
        return list(self._rt.tokenizer(prompt)["input_ids"])

    async def generate(self, request: GenerationRequest) -> Completion:
        return await complete(self.stream(request))

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        engine = self.engine
        if engine.crashed:
            raise Unavailable(f"the model is recovering from a failure: {engine.crashed}")
        prompt_ids = await asyncio.to_thread(self._encode, request.prompt)
        room = self._context - len(prompt_ids)
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        cancel = threading.Event()
        outbox = self._outbox_for(asyncio.get_running_loop())

        def emit(item: Chunk | BaseException) -> None:
            outbox.put(queue, item)

        async with contextlib.AsyncExitStack() as stack:
            if request.adapter is not None:
                await stack.enter_async_context(self.residency.use(request.adapter))
                if self._rt is not None:  # virtual tokens take positions too
                    room -= sum(self._rt.methods.virtual_tokens(request.adapter))
            row = new_row(
                prompt_ids,
                request.sampling,
                request.adapter,
                max_new=min(request.sampling.max_tokens, room),
                emit=emit,
                cancel=cancel,
                device=self.device,
            )
            engine.submit(row)
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if item.finish_reason is not None:
                        break
            finally:
                # The engine drops the row at its next step: the slot is free at once.
                cancel.set()


class _Outbox:
    """Chunks from the model thread to the event loop, one wake-up per batch step rather
    than one per row (each wake-up is a syscall on the loop's self-pipe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Chunk | BaseException], Chunk | BaseException]] = []

    def put(self, queue: asyncio.Queue[Chunk | BaseException], item: Chunk | BaseException) -> None:
        with self._lock:
            self._items.append((queue, item))
            wake = len(self._items) == 1
        if wake:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


def _read_weights(adapter_dir: Path) -> AdapterWeights:
    from peft import PeftConfig
    from safetensors.torch import load_file

    raw = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    kind = adapter_kind(raw)
    if kind in OTHER_METHODS:
        # IA3, prompt/prefix tuning, partial: checked against the model when attached.
        state = load_file(str(adapter_dir / ADAPTER_WEIGHTS), device="cpu")
        return AdapterWeights(raw, state, METHOD_NAMES[kind])
    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    # Only safetensors ever reach this point (the loader refuses anything else).
    # They stay on the CPU until attached; PEFT copies them to the layers' device.
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS), device="cpu")
    return AdapterWeights(config, state)


def _give_back_memory() -> None:
    """Make an unload visible in RSS: return freed arenas to the OS. The weights are
    freed by reference counting already; no gc.collect(), which takes a second with
    torch loaded and would stall serving (it holds the GIL)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
