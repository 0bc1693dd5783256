"""Settings of the inference service (env vars ``FTOPS_<FIELD>``)."""

from __future__ import annotations

from pydantic import Field

from ftops_runtime.settings import ServiceSettings


class InferenceSettings(ServiceSettings):
    registry_address: str = Field("127.0.0.1:50051", description="Registry gRPC host:port.")
    base_model_path: str = Field("", description="Local directory of the HF base model.")
    base_model_name: str = Field("tiny-llama", description="Name registered for the base model.")
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
        16, gt=0, description="Generations in flight (queued included) before RESOURCE_EXHAUSTED."
    )
    registry_timeout_s: float = Field(10.0, gt=0, description="Deadline of registry calls.")
