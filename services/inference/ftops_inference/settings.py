"""Settings of the inference service (env vars ``FTOPS_<FIELD>``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ftops_runtime.auth import AuthSettings
from ftops_runtime.dev_only import DEV_ONLY
from ftops_runtime.settings import ServiceSettings

# The ranks vLLM's LoRAConfig accepts (vllm.config.lora.MaxLoRARanks); any other fails at
# engine start, minutes in, so settings refuse it up front.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class InferenceSettings(ServiceSettings, AuthSettings):
    """One inference replica: a base model, adapters hot-loaded beside it, batching,
    residency bounds, announcements, drain, and opt-in fault injection."""

    registry_address: str = Field("127.0.0.1:50051", description="Registry gRPC host:port.")
    registry_api_key: str = Field(
        "",
        description="The replica's own key for registry calls: viewer in every team whose "
        "adapters it loads (or a platform-admin service key).",
    )
    base_model_path: str = Field("", description="Local directory of the HF base model.")
    base_model_name: str = Field("tiny-llama", description="Name registered for the base model.")
    max_model_memory_mb: float = Field(
        0,
        ge=0,
        description=(
            "Memory the base model's weights may take, in MiB: a model whose estimate "
            "(parameters x dtype bytes, from the safetensors headers) exceeds 80% of it is "
            "refused before loading; 0 = the memory available when the replica starts."
        ),
    )
    adapter_cache_dir: str = Field(
        ".ftops/adapters", description="Where verified adapter artifacts are kept."
    )
    device: str = Field("cpu", description="torch device for the model (cpu, cuda, cuda:1).")
    advertise_address: str = Field(
        "", description="host:port announced in adapter.loaded; empty = the bound address."
    )
    max_prompt_tokens: int = Field(1024, gt=0, description="Longest prompt accepted.")
    max_new_tokens_limit: int = Field(512, gt=0, description="Largest max_tokens accepted.")
    default_max_tokens: int = Field(64, gt=0, description="max_tokens when a request says 0.")
    max_concurrent_requests: int = Field(
        16,
        gt=0,
        description="Generations running at once; user requests beyond wait in the queue.",
    )
    max_queue_length: int = Field(
        64,
        ge=0,
        description=(
            "User requests waiting (FIFO) for a slot beyond max_concurrent_requests; more are "
            "refused at once with RESOURCE_EXHAUSTED and a retry-after. 0 = no queue."
        ),
    )
    max_queue_wait_s: float = Field(
        10.0,
        ge=0,
        description=(
            "Longest expected wait for a slot (recent service time x position in the queue "
            "/ max_concurrent_requests) a request is queued for; beyond it, or beyond the "
            "caller's own deadline, it is refused at once instead of timing out queued."
        ),
    )
    best_effort_reserve_share: float = Field(
        0.25,
        description=(
            "Share of max_concurrent_requests (rounded down) kept for user requests: "
            "best-effort (mirrored, shadow) requests run only on the other slots, when no "
            "user request waits; they never queue and are dropped when a user needs a slot."
        ),
    )
    max_best_effort_running: int = Field(
        1,
        ge=0,
        description=(
            "Best-effort (mirrored, shadow) requests running at once; beyond it they are "
            "refused, not queued (0: only best_effort_reserve_share limits them). Each extra "
            "row slows every decode step of the batch on a compute-bound replica, so this "
            "bounds what a release's mirroring costs the users (raise it on GPUs)."
        ),
    )
    best_effort_max_busy: float = Field(
        1.0,
        gt=0,
        le=1,
        description=(
            "Best-effort (mirrored, shadow) requests are refused while the model was busy at "
            "least this share of the last second (1, the default: never for that reason). A "
            "continuously batching engine is busy most of the time far below its capacity "
            "(at half of it, 0.8 starved blue-green checks of mirrors), so the default "
            "limits mirrors by max_best_effort_running and the user queue instead."
        ),
    )
    registry_timeout_s: float = Field(10.0, gt=0, description="Deadline of registry calls.")
    backend: Literal["hf", "echo", "vllm"] = Field(
        "hf",
        description=(
            "Model backend: hf (transformers + PEFT, CPU or GPU), vllm (vLLM: the vllm extra "
            "on a CUDA machine, `make install-vllm` on a CPU one), echo (no model: answers "
            "with the prompt's words, for gateway benchmarks)."
        ),
    )
    echo_token_delay_ms: float = Field(
        0.0, ge=0, description="echo backend: time per generated token (simulated decode)."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description=(
            "Intra-op threads of torch; 0 keeps torch's default. On a shared CPU host, 1-2 "
            "avoids oversubscription, which costs far more than it gains."
        ),
    )
    max_batch_size: int = Field(
        8, gt=0, description="Rows in one forward pass (hf backend); requests beyond wait."
    )
    max_batch_wait_ms: float = Field(
        2.0,
        ge=0,
        description=(
            "How long an idle model waits for more requests to fill a batch. Requests also "
            "join a running batch between two decode steps, so this only shapes bursts."
        ),
    )
    lora_kernel: Literal["stacked", "peft"] = Field(
        "stacked",
        description=(
            "hf backend: how LoRA and DoRA adapters are served. stacked: their weights stacked "
            "per layer and rank class, two batched matmuls per layer and rank class of the "
            "batch's adapters whatever the mix, a load is a "
            "few tensor copies. peft: PEFT's adapter_names (a loop over the batch's adapters, "
            "a load walks the model; DoRA refused, PEFT cannot mix it). Adapters stacking "
            "cannot express (LoRA bias, other variants) go through PEFT in the same batches."
        ),
    )
    max_loaded: int = Field(
        8, gt=0, description="Adapter versions in the model at once (LRU beyond, never in use)."
    )
    max_cached: int = Field(
        32,
        ge=0,
        description=(
            "Verified adapter versions kept as CPU weights outside the model (LRU); beyond "
            "that they are reloaded from the verified files on disk. Reloads are counted."
        ),
    )
    load_duty_cycle: float = Field(
        0.25,
        gt=0,
        le=1,
        description=(
            "Hot-loads announced by adapter.ready are background work: while requests are "
            "being served, each step of such a load (lookup, download, checks, attach, "
            "warm-up) is followed by a pause so that loading takes at most this share of "
            "the time (1 = no pauses). A load a request is waiting for is never paused."
        ),
    )
    max_lora_rank: int = Field(
        256,
        gt=0,
        description=(
            "Largest LoRA rank loaded (config and tensors); higher-rank adapters are refused "
            "at load. Each adapter's rank costs the batches that use it (and memory)."
        ),
    )
    max_adapter_weight: float = Field(
        1e4,
        gt=0,
        description=(
            "Largest magnitude of an adapter weight loaded; beyond it, or NaN/Inf anywhere, "
            "the adapter is refused at load (adapter.load_failed names the tensor)."
        ),
    )
    announce_interval_s: float = Field(
        2.0, gt=0, description="Heartbeat of the replica announcement (inference.replica.<id>)."
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: how long in-flight requests may take to finish before exit.",
    )
    fault_error_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description=(
            "Fault injection for tests and benchmarks (off by default; development mode "
            "only): share of Generate requests failing with UNAVAILABLE before their first "
            "token."
        ),
        json_schema_extra=DEV_ONLY,
    )
    fault_delay_factor: float = Field(
        1.0,
        ge=1,
        description=(
            "Fault injection (development mode only): multiplies each request's generation "
            "time (1 = off), by delaying every chunk by (factor - 1) x the time it took."
        ),
        json_schema_extra=DEV_ONLY,
    )
    fault_versions: str = Field(
        "",
        description=(
            "Fault injection scope (development mode only): comma separated version ids "
            "the faults apply to (a misbehaving candidate); empty = every request, base "
            "included."
        ),
        json_schema_extra=DEV_ONLY,
    )
    # vLLM backend only (backend = "vllm").
    vllm_max_loras: int = Field(8, gt=0, description="vLLM: adapters in one batch on the GPU.")
    # An int checked against VLLM_LORA_RANKS, not a Literal: pydantic refuses the env var's
    # "16" for Literal[..., 16, ...].
    vllm_max_lora_rank: int = Field(
        64,
        description=f"vLLM: largest LoRA rank served, one of {VLLM_LORA_RANKS}.",
    )
    vllm_max_cpu_loras: int = Field(
        32,
        gt=0,
        description="vLLM: adapters cached in CPU memory (at least vllm_max_loras); registered "
        "ones beyond are reloaded from disk when used.",
    )
    vllm_tensor_parallel_size: int = Field(1, gt=0, description="vLLM: GPUs per model.")
    vllm_gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vLLM: share of GPU memory the engine may take."
    )
    vllm_max_model_len: int = Field(
        0, ge=0, description="vLLM: context length; 0 = the model's own."
    )
    vllm_cpu_kvcache_space_gib: int = Field(
        0,
        ge=0,
        description="vLLM on CPU: memory for the KV cache in GiB (VLLM_CPU_KVCACHE_SPACE); "
        "0 = vLLM's default. 1 is plenty for the tiny model.",
    )
    vllm_dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = Field(
        "auto",
        description="vLLM: weight dtype: auto (the model's own), half, float16, bfloat16, "
        "float or float32.",
    )

    @field_validator("vllm_max_lora_rank")
    @classmethod
    def _vllm_rank_allowed(cls, rank: int) -> int:
        if rank not in VLLM_LORA_RANKS:
            raise ValueError(
                f"vllm_max_lora_rank must be one of {VLLM_LORA_RANKS} (the ranks vLLM "
                f"accepts), got {rank}"
            )
        return rank

    @field_validator("best_effort_reserve_share")
    @classmethod
    def _reserve_share_in_range(cls, share: float) -> float:
        if not 0 <= share < 1:
            raise ValueError(
                f"best_effort_reserve_share must be at least 0 and below 1, got {share}: "
                "it is the share of slots kept for user requests, and at 1 best-effort "
                "(mirrored) traffic could never run"
            )
        return share

    @model_validator(mode="after")
    def _queue_wait_allows_queueing(self) -> InferenceSettings:
        if self.max_queue_length > 0 and self.max_queue_wait_s == 0:
            raise ValueError(
                f"max_queue_wait_s is 0 while max_queue_length is {self.max_queue_length}: "
                "no queued request could be expected to get a slot; set max_queue_wait_s > 0, "
                "or max_queue_length=0 to refuse requests beyond max_concurrent_requests"
            )
        return self

    def best_effort_reserve(self) -> int:
        """Slots kept for user requests."""
        return int(self.max_concurrent_requests * self.best_effort_reserve_share)

    @model_validator(mode="after")
    def _vllm_cpu_loras_cover_gpu_loras(self) -> InferenceSettings:
        if self.vllm_max_cpu_loras < self.vllm_max_loras:
            raise ValueError(
                f"vllm_max_cpu_loras ({self.vllm_max_cpu_loras}) must be >= vllm_max_loras "
                f"({self.vllm_max_loras}): vLLM refuses to start otherwise"
            )
        return self

    def fault_version_set(self) -> frozenset[str]:
        return frozenset(v.strip() for v in self.fault_versions.split(",") if v.strip())
