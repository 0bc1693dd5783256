"""Model backends. The service talks to a ``Backend``; ``HFPeftBackend`` is the plain
transformers + PEFT one (one worker thread, one request at a time). A vLLM backend with
continuous batching and adapter LRU fits the same protocol: everything is async, adapters
are addressed by version id, and each request names its adapter explicitly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ftops_inference.sampling import FinishReason, SamplingConfig, TextTracker, next_token
from ftops_runtime.errors import FailedPrecondition, NotFound, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleShape:
    """What a LoRA pair attached to a base module must fit: (in, out) features."""

    kind: str  # "linear" or "embedding"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    sampling: SamplingConfig
    # Adapter version id; None means the base model alone.
    adapter: str | None = None


@dataclass(frozen=True)
class Chunk:
    """Text added since the previous chunk. The last chunk carries ``finish_reason``."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


class Backend(Protocol):
    """A base model plus adapters loaded side by side under their version ids."""

    @property
    def ready(self) -> bool: ...

    @property
    def context_length(self) -> int: ...

    async def start(self) -> None:
        """Load the base model (slow; the server answers NOT_SERVING meanwhile)."""

    async def close(self) -> None: ...

    def module_shapes(self) -> Mapping[str, ModuleShape]:
        """Base modules an adapter may target, by name as in the base model."""
        ...

    async def count_prompt_tokens(self, prompt: str) -> int: ...

    async def load_adapter(self, version_id: str, adapter_dir: Path) -> None: ...

    async def unload_adapter(self, version_id: str) -> None: ...

    def loaded(self) -> list[str]: ...

    async def generate(self, request: GenerationRequest) -> Completion: ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Deltas as they are produced; closing the iterator cancels the generation."""
        ...


class HFPeftBackend:
    """transformers + PEFT on one worker thread.

    All model access (generation, adapter load/unload) runs on a single thread, so the
    active adapter set by one request cannot change under another: a request for version
    A never sees version B's weights.
    """

    def __init__(self, model_dir: Path, *, device: str = "cpu") -> None:
        self.model_dir = model_dir
        self.device = torch.device(device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._model: Any = None  # the base model, then the PeftModel wrapping it
        self._peft = False
        self._tokenizer: Any = None
        self._adapters: list[str] = []
        self._shapes: dict[str, ModuleShape] = {}
        self._context = 0
        self._eos: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def context_length(self) -> int:
        return self._context

    async def start(self) -> None:
        if self._model is None:
            await self._run(self._load_base)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _load_base(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_dir)
        model = model.to(self.device)
        model.eval()
        shapes: dict[str, ModuleShape] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                shapes[name] = ModuleShape("linear", module.in_features, module.out_features)
            elif isinstance(module, torch.nn.Embedding):
                shapes[name] = ModuleShape("embedding", module.num_embeddings, module.embedding_dim)
        eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self._shapes = shapes
        self._tokenizer = tokenizer
        self._model = model
        log.info("loaded base model %s on %s", self.model_dir, self.device)

    def module_shapes(self) -> Mapping[str, ModuleShape]:
        return self._shapes

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _require_ready(self) -> None:
        if self._model is None:
            raise Unavailable("the base model is still loading; retry shortly")

    # -- adapters --------------------------------------------------------------------

    def loaded(self) -> list[str]:
        return list(self._adapters)

    async def load_adapter(self, version_id: str, adapter_dir: Path) -> None:
        self._require_ready()
        await self._run(self._load_adapter, version_id, adapter_dir)

    def _load_adapter(self, version_id: str, adapter_dir: Path) -> None:
        if version_id in self._adapters:
            return  # a loaded version is never replaced
        if not self._peft:
            from peft import PeftModel

            self._model = PeftModel.from_pretrained(
                self._model, str(adapter_dir), adapter_name=version_id, is_trainable=False
            )
            self._peft = True
        else:
            self._model.load_adapter(str(adapter_dir), adapter_name=version_id)
        self._model.eval()
        self._adapters.append(version_id)

    async def unload_adapter(self, version_id: str) -> None:
        self._require_ready()
        await self._run(self._unload_adapter, version_id)

    def _unload_adapter(self, version_id: str) -> None:
        if version_id not in self._adapters:
            raise NotFound(f"adapter version {version_id} is not loaded")
        self._adapters.remove(version_id)
        if not self._adapters:
            # Unwrap entirely so the base runs without any LoRA layers again.
            self._model = self._model.unload()
            self._peft = False
        else:
            self._model.delete_adapter(version_id)

    # -- generation ------------------------------------------------------------------

    async def count_prompt_tokens(self, prompt: str) -> int:
        self._require_ready()
        return len(await asyncio.to_thread(self._encode, prompt))

    def _encode(self, prompt: str) -> list[int]:
        return list(self._tokenizer(prompt)["input_ids"])

    async def generate(self, request: GenerationRequest) -> Completion:
        parts: list[str] = []
        last: Chunk | None = None
        async with contextlib.aclosing(self.stream(request)) as chunks:
            async for chunk in chunks:
                parts.append(chunk.text)
                last = chunk
        assert last is not None
        assert last.finish_reason is not None
        return Completion(
            "".join(parts), last.prompt_tokens, last.completion_tokens, last.finish_reason
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        self._require_ready()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Chunk | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                for chunk in self._generate(request, cancel):
                    emit(chunk)
            except BaseException as exc:
                emit(exc)

        future = loop.run_in_executor(self._executor, work)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    break
        finally:
            # Stops the token loop between two tokens when the caller goes away.
            cancel.set()
            if not future.done():
                future.add_done_callback(lambda f: f.exception())

    @contextlib.contextmanager
    def _select_adapter(self, adapter: str | None) -> Iterator[None]:
        if adapter is None:
            if self._peft:
                with self._model.disable_adapter():
                    yield
            else:
                yield
            return
        if adapter not in self._adapters:
            raise FailedPrecondition(f"adapter version {adapter} was unloaded meanwhile")
        self._model.set_adapter(adapter)
        yield

    def _generate(self, request: GenerationRequest, cancel: threading.Event) -> Iterator[Chunk]:
        cfg = request.sampling
        prompt_ids = self._encode(request.prompt)
        n_prompt = len(prompt_ids)
        max_new = min(cfg.max_tokens, self._context - n_prompt)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(cfg.seed if cfg.seed is not None else secrets.randbits(63))
        tracker = TextTracker(cfg.stop)
        tokens: list[int] = []
        finish, tail = FinishReason.LENGTH, ""
        with torch.inference_mode(), self._select_adapter(request.adapter):
            input_ids = torch.tensor([prompt_ids], device=self.device)
            past: Any = None
            while len(tokens) < max_new:
                if cancel.is_set():
                    log.debug("generation cancelled after %d tokens", len(tokens))
                    return
                out = self._model(input_ids=input_ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = next_token(out.logits[0, -1, :], cfg, generator)
                if token in self._eos:
                    finish = FinishReason.EOS
                    break
                tokens.append(token)
                delta = tracker.update(self._tokenizer.decode(tokens, skip_special_tokens=True))
                if tracker.stopped:
                    finish, tail = FinishReason.STOP, delta
                    break
                if delta:
                    yield Chunk(delta, len(tokens), n_prompt)
                input_ids = torch.tensor([[token]], device=self.device)
        yield Chunk(tail + tracker.finish(), len(tokens), n_prompt, finish)
