"""vLLM backend (GPU): the engine in-process (``AsyncLLM``) with multi-LoRA serving.

vLLM batches requests for different adapters itself and keeps its own adapter tiers
(``max_loras`` on the GPU, ``max_cpu_loras`` in CPU memory, LRU). It caches adapters by
integer id, so every adapter *version* gets a fresh id that is never reused: reusing an id
for new weights would serve the old ones. vLLM is imported only when this backend starts;
it is an optional extra installed only where a CUDA GPU is.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftops_inference.backend import (
    AdapterStats,
    Chunk,
    Completion,
    GenerationRequest,
    ModuleShape,
    complete,
)
from ftops_inference.base_files import read_base
from ftops_inference.sampling import FinishReason, SamplingConfig
from ftops_runtime.errors import FailedPrecondition, NotFound, Unavailable

if TYPE_CHECKING:
    from ftops_inference.settings import InferenceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Adapter:
    lora_id: int
    path: Path
    request: Any  # vllm.lora.request.LoRARequest


class VLLMBackend:
    kind = "vllm"

    def __init__(self, model_dir: Path, settings: InferenceSettings) -> None:
        self.model_dir = model_dir
        self._settings = settings
        self._engine: Any = None
        self._tokenizer: Any = None
        self._shapes: dict[str, ModuleShape] = {}
        self._context = 0
        self._adapters: dict[str, _Adapter] = {}
        self._ids = itertools.count(1)  # LoRA ids are never reused, even after unload
        self._in_use: Counter[str] = Counter()
        self._released = asyncio.Condition()
        self._stats: dict[str, AdapterStats] = {}
        self._failure: str | None = None
        self._on_change: Callable[[], None] = lambda: None
        self._on_event: Callable[[str, str], None] = lambda version, event: None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def failure(self) -> str | None:
        if self._engine is not None and getattr(self._engine, "errored", False):
            return self._failure or "the vLLM engine died"
        return self._failure

    @property
    def context_length(self) -> int:
        return self._context

    async def start(self) -> None:
        if self._engine is not None:
            return
        try:
            arg_utils = importlib.import_module("vllm.engine.arg_utils")
            async_llm = importlib.import_module("vllm.v1.engine.async_llm")
        except ImportError as exc:
            raise RuntimeError(
                "backend = vllm needs the vllm extra (pip install '.[vllm]') on a CUDA host"
            ) from exc
        from transformers import AutoTokenizer

        s = self._settings
        self._shapes, context = await asyncio.to_thread(read_base, self.model_dir)
        self._context = s.vllm_max_model_len or context
        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir)
        args = arg_utils.AsyncEngineArgs(
            model=str(self.model_dir),
            enable_lora=True,
            max_loras=s.vllm_max_loras,
            max_lora_rank=s.vllm_max_lora_rank,
            max_cpu_loras=s.vllm_max_cpu_loras,
            tensor_parallel_size=s.vllm_tensor_parallel_size,
            gpu_memory_utilization=s.vllm_gpu_memory_utilization,
            max_model_len=s.vllm_max_model_len or None,
            dtype=s.vllm_dtype,
        )
        self._engine = async_llm.AsyncLLM.from_engine_args(args)
        log.info("vLLM engine up for %s", self.model_dir)

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    def module_shapes(self) -> Mapping[str, ModuleShape]:
        return self._shapes

    def watch(self, on_change: Callable[[], None], on_event: Callable[[str, str], None]) -> None:
        self._on_change, self._on_event = on_change, on_event

    async def count_prompt_tokens(self, prompt: str) -> int:
        if self._tokenizer is None:
            raise Unavailable("the base model is still loading; retry shortly")
        ids = await asyncio.to_thread(self._tokenizer, prompt)
        return len(ids["input_ids"])

    # -- adapters --------------------------------------------------------------------

    def _require_engine(self) -> Any:
        if self._engine is None:
            raise Unavailable("the base model is still loading; retry shortly")
        return self._engine

    async def load_adapter(self, version_id: str, adapter_dir: Path) -> None:
        engine = self._require_engine()
        if version_id in self._adapters:
            return
        lora_id = next(self._ids)
        request = importlib.import_module("vllm.lora.request").LoRARequest(
            lora_name=version_id, lora_int_id=lora_id, lora_path=str(adapter_dir)
        )
        # Loads now (into the CPU cache, then a GPU slot when used) so the first real
        # request does not pay for it.
        await engine.add_lora(request)
        self._adapters[version_id] = _Adapter(lora_id, adapter_dir, request)
        self._stats[version_id] = AdapterStats("model", loads=1)
        self._on_event(version_id, "load")
        self._on_change()

    async def unload_adapter(self, version_id: str) -> None:
        adapter = self._adapters.get(version_id)
        if adapter is None:
            raise NotFound(f"adapter version {version_id} is not loaded")
        # In-flight requests finish on their weights first; new ones are refused.
        del self._adapters[version_id]
        async with self._released:
            await self._released.wait_for(lambda: self._in_use[version_id] == 0)
        with contextlib.suppress(Exception):  # already evicted by vLLM's own LRU
            await self._require_engine().remove_lora(adapter.lora_id)
        self._stats.pop(version_id, None)
        self._on_event(version_id, "unload")
        self._on_change()

    def loaded(self) -> list[str]:
        return list(self._adapters)

    def cached(self) -> list[str]:
        return []  # vLLM's CPU tier is its own; every registered version is servable

    def holds(self, version_id: str) -> bool:
        return version_id in self._adapters

    def adapter_stats(self, version_id: str) -> AdapterStats:
        return self._stats.get(version_id, AdapterStats())

    # -- generation ------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> Completion:
        return await complete(self.stream(request))

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        engine = self._require_engine()
        if self.failure:
            raise Unavailable(f"the vLLM engine failed: {self.failure}")
        lora = None
        if request.adapter is not None:
            adapter = self._adapters.get(request.adapter)
            if adapter is None:
                raise FailedPrecondition(
                    f"adapter version {request.adapter} was unloaded meanwhile"
                )
            lora = adapter.request
            self._in_use[request.adapter] += 1
        request_id = uuid.uuid4().hex
        finished = False
        try:
            tokens = 0
            async for out in engine.generate(
                request.prompt, _sampling_params(request.sampling), request_id, lora_request=lora
            ):
                completion = out.outputs[0]
                tokens += len(completion.token_ids)
                n_prompt = len(out.prompt_token_ids or ())
                if out.finished:
                    finished = True
                    reason = _finish_reason(completion.finish_reason, completion.stop_reason)
                    yield Chunk(completion.text, tokens, n_prompt, reason)
                    return
                if completion.text:
                    yield Chunk(completion.text, tokens, n_prompt)
        except (FailedPrecondition, NotFound):
            raise
        except Exception as exc:
            if getattr(engine, "errored", False):
                self._failure = repr(exc)
            raise Unavailable(f"the vLLM engine failed this request: {exc!r}") from exc
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    await engine.abort(request_id)  # the caller went away: free the slot
            if request.adapter is not None:
                self._in_use[request.adapter] -= 1
                async with self._released:
                    self._released.notify_all()


def _sampling_params(cfg: SamplingConfig) -> Any:
    sampling_params = importlib.import_module("vllm.sampling_params")

    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "stop": list(cfg.stop),
        "seed": cfg.seed,
        "output_kind": sampling_params.RequestOutputKind.DELTA,
    }
    if cfg.top_k > 0:  # left at vLLM's default (disabled) otherwise
        kwargs["top_k"] = cfg.top_k
    return sampling_params.SamplingParams(**kwargs)


def _finish_reason(reason: str | None, stop_reason: int | str | None) -> FinishReason:
    if reason == "length":
        return FinishReason.LENGTH
    # vLLM says "stop" for both: a stop string is named in stop_reason, EOS leaves it None.
    if isinstance(stop_reason, str):
        return FinishReason.STOP
    return FinishReason.EOS
